"""The tensor-core kernels in TileLang, shared by mHC and HC (GPU only): the forward GEMM with the
sum of squares, the dx prologue, and dx + dphi in two forms (tiled and per-row), with the tiling
configuration (HCBENCH_TL_DX). kernels/tilelang/mhc_pre.py's docstring says how they work."""
import functools
import json
import os
from dataclasses import dataclass, replace

from kernels.reference import EPS_RMS
from kernels.tilelang.common import GEMM_BK, GEMM_BT, TOK_PER_CTA, compile_kernel, kp

# CTAs per SM the GEMM + norm kernel is sized for: 1 let TileLang give the consumer warpgroup 240
# registers (one CTA per SM: cdiv(T, 64) = 256 CTAs at T = 16384 ran in two waves on 132 SMs);
# 2 keeps it under 128 and puts two CTAs on every SM. HCBENCH_TL_GEMM_MINB overrides.
GEMM_MINB = 2


def gemm_minb() -> int:
    return int(os.environ.get("HCBENCH_TL_GEMM_MINB", GEMM_MINB))


@functools.cache
def build_gemm_norm(n: int, C: int, dtype: str, hc: bool = False, minb: int | None = None):
    """hc=False: rows are tokens, x [T, nC], phi [nC, n*n+2n] (mHC).
    hc=True: rows are (token, stream) pairs, x [T*n, C], w [C, n+2] (HC's per-stream norm and
    projections are the same row-norm GEMM: m = (x_row . w) * rsqrt(mean x_row^2 + eps)).
    minb: CTAs per SM (None: gemm_minb())."""
    import tilelang.language as T

    minb = gemm_minb() if minb is None else minb

    K = (n + 2) if hc else n * n + 2 * n
    KP = kp(n, hc)
    NC = C if hc else n * C
    BT, BK = GEMM_BT, GEMM_BK
    Tn = T.dynamic("T")
    f32 = "float32"

    @T.prim_func
    def mhc_gemm_norm(x: T.Tensor((Tn, NC), dtype), phi_hi: T.Tensor((NC, KP), dtype),
                      phi_lo: T.Tensor((NC, KP), dtype), m: T.Tensor((Tn, K), f32),
                      r: T.Tensor((Tn,), f32)):
        with T.Kernel(T.ceildiv(Tn, BT), threads=128) as bt:
            if minb > 1:
                T.annotate_min_blocks_per_sm(minb)
                T.no_set_max_nreg()      # registers stay as compiled (minb CTAs must fit)
            xs = T.alloc_shared((BT, BK), dtype)
            phs = T.alloc_shared((BK, KP), dtype)
            pls = T.alloc_shared((BK, KP), dtype)
            acc = T.alloc_fragment((BT, KP), f32)
            xf = T.alloc_fragment((BT, BK), f32)
            ss = T.alloc_fragment((BT,), f32)
            accs = T.alloc_shared((BT, KP), f32)
            rs = T.alloc_shared((BT,), f32)
            T.clear(acc)
            T.clear(ss)
            for kk in T.Pipelined(T.ceildiv(NC, BK), num_stages=3):
                # TMA zero-fills past the last token and past column nC (no tail code)
                T.copy(x[bt * BT, kk * BK], xs)
                T.copy(phi_hi[kk * BK, 0], phs)
                T.copy(phi_lo[kk * BK, 0], pls)
                T.gemm(xs, phs, acc)
                T.gemm(xs, pls, acc)
                T.copy(xs, xf)
                for i, j in T.Parallel(BT, BK):
                    xf[i, j] = xf[i, j] * xf[i, j]
                T.reduce_sum(xf, ss, dim=1, clear=False)
            # through shared memory: the GEMM fragment and the row sums have unrelated layouts
            T.copy(acc, accs)
            for i in T.Parallel(BT):
                rs[i] = T.sqrt(ss[i] / NC + EPS_RMS)
            for i, j in T.Parallel(BT, KP):
                if bt * BT + i < Tn and j < K:
                    m[bt * BT + i, j] = accs[i, j] / rs[i]
            for i in T.Parallel(BT):
                if bt * BT + i < Tn:
                    r[bt * BT + i] = rs[i]

    return compile_kernel(mhc_gemm_norm, False)


