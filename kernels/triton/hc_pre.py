"""HC pre (dynamic Hyper-Connections, MATH.md "HC"): per-stream RMSNorm, tanh projections and F_pre.

    hc_coeffs(x, w, b, s) -> (h_pre [T,n] fp32, h_post [T,n] fp32, h_res [T,n,n] fp32)
    hc_pre(x, w, b, s)    -> (layer_input [T,C] x.dtype, h_post, h_res)

x [T, n, C] bf16/fp16 (n <= 8, C % 8 == 0); w fp32 [C, n+2] = [w_pre | w_post | W_res] (RMSNorm weight
folded in); b fp32 [n*n+2n] = [b_pre | b_post | b_res (dst, src)]; s fp32 [2] = (s_a, s_b). Per token:
    r[i] = rsqrt(mean_c x[i]^2 + 1e-6),  z[i, k] = r[i] * (x[i] . w[:, k]),  p = tanh(z)
    h_pre[i] = s_a p[i,0] + b_pre[i];  h_post[i] = s_b p[i,1] + b_post[i]
    h_res[j,i] = s_a p[i,2+j] + b_res[j,i]       (source i's projection fills column i)
    layer_input = sum_i h_pre[i] x[i]
Both functions are differentiable w.r.t. x, w, b, s (torch.autograd.Function; only the gradients
asked for in ctx.needs_input_grad are computed).

Files: this one holds the configuration, the launches and the autograd Function; the kernels are
kernels/triton/hc_pre_fwd.py and kernels/triton/hc_pre_bwd.py.

Design (NK = n+2 projections, NP = n rounded up to a power of two). Times: H100 SXM, bf16,
n = 4, T = 16384 (dev/tune_hc_pre.py; kernel times from torch.profiler, L2 flushed).

Forward (gemm_bk = 128 and gemm_stages = 4 beat 64 / 3: 0.45 against 0.52 ms at C = 4096, 0.75
against 0.85 ms at C = 7168):
  fwd_gemm_kernel, grid cdiv(T*n, gemm_bm): x viewed as [T*n, C] rows (token, stream); each
    program streams its rows' C in gemm_bk chunks (pipelined, gemm_stages), multiplies them on
    tensor cores by w [C, 16] split into hi + lo in x's dtype (two products, fp32 accumulation:
    w to ~16 bits, x as loaded), and sums squares; per row: r, z, tanh, h_pre, h_post and
    column i of h_res (z, r saved for the backward). 195 us at C = 4096 (2.75 TB/s of x).
  apply_pre (kernels/triton/apply_pre.py): layer_input from h_pre, reading x again (229 us).
  DRAM bytes per token: read 2nC (x twice), write C + small. On the interpreter the products run
  in fp32 (it multiplies 16-bit float tiles as bit patterns), so CPU tests check the indexing and
  the epilogue, and the GPU tests the bf16 products.

Tried and dropped: a one-kernel FMA forward that read x once from DRAM (int32 pairs of x per
thread, w in registers, layer_input in a second pass over L2): latency-bound at 16-27% of the copy
rate, 1.02 against 0.45 ms at C = 4096 and 1.46 against 0.75 ms at C = 7168; and its FMA dx / dw
kernel, 1185 against 453 us at C = 4096. Commit 23bc741 is the last to have both.

Backward, two kernels (u = r*dz, e = r^2 * mean_c(dxn*xn) = r^2/C * sum_k dz_k z_k):
  bwd_coef_kernel, grid = cdiv(T, GT), each program loops over GT tokens in blocks of BT:
    dh_pre = g_li . x[i] (one pass over x and g_li; none for hc_coeffs) + upstream dh_pre,
    dp = s * dh, dz = (1 - p^2) dp, ds and db_pre partials per program (summed by torch);
    writes coef [T, n, NKC] = (u_0..u_{NK-1}, h_pre, e, pad; NKC = n+4 rounded up to 4: 16-byte
    rows). db_post, db_res are torch sums of the upstream gradients. 245 us at C = 4096
    (2 warps, b1_cp 1).
  bwd_dx_mma_kernel, rows = (token, stream) pairs of x viewed as
    [T*n, C]; program = (b2_bc columns, a range of rows), column block fastest, row ranges
    last-first (the first reads hit what bwd_coef_kernel left in L2); per b2_bm rows, loads
    pipelined through shared memory (b2_stages):
      dx = u @ w^T (tensor cores, tf32, K = NK padded to 16) - e x + h_pre g_li   (RMSNorm
        backward folded in; g_li's row is row // n) [+ the dx already in the output: ACC]
      dw partial [BC, 16] += x^T @ u on tensor cores: x as loaded (bf16) times u split into
        hi + lo in bf16 (fp32 accumulation: x exact, u to ~16 bits; b2_dw="tf32" or fp16 x: x in
        fp32 and tf32 products), written once per program as [groups, C, NK], summed by torch.
    Addresses are a 64-bit scalar base per row block plus loop-invariant 32-bit offsets, and
    whole blocks (C % b2_bc == 0, T*n % b2_bm == 0) drop every mask, so few registers go to the
    pipeline: 126 at 64 x 64 x 4 warps (sm_90, triton 3.6; 164 with ACC). The grid is whole waves
    of the CTAs that fit on an SM (b2_ctas; 0: from the compiled kernel's registers and shared
    memory: 4 per SM, 3 with ACC). 453 us at C = 4096 (2.7 TB/s of DRAM traffic); 653 us with ACC (in the site: nC more read); 794 us at
    C = 7168 (b2_stages=4: 446 / 768 us without ACC, but 2 CTAs per SM with it).
  DRAM traffic per token: x and g_li read twice ((n+1)C elements per pass), dx written (nC; read
  too with ACC), + ~4n(3NK+8) bytes of coefficients and ~1% of dw partials. The fused floor reads x
  and g_li once;
  the second read is the price of dw: it needs the full-C reduction dh_pre first and a reduction
  over tokens after, which one token-major pass can only do with per-program [C, NK] partials
  (as much traffic again) or millions of atomics.

Site link (kernels/site_link.py): hc_pre and hc_coeffs attach a link for the caller's x to
h_res. A post given that h_res and the same x (kernels/triton/post.py) hands its dx over instead
of returning it; the backward takes it first (site_link.accumulator) and bwd_dx_mma_kernel adds
its own dx into it in place (nC more bytes read, instead of autograd's separate 3nC add).

Offsets: per-token (per-row-block) bases are int64 (T*n*C may exceed 2^31); the backward kernels
get C as C/8 so that the compiler knows every row starts 16-byte aligned (the forward relies on
triton's divisibility-by-16 specialisation of C).

Tuning: keyword `config` (dict or "key=value,..." string) or the environment variable
HCBENCH_HC_PRE (same string form); keys in DEFAULT_CONFIG. dev/tune_hc_pre.py times variants.
"""
from __future__ import annotations