@functools.cache
def build_dx_prep(n: int, dtype: str, hc: bool, cpu: bool):
    """The dx / dphi kernel's inputs in one pass, one thread per row (tokens, or HC's (token,
    stream) pairs): du [R, K] fp32 and amax = max |du| -> du_hi, du_lo [R, KP] in dtype
    (du * 2^-floor(log2 amax) split into hi + lo, zero padded; the same numbers as _du_split),
    inv_scale [1]; rowc [NR, Rp] fp32 for the tile kernel: coef in row 0, h_pre in rows 1..
    (mHC: h_pre[t, i] at [1 + i, t]; HC: h_pre per row at [1, r]), zeros past R."""
    import tilelang.language as T

    K = (n + 2) if hc else n * n + 2 * n
    KP = kp(n, hc)
    HW = 1 if hc else n
    NR = 2 if hc else n + 1
    nt = TOK_PER_CTA
    Rn = T.dynamic("R")
    Rp = T.dynamic("Rp")
    f32 = "float32"

    @T.macro
    def row(r, du, amax, coef, h_pre, du_hi, du_lo, inv_scale, rowc, v):
        if r < Rp:
            v[0] = T.exp2(-T.floor(T.log2(T.max(amax[0], 1e-30))))
            if r == 0:
                inv_scale[0] = 1.0 / v[0]
            if r < Rn:
                for k in T.unroll(KP):
                    if k < K:
                        v[1] = du[r, k] * v[0]
                        du_hi[r, k] = T.Cast(dtype, v[1])
                        du_lo[r, k] = T.Cast(dtype, v[1] - T.Cast(f32, du_hi[r, k]))
                    else:
                        du_hi[r, k] = T.Cast(dtype, 0.0)
                        du_lo[r, k] = T.Cast(dtype, 0.0)
                rowc[0, r] = coef[r]
                for i in T.unroll(HW):
                    rowc[1 + i, r] = h_pre[r, i]
            else:
                for i in T.unroll(NR):
                    rowc[i, r] = 0.0

    @T.prim_func
    def mhc_dx_prep(du: T.Tensor((Rn, K), f32), amax: T.Tensor((1,), f32),
                    coef: T.Tensor((Rn,), f32), h_pre: T.Tensor((Rn, HW), f32),
                    du_hi: T.Tensor((Rn, KP), dtype), du_lo: T.Tensor((Rn, KP), dtype),
                    inv_scale: T.Tensor((1,), f32), rowc: T.Tensor((NR, Rp), f32)):
        with T.Kernel(T.ceildiv(Rp, nt), threads=1 if cpu else nt) as bx:
            v = T.alloc_local((2,), f32)
            if cpu:
                for tx in T.serial(nt):
                    row(bx * nt + tx, du, amax, coef, h_pre, du_hi, du_lo, inv_scale, rowc, v)
            else:
                row(bx * nt + T.get_thread_binding(0), du, amax, coef, h_pre, du_hi, du_lo,
                    inv_scale, rowc, v)

    return compile_kernel(mhc_dx_prep, cpu)


@dataclass(frozen=True)
class DxConfig:
    """Launch of the dx / dphi kernel; dev/tune_tilelang_bwd.py times the alternatives.

    impl "tile": build_dx_dphi_tile where it applies (mHC: C % br == 0, so a CTA's columns lie
    in one stream; HC: bt % n == 0, so a row block holds whole tokens), else the first version
    (build_dx_dphi_row, also impl "row"). ws: warp-specialised (a TMA producer warpgroup, token
    ranges of any length); False: the same loop software-pipelined with cp.async (ranges of a
    power-of-two number of blocks). minb: CTAs per SM that registers and shared memory are sized
    for (__launch_bounds__), also the slots the token ranges are planned for. prep: the inputs
    (du scaled and split, coef and h_pre as rowc) by one kernel, else by torch ops."""
    impl: str = "tile"
    bt: int = 64          # tokens (rows) per tile: the wgmma M of dx
    br: int = 64          # columns per CTA: the wgmma M of dphi
    stages: int = 2
    minb: int = 2
    ws: bool = True
    prep: int = 1         # du split and rowc by build_dx_prep (1) or by torch ops (0)