import os

import torch
import triton

from kernels import reference, site_link
from kernels.colsum import column_sums
from kernels.hilo import split_hi_lo
from kernels.triton.apply_pre import apply_pre
from kernels.triton.common import check_state, check_tensor, interpreting, num_sms, resident_ctas
from kernels.triton.hc_pre_bwd import bwd_coef_kernel, bwd_dx_mma_kernel
from kernels.triton.hc_pre_fwd import fwd_gemm_kernel

EPS = reference.EPS_RMS

# *_bt = 0: tokens per block chosen so that BT * NP is about *_rows (rows live in each thread).
DEFAULT_CONFIG = {
    # forward: the projections on tensor cores with x viewed as [T*n, C] rows, w split into hi +
    # lo in x's dtype, then a separate apply kernel
    "gemm_bm": 64, "gemm_bk": 128, "gemm_warps": 4, "gemm_stages": 4,
    "apply_bt": 16, "apply_bc": 256,
    # coefficient backward: 2 warps of one int32 pair per thread and chunk (H100, bf16, n = 4,
    # T = 16384: 166 / 245 / 416 us at C = 2560 / 4096 / 7168 against 198 / 282 / 453 us with 4
    # warps and 2 pairs; dev/logs/tuning-20261124-h100/hc_b1_probe.txt)
    "b1_bt": 0, "b1_rows": 8, "b1_warps": 2, "b1_programs": 8192, "b1_prefetch": 1, "b1_cp": 1,
    # dx / dw kernel (bwd_dx_mma_kernel, tensor cores)
    "b2_bm": 64, "b2_bc": 64, "b2_stages": 3, "b2_ctas": 0, "b2_dw": "bf16", "b2_warps": 4,
}
# The interpreter pays per program and per op, not per byte: big token blocks, few programs.
INTERPRETER_CONFIG = {"b1_rows": 32, "b1_programs": 2}