DX_CONFIG = DxConfig()


def parse_dx_config(text: str, base: DxConfig | None = None) -> DxConfig:
    """"key=value,..." (DxConfig fields; ws takes 0/1) on top of base (default DX_CONFIG)."""
    kw = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, _, v = item.partition("=")
        if k not in DxConfig.__dataclass_fields__:
            raise ValueError(f"unknown dx config key {k!r} in {text!r}")
        kw[k] = v if k == "impl" else (v.lower() in ("1", "true") if k == "ws" else int(v))
    return replace(base or DX_CONFIG, **kw)


def dx_config(cfg=None) -> DxConfig:
    """cfg as a DxConfig: None is DX_CONFIG with the environment's HCBENCH_TL_DX (e.g.
    "impl=row" or "br=128,minb=1") applied; a dict or a string is applied to DX_CONFIG."""
    if cfg is None:
        env = os.environ.get("HCBENCH_TL_DX")
        return parse_dx_config(env) if env else DX_CONFIG
    if isinstance(cfg, dict):
        return replace(DX_CONFIG, **cfg)
    if isinstance(cfg, str):
        return parse_dx_config(cfg)
    return cfg


def tile_ok(n: int, C: int, hc: bool, cfg: DxConfig) -> bool:
    return cfg.impl == "tile" and (cfg.bt % n == 0 if hc else C % cfg.br == 0)


@functools.cache
def build_dx_dphi(n: int, C: int, dtype: str, nblk: int, has_li: bool, hc: bool = False,
                   acc: bool = False, cfg: DxConfig | None = None):
    """The dx / dphi kernel for cfg (None: the default): the tile kernel where it applies, else
    the row kernel. nblk: token blocks per range (ignored by the warp-specialised tile kernel,
    whose ranges are sized at launch). Kernel arguments as dx_dphi passes them."""
    cfg = dx_config(cfg)
    if tile_ok(n, C, hc, cfg):
        return build_dx_dphi_tile(n, C, dtype, 0 if cfg.ws else nblk, has_li, hc, acc, cfg.bt,
                                   cfg.br, cfg.stages, cfg.minb, cfg.ws)
    return build_dx_dphi_row(n, C, dtype, nblk, has_li, hc, acc)


def compile_gpu(func, pass_configs=None):
    """common.compile_kernel for the GPU, with pass configs."""
    import tilelang
    spec = os.environ.get("HCBENCH_TILELANG_TARGET")
    return tilelang.compile(func, target=json.loads(spec) if spec else "auto",
                            pass_configs=pass_configs or {})


def build_dx_dphi_tile(n: int, C: int, dtype: str, nblk: int, has_li: bool, hc: bool, acc: bool,
                        bt: int, br: int, stages: int, minb: int, ws: bool):
    """dx = du @ phi^T * inv_scale + coef * x (+ h_pre * g_li) (+ dx, acc: in place) and the
    per-range dphi = x^T @ du * inv_scale, every operand of the elementwise part staged in shared
    memory by the pipeline (TMA or cp.async) and dx written back by a TMA store.

    Rows and columns as in build_gemm_norm. rowc [NR, Rp] fp32 carries the per-row scalars:
    row 0 coef; mHC rows 1..n h_pre transposed (h_pre[t, s] at [1 + s, t]: a CTA's stream s is
    fixed, C % br == 0); HC row 1 h_pre per (token, stream) row. g_li tile: mHC [bt, br] at
    (t0, column within the stream); HC [bt / n, br] at (t0 / n, column), row i of the tile using
    g_li row i // n. Token range ts of R (dphi_ws's first dimension) covers blocks
    [ts * nb, (ts + 1) * nb), nb = nblk, or cdiv(cdiv(T, bt), R) when nblk == 0 (ws only).
    Loads past T or past the last column read zeros; the TMA store drops rows and columns
    outside dx."""
    import tilelang.language as T

    KP = kp(n, hc)
    NC = C if hc else n * C
    BT, BR = bt, br
    GR = BT // n if hc else BT
    NR = 2 if hc else n + 1
    Tn = T.dynamic("T")
    Tg = T.dynamic("Tg")
    Rp = T.dynamic("Rp")
    R = T.dynamic("R")
    nb = nblk if nblk else T.ceildiv(T.ceildiv(Tn, BT), R)
    f32 = "float32"

    @T.prim_func
    def mhc_dx_dphi_tile(x: T.Tensor((Tn, NC), dtype), phi_hi: T.Tensor((NC, KP), dtype),
                         phi_lo: T.Tensor((NC, KP), dtype), du_hi: T.Tensor((Tn, KP), dtype),
                         du_lo: T.Tensor((Tn, KP), dtype), inv_scale: T.Tensor((1,), f32),
                         rowc: T.Tensor((NR, Rp), f32), g_li: T.Tensor((Tg, C), dtype),
                         dx: T.Tensor((Tn, NC), dtype), dphi_ws: T.Tensor((R, NC, KP), f32)):
        with T.Kernel(T.ceildiv(NC, BR), R, threads=128) as (bx, ts):
            if minb > 1:
                T.annotate_min_blocks_per_sm(minb)
            if ws:
                T.no_set_max_nreg()      # registers stay as compiled (minb CTAs must fit)
            # mHC: the stream fastest in launch order, so the n CTAs that read the same g_li
            # columns run in the same wave and all but the first read them from L2
            rb = bx if hc else (bx % n) * (C // BR) + bx // n
            phs = T.alloc_shared((BR, KP), dtype)
            pls = T.alloc_shared((BR, KP), dtype)
            xs = T.alloc_shared((BT, BR), dtype)
            dhs = T.alloc_shared((BT, KP), dtype)
            dls = T.alloc_shared((BT, KP), dtype)
            cs = T.alloc_shared((BT,), f32)
            dxo = T.alloc_shared((BT, BR), dtype)
            if has_li:
                hs = T.alloc_shared((BT,), f32)
                gs = T.alloc_shared((GR, BR), dtype)
            if acc:
                ds = T.alloc_shared((BT, BR), dtype)
            accp = T.alloc_fragment((BR, KP), f32)
            dxf = T.alloc_fragment((BT, BR), f32)
            isc = T.alloc_var(f32)
            isc = inv_scale[0]
            s = (rb * BR) // C              # mHC: the CTA's stream
            T.copy(phi_hi[rb * BR, 0], phs)
            T.copy(phi_lo[rb * BR, 0], pls)
            T.clear(accp)
            for kb in T.Pipelined(nb, num_stages=stages):
                t0 = (ts * nb + kb) * BT
                T.copy(x[t0, rb * BR], xs)
                T.copy(du_hi[t0, 0], dhs)
                T.copy(du_lo[t0, 0], dls)
                T.copy(rowc[0, t0:t0 + BT], cs)
                if has_li:
                    if hc:
                        T.copy(rowc[1, t0:t0 + BT], hs)
                        T.copy(g_li[t0 // n, rb * BR], gs)
                    else:
                        T.copy(rowc[1 + s, t0:t0 + BT], hs)
                        T.copy(g_li[t0, rb * BR - s * C], gs)
                if acc:
                    T.copy(dx[t0, rb * BR], ds)
                T.gemm(xs, dhs, accp, transpose_A=True)
                T.gemm(xs, dls, accp, transpose_A=True)
                T.gemm(dhs, phs, dxf, transpose_B=True, clear_accum=True)
                T.gemm(dhs, pls, dxf, transpose_B=True)
                T.gemm(dls, phs, dxf, transpose_B=True)
                for i, j in T.Parallel(BT, BR):
                    v = dxf[i, j] * isc + cs[i] * xs[i, j]
                    if has_li:
                        if hc:
                            v = v + hs[i] * gs[i // n, j]
                        else:
                            v = v + hs[i] * gs[i, j]
                    if acc:
                        v = v + ds[i, j]
                    dxo[i, j] = v
                T.copy(dxo, dx[t0, rb * BR])
            for i, j in T.Parallel(BR, KP):
                if rb * BR + i < NC:
                    dphi_ws[ts, rb * BR + i, j] = accp[i, j] * isc

    return compile_gpu(mhc_dx_dphi_tile, None if ws else {"tl.disable_warp_specialized": True})


def build_dx_dphi_row(n: int, C: int, dtype: str, nblk: int, has_li: bool, hc: bool = False,
                       acc: bool = False):
    """The first dx / dphi kernel (any n, any C multiple of 8): nblk row blocks (of GEMM_BT) per
    range, grid (cdiv(D, 64), R); the elementwise part reads coef, h_pre, g_li (and dx, acc)
    straight from global memory: mHC h_pre [T, n] at (row, col // C) and g_li [T, C] at
    (row, col % C); HC h_pre [T*n, 1] at (row, 0) and g_li [T, C] at (row // n, col)."""
    import tilelang.language as T

    KP = kp(n, hc)
    NC = C if hc else n * C
    HW = 1 if hc else n
    BT = GEMM_BT
    BR = 64
    Tn = T.dynamic("T")
    Tg = T.dynamic("Tg")
    R = T.dynamic("R")
    f32 = "float32"

    @T.prim_func
    def mhc_dx_dphi(x: T.Tensor((Tn, NC), dtype), phi_hi: T.Tensor((NC, KP), dtype),
                    phi_lo: T.Tensor((NC, KP), dtype), du_hi: T.Tensor((Tn, KP), dtype),
                    du_lo: T.Tensor((Tn, KP), dtype), inv_scale: T.Tensor((1,), f32),
                    coef: T.Tensor((Tn,), f32), h_pre: T.Tensor((Tn, HW), f32),
                    g_li: T.Tensor((Tg, C), dtype), dx: T.Tensor((Tn, NC), dtype),
                    dphi_ws: T.Tensor((R, NC, KP), f32)):
        with T.Kernel(T.ceildiv(NC, BR), R, threads=128) as (rb, ts):
            phs = T.alloc_shared((BR, KP), dtype)
            pls = T.alloc_shared((BR, KP), dtype)
            xs = T.alloc_shared((BT, BR), dtype)
            dhs = T.alloc_shared((BT, KP), dtype)
            dls = T.alloc_shared((BT, KP), dtype)
            dxs = T.alloc_shared((BT, BR), f32)
            accp = T.alloc_fragment((BR, KP), f32)
            dxf = T.alloc_fragment((BT, BR), f32)
            T.copy(phi_hi[rb * BR, 0], phs)
            T.copy(phi_lo[rb * BR, 0], pls)
            T.clear(accp)
            for kb in T.Pipelined(nblk, num_stages=2):
                t0 = (ts * nblk + kb) * BT
                T.copy(x[t0, rb * BR], xs)
                T.copy(du_hi[t0, 0], dhs)
                T.copy(du_lo[t0, 0], dls)
                T.gemm(xs, dhs, accp, transpose_A=True)
                T.gemm(xs, dls, accp, transpose_A=True)
                T.gemm(dhs, phs, dxf, transpose_B=True, clear_accum=True)
                T.gemm(dhs, pls, dxf, transpose_B=True)
                T.gemm(dls, phs, dxf, transpose_B=True)
                T.copy(dxf, dxs)
                for i, j in T.Parallel(BT, BR):
                    if t0 + i < Tn and rb * BR + j < NC:
                        v = dxs[i, j] * inv_scale[0] + coef[t0 + i] * xs[i, j]
                        if has_li and hc:
                            v = v + h_pre[t0 + i, 0] * g_li[(t0 + i) // n, rb * BR + j]
                        elif has_li:
                            v = v + (h_pre[t0 + i, (rb * BR + j) // C]
                                     * g_li[t0 + i, (rb * BR + j) % C])
                        if acc:
                            v = v + dx[t0 + i, rb * BR + j]
                        dx[t0 + i, rb * BR + j] = v
            for i, j in T.Parallel(BR, KP):
                if rb * BR + i < NC:
                    dphi_ws[ts, rb * BR + i, j] = accp[i, j] * inv_scale[0]

    return compile_kernel(mhc_dx_dphi, False)