# ------------------------------------------------------------------------------------ host side
def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def parse_config(config=None) -> dict:
    """DEFAULT_CONFIG (+ INTERPRETER_CONFIG under TRITON_INTERPRET), then HCBENCH_HC_PRE from the
    environment, then `config` (dict or "key=value,..." string)."""
    cfg = dict(DEFAULT_CONFIG)
    if interpreting():
        cfg.update(INTERPRETER_CONFIG)
    for src in (os.environ.get("HCBENCH_HC_PRE", ""), config):
        if not src:
            continue
        if isinstance(src, str):
            src = dict(kv.split("=", 1) for kv in src.replace(" ", "").split(",") if kv)
        for key, val in src.items():
            if key not in DEFAULT_CONFIG:
                raise ValueError(f"hc_pre: unknown config key {key!r}; "
                                 f"known: {', '.join(DEFAULT_CONFIG)}")
            cfg[key] = val if isinstance(DEFAULT_CONFIG[key], str) else int(val)
    for key in ("gemm_bm", "gemm_bk"):
        if cfg[key] < 16 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"hc_pre: {key} must be a power of two >= 16 (tensor-core tiles), "
                             f"got {cfg[key]}")
    if cfg["b2_dw"] not in ("bf16", "tf32"):
        raise ValueError(f"hc_pre: b2_dw must be 'bf16' or 'tf32', got {cfg['b2_dw']!r}")
    return cfg


def _num_sms(device) -> int:
    return num_sms(device, interpreter_sms=2)


def _warps(want: int, C: int, cp: int) -> int:
    """num_warps, shrunk for narrow C so that a chunk (64 * warps * cp columns) is not mostly masked."""
    return max(1, min(_pow2(want), _pow2(triton.cdiv(C, 64 * cp))))


def _bt(explicit: int, rows: int, NP: int, T: int) -> int:
    bt = explicit if explicit > 0 else max(1, rows // NP)
    return max(1, min(_pow2(bt), _pow2(T)))


def _launch_fwd_gemm(x, w, b, s, with_li, save, cfg):
    T, n, C = x.shape
    NK, NKP = n + 2, 16
    dev, f32 = x.device, torch.float32
    w_hi, w_lo = split_hi_lo(w, x.dtype, NKP)
    hpre = torch.empty(T, n, device=dev, dtype=f32)
    hpost = torch.empty(T, n, device=dev, dtype=f32)
    hres = torch.empty(T, n, n, device=dev, dtype=f32)
    z = torch.empty(T, n, NK, device=dev, dtype=f32) if save else None
    r = torch.empty(T, n, device=dev, dtype=f32) if save else None
    bm = _pow2(cfg["gemm_bm"])
    fwd_gemm_kernel[(triton.cdiv(T * n, bm),)](
        x, w_hi, w_lo, b, s, hpre, hpost, hres, z if save else hpost, r if save else hpost,
        T * n, C, EPS, N=n, NK=NK, NKP=NKP, BM=bm, BK=_pow2(cfg["gemm_bk"]),
        STAGES=cfg["gemm_stages"], SAVE=save, DOT_F32=interpreting(), num_warps=cfg["gemm_warps"])
    if not with_li:
        return hpre, hpost, hres, z, r
    li = torch.empty(T, C, device=dev, dtype=x.dtype)
    apply_pre(x, hpre, li, _pow2(cfg["apply_bt"]), _pow2(cfg["apply_bc"]))
    return li, hpost, hres, z, r


def _splits(units: int, nblk: int, slots: int) -> int:
    """How many pieces to cut each of `units` work units (nblk blocks each) into, for `slots`
    resident CTAs: the smallest k (<= nblk, <= 64) whose waves times work per CTA,
    ceil(k * units / slots) / k, is within 5% of the best."""
    t = {k: triton.cdiv(k * units, slots) / k for k in range(1, min(nblk, 64) + 1)}
    best = min(t.values())
    return min(k for k, v in t.items() if v <= 1.05 * best)


def _launch_bwd_dx_mma(x, g, w, coef, dx, need_x, need_w, acc, cfg):
    """bwd_dx_mma_kernel: dx into `dx` (added to what is there when acc: a site link's
    accumulator) and the dw partials; returns dw [C, NK] or None."""
    T, n, C = x.shape
    NK, NKC = n + 2, coef.shape[2]
    R = T * n
    bm = max(16, min(_pow2(cfg["b2_bm"]), _pow2(R)))
    bc = max(16, min(_pow2(cfg["b2_bc"]), _pow2(C)))
    ncb = triton.cdiv(C, bc)
    nblk = triton.cdiv(R, bm)
    kw = dict(N=n, NK=NK, NKC=NKC, KP=16, BM=bm, BC=bc, STAGES=cfg["b2_stages"],
              HAS_G=g is not None, WRITE_DX=need_x, WRITE_DW=need_w, ACC=acc,
              DW_BF16=cfg["b2_dw"] == "bf16" and x.dtype == torch.bfloat16,
              DOT_F32=interpreting(), EVEN_R=R % bm == 0, EVEN_C=C % bc == 0,
              num_warps=cfg["b2_warps"])
    # Row groups per column block: whole waves of the CTAs that fit on the GPU at once (b2_ctas
    # per SM, 0: as many as the compiled kernel's registers and shared memory allow)
    args = [x, g if g is not None else x, w, coef, dx if need_x else x, coef, R, C // 8, bm, ncb, 3]
    ctas = cfg["b2_ctas"] if cfg["b2_ctas"] > 0 else resident_ctas(bwd_dx_mma_kernel, args, kw, 3)
    groups = _splits(ncb, nblk, ctas * _num_sms(x.device))
    gr = bm * triton.cdiv(nblk, groups)
    groups = triton.cdiv(R, gr)
    dwp = torch.empty(groups, C, NK, device=x.device, dtype=torch.float32) if need_w else None
    bwd_dx_mma_kernel[(ncb * groups,)](
        x, g if g is not None else x, w, coef, dx if need_x else x, dwp if need_w else coef,
        R, C // 8, gr, ncb, groups, **kw)
    if not need_w:
        return None
    return dwp[0] if groups == 1 else dwp.sum(0)


class _HCPreFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, s, with_li, cfg, holder):
        save = any(ctx.needs_input_grad[:4])
        out0, hpost, hres, z, r = _launch_fwd_gemm(x, w, b, s, with_li, save, cfg)
        if save:
            ctx.save_for_backward(x, w, b, s, z, r)
        ctx.with_li = with_li
        ctx.cfg = cfg
        ctx.holder = holder
        ctx.set_materialize_grads(False)
        return out0, hpost, hres

    @staticmethod
    def backward(ctx, g0, gpost, gres):
        x, w, b, s, z, r = ctx.saved_tensors
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        # First, on every path: F_post,res's share of dx (kernels/site_link.py), if a post put it
        # in this pre's link; the dx kernel adds into it in place.
        acc = site_link.accumulator(ctx.holder[0], x) if need_x else None
        cfg = ctx.cfg
        T, n, C = x.shape
        NP, NK = _pow2(n), n + 2
        NKC = (n + 4 + 3) // 4 * 4       # coef row: u_0..u_{NK-1}, h_pre, e (+ pad to 16 bytes)
        dev, f32 = x.device, torch.float32
        is_bf16 = x.dtype == torch.bfloat16
        x32 = x.view(torch.int32)
        has_g = ctx.with_li and g0 is not None
        gpre = g0.contiguous() if (not ctx.with_li and g0 is not None) else None
        gc = _int32_viewable(g0) if has_g else None
        g = gc.view(torch.int32) if has_g else None
        gpost = torch.zeros(T, n, device=dev, dtype=f32) if gpost is None else gpost.contiguous()
        gres = torch.zeros(T, n, n, device=dev, dtype=f32) if gres is None else gres.contiguous()

        # kernel 1: dh_pre, dz -> coef [T, n, NKC] = (r*dz, h_pre, e); ds / db_pre partials
        cp1 = _pow2(cfg["b1_cp"])
        warps1 = _warps(cfg["b1_warps"], C, cp1)
        BT1 = _bt(cfg["b1_bt"], cfg["b1_rows"], NP, T)
        blocks = triton.cdiv(T, BT1)
        GT1 = BT1 * triton.cdiv(blocks, max(1, cfg["b1_programs"]))
        P1 = triton.cdiv(T, GT1)
        PW = 2 + n
        coef = torch.empty(T, n, NKC, device=dev, dtype=f32)
        part = torch.empty(P1, PW, device=dev, dtype=f32)
        bwd_coef_kernel[(P1,)](
            x32, g if has_g else x32, gpre if gpre is not None else gpost, gpost, gres, z, r, b, s,
            coef, part, T, C // 8, GT1,
            N=n, NP=NP, NK=NK, NKC=NKC, PW=PW, BT=BT1, NTH=32 * warps1, CP=cp1,
            IS_BF16=is_bf16, HAS_G=has_g, HAS_GPRE=gpre is not None,
            PREFETCH=bool(cfg["b1_prefetch"]), num_warps=warps1)

        dx = dw = db = ds = None
        if need_x or need_w:
            dx = (acc if acc is not None else torch.empty_like(x)) if need_x else None
            dw = _launch_bwd_dx_mma(x, gc, w, coef, dx, need_x, need_w, acc is not None, cfg)
        if need_b or need_s:
            # [ds (2) | db: pre, post, res]; part has a row per program, the others one per token
            sums = torch.cat([column_sums(part), column_sums(gpost, gres)])
            db = sums[2:] if need_b else None
            ds = sums[:2] if need_s else None
        return dx, dw, db, ds, None, None, None


def _int32_viewable(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, starting on a 4-byte boundary (the kernels read pairs of 16-bit values as int32)."""
    t = t.contiguous()
    return t.clone() if t.storage_offset() % 2 else t


def _check(op, x, w, b, s):
    T, n, C = check_state(op, x)
    x = _int32_viewable(x)
    w = check_tensor(op, w, "w", (C, n + 2), torch.float32, x.device)
    b = check_tensor(op, b, "b", (n * n + 2 * n,), torch.float32, x.device)
    s = check_tensor(op, s, "s", (2,), torch.float32, x.device)
    return x, w, b, s


def _apply(x_user, x, w, b, s, with_li, config):
    holder = [None]
    out = _HCPreFn.apply(x, w, b, s, with_li, parse_config(config), holder)
    # a site link for the caller's x, carried by h_res: a post given this h_res and x hands its
    # dx to this pre's backward, which adds it in place (kernels/site_link.py)
    if x_user.requires_grad and torch.is_grad_enabled():
        holder[0] = site_link.attach(out[2], x_user)
    return out


def hc_coeffs(x, w, b, s, *, config=None):
    """(h_pre [T,n], h_post [T,n], h_res [T,n,n]) fp32, differentiable w.r.t. x, w, b, s."""
    x_user = x
    x, w, b, s = _check("hc_coeffs", x, w, b, s)
    if x.shape[0] == 0:
        return reference.hc_coeffs(x, w, b, s)
    return _apply(x_user, x, w, b, s, False, config)


def hc_pre(x, w, b, s, *, config=None):
    """(layer_input [T,C] x.dtype, h_post [T,n], h_res [T,n,n]), differentiable w.r.t. x, w, b, s."""
    x_user = x
    x, w, b, s = _check("hc_pre", x, w, b, s)
    if x.shape[0] == 0:
        return reference.hc_pre(x, w, b, s)
    return _apply(x_user, x, w, b, s, True, config)


__all__ = ["hc_coeffs", "hc_pre", "parse_config", "DEFAULT_CONFIG"]
