"""mHC coefficients (norm + GEMM + Sinkhorn) with F_pre, and their backward, in TileLang.

    mhc_coeffs(x, phi, b, alpha, sinkhorn_iters=20) -> (h_pre [T,n], h_post [T,n], h_res [T,n,n]) fp32
    mhc_pre(x, phi, b, alpha, sinkhorn_iters=20)    -> (layer_input [T,C] x.dtype, h_post, h_res)
Same contract as kernels.reference / kernels.triton.mhc_pre; differentiable w.r.t. x, phi, b, alpha.

GEMM precision: x (bf16/fp16) is exact in its own type; phi is split into hi + lo in x's dtype
(hi = phi rounded, lo = the rest rounded) and the GEMM runs twice on the tensor cores with fp32
accumulation, so the product uses phi to about 16 significant bits (bf16) - closer to fp32 than
tf32's 11. Why not tf32: T.gemm in TileLang 0.1.15 takes both operands in one dtype and lowering
an fp32 x tile to tf32 wgmma needs x converted and staged again; two bf16 wgmmas on the same x tile
in shared memory cost less than that and read x once. The backward does the same with du
(hi + lo) against phi (hi + lo), three products (lo * lo is below fp32 rounding of the sum).

Forward, three kernels (K = n*n + 2n, KP = K rounded up to 16):
  build_gemm_norm (GPU only: wgmma + TMA; sized for GEMM_MINB = 2 CTAs per SM, so the 256 CTAs
    of T = 16384 fit one wave of 132 SMs): grid cdiv(T, 64); a CTA streams its 64 tokens' x
    [64, nC] in 64-column chunks (TMA, 3 stages, warp-specialised), accumulates x @ phi_hi and
    x @ phi_lo in one [64, KP] fp32 fragment and the sum of squares from the same shared tile;
    writes m = (x @ phi) / r [T, K] and r [T] (also what the backward needs).
  build_coef (per token, one thread each): bias, alpha, sigmoid, 2*sigmoid, the max-shifted exp
    and all Sinkhorn iterations in registers; writes h_pre, h_post, h_res.
  build_apply (mhc_pre only; one CTA per token): layer_input = sum_i h_pre[i] x[i].
  HBM bytes per token: read 2nC*e (x twice: GEMM, then apply) + small, write C*e + (n*n+3n+1)*4.
  The floor (MATH.md) reads x once: the GEMM kernel would have to finish a token block's Sinkhorn
  and then re-read the block's x, which at 64 tokens x nC is 2 MB per CTA (n=4, C=4096), far past
  what stays in L1 or L2 across CTAs in flight; this version pays the second read.

Backward:
  build_dhpre (mhc_pre only; one CTA per token): dh_pre[i] = sum_c g_li[c] x[i, c].
  build_coef_bwd (per token, one thread each): sigmoid derivatives, the Sinkhorn backward -
    recomputing the iterates on chip from the logits, nothing stored: checkpoints every
    Q = ceil(sqrt(iters)) iterations, each iterate of a segment recomputed from its checkpoint -,
    the max shift (its gradient to the arg-max entries, split on ties as torch.amax), the
    alpha / bias / 1/r chain. Writes dlogit [T, K] (torch sums it into db and dalpha),
    du = alpha * dlogit / r [T, K] and coef = dr / (nC r) [T].
  build_dx_dphi (GPU only; DxConfig / DX_CONFIG pick the kernel): grid (cdiv(nC, br) column
    blocks of the flattened x, R token ranges); a CTA keeps its phi rows (hi, lo) in shared
    memory and streams its token range in [bt, br] tiles:
      dphi rows += x_tile^T @ du   (two wgmmas: du hi, lo)
      dx tile    = du @ phi_rows^T (three wgmmas) + coef * x + h_pre[t, stream] * g_li (+ dx_in)
    dphi per range goes to a [R, nC, KP] workspace summed by torch. du is scaled by a power of
    two before the split (no fp16 underflow), undone in fp32. ACC (a linked site, below): dx_in
    is post's x gradient, read and overwritten in place, so autograd never adds the two.
    build_dx_dphi_tile (default; mHC when br divides C, so a CTA's columns lie in one stream,
    HC when n divides bt): every operand of the elementwise part - x, du, coef and h_pre (one
    [n+1, T] fp32 array, h_pre transposed so a stream's values are contiguous), the g_li tile,
    dx_in - arrives in shared memory through the pipeline (TMA from a producer warpgroup,
    warp-specialised, or cp.async), the result leaves through a shared tile and a TMA store;
    2 CTAs per SM (__launch_bounds__, no setmaxnreg), R sized at launch so the last wave of CTAs
    is nearly full. build_dx_dphi_row (the first version; any n and C): the elementwise part
    reads coef, h_pre and g_li element by element from global memory after a round trip of the
    GEMM tile through fp32 shared memory, 1 CTA per SM (240 registers): 2.3 ms at n=4, C=4096,
    T=16384 on an H100 (514 GB/s).
    mHC CTAs are launched stream fastest (the n CTAs reading the same g_li columns together).
    Its inputs come from build_dx_prep (one thread per row): du scaled by a power of two and
    split into hi + lo, inv_scale, and the coef / h_pre rows, in one launch instead of about a
    dozen torch ops (DxConfig.prep = 0: those torch ops).
  HBM bytes per token: read 2nC*e (x in dhpre and dx/dphi) + C*e (g_li; its n re-reads from
  L2) (+ nC*e dx_in) + small, write nC*e.

Site link (kernels/site_link.py): mhc_pre / mhc_coeffs tag h_res with a link to the caller's x;
a fused post (kernels/tilelang/post.py) of that x and h_res hands its dx over instead of
returning it, and this backward takes it first (on every path that returns dx) and adds into it.

CPU ("c" target, tests): build_coef, build_coef_bwd, build_apply and build_dhpre compile
there (the per-token threads become a serial loop); the two GEMM kernels are GPU only.
"""

import math

import torch

from kernels import site_link
from kernels.colsum import column_sums, segment_sums
from kernels.hilo import split_hi_lo, split_weight_hi_lo
from kernels.tilelang.coef_kernels import build_coef, build_coef_bwd
from kernels.tilelang.common import GEMM_BT, TL_DTYPES, check_state, check_tensor, kp, on_device
from kernels.tilelang.gemm_kernels import (DxConfig, build_dx_dphi, build_dx_prep, build_gemm_norm,
                                           dx_config, gemm_minb, tile_ok)
from kernels.tilelang.stream_kernels import build_apply, build_dhpre


def dx_prep(du, coef, h_pre, dtype, hc: bool):
    """build_dx_prep on du [R, K], coef [R], h_pre (mHC [R, n]; HC [T, n], R = T * n):
    (du_hi, du_lo, inv_scale, rowc)."""
    rows = du.shape[0]
    n = h_pre.shape[1]
    KP = kp(n, hc)
    Rp = -(-rows // 8) * 8
    dev = du.device
    amax = torch.linalg.vector_norm(du, float("inf")).reshape(1)
    du_hi = torch.empty(rows, KP, device=dev, dtype=dtype)
    du_lo = torch.empty(rows, KP, device=dev, dtype=dtype)
    inv_scale = torch.empty(1, device=dev, dtype=torch.float32)
    rowc = torch.empty((2 if hc else n + 1), Rp, device=dev, dtype=torch.float32)
    kern = build_dx_prep(n, TL_DTYPES[dtype], hc, dev.type == "cpu")
    with on_device(du):
        kern(du, amax, coef.reshape(rows), h_pre.reshape(rows, 1 if hc else n), du_hi, du_lo,
             inv_scale, rowc)
    return du_hi, du_lo, inv_scale, rowc



# ====================================================================== host side
def _check(op, x, phi, b, alpha, sinkhorn_iters):
    _, n, C = check_state(op, x)
    if x.device.type != "cuda":
        raise ValueError(f"{op}: the mHC GEMM kernels (wgmma, TMA) run on CUDA only, x is on "
                         f"{x.device}")
    K = n * n + 2 * n
    x = x.contiguous()
    phi = check_tensor(op, phi, "phi", (n * C, K), torch.float32, x.device)
    b = check_tensor(op, b, "b", (K,), torch.float32, x.device)
    alpha = check_tensor(op, alpha, "alpha", (3,), torch.float32, x.device)
    if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 1:
        raise ValueError(f"{op}: sinkhorn_iters must be an int >= 1, got {sinkhorn_iters!r}")
    return x, phi, b, alpha


def phi_as_used(phi: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The phi the forward GEMM multiplies by (hi + lo in fp32): for a matching reference."""
    hi, lo = split_hi_lo(phi.detach(), dtype, phi.shape[1])
    return hi.float() + lo.float()


def coeffs_from_m(m, b, alpha, n, iters):
    """Kernel build_coef on a [T, K] m: (h_pre, h_post, h_res)."""
    T_ = m.shape[0]
    f32 = torch.float32
    h_pre = torch.empty(T_, n, device=m.device, dtype=f32)
    h_post = torch.empty(T_, n, device=m.device, dtype=f32)
    h_res = torch.empty(T_, n, n, device=m.device, dtype=f32)
    if T_:
        kern = build_coef(n, iters, m.device.type == "cpu")
        with on_device(m):
            kern(m, b, alpha, h_pre, h_post, h_res)
    return h_pre, h_post, h_res


def coeffs_backward(m, r, b, alpha, dh_pre, g_post, g_res, C, iters):
    """Kernel build_coef_bwd: (dlogit [T,K], du [T,K], coef [T]); all gradients given (zeros if none)."""
    T_ = m.shape[0]
    n = dh_pre.shape[1]
    dlogit = torch.empty_like(m)
    du = torch.empty_like(m)
    coef = torch.empty_like(r)
    if T_:
        kern = build_coef_bwd(n, C, iters, m.device.type == "cpu")
        with on_device(m):
            kern(m, r, b, alpha, dh_pre, g_post, g_res, dlogit, du, coef)
    return dlogit, du, coef


def apply_pre(x, h_pre):
    T_, n, C = x.shape
    out = torch.empty(T_, C, device=x.device, dtype=x.dtype)
    if T_:
        kern = build_apply(n, C, TL_DTYPES[x.dtype], x.device.type == "cpu")
        with on_device(x):
            kern(x, h_pre, out)
    return out


def dh_pre_of(x, g_li):
    T_, n, C = x.shape
    dh = torch.empty(T_, n, device=x.device, dtype=torch.float32)
    if T_:
        kern = build_dhpre(n, C, TL_DTYPES[x.dtype], x.device.type == "cpu")
        with on_device(x):
            kern(x, g_li, dh)
    return dh


def gemm_norm(x, phi, hc: bool = False):
    """(m [rows, K], r [rows]) on the GPU; rows are tokens (mHC) or (token, stream) pairs (HC)."""
    T_, n, C = x.shape
    rows, D = (T_ * n, C) if hc else (T_, n * C)
    K = phi.shape[1]
    hi, lo = split_weight_hi_lo(phi, x.dtype, kp(n, hc))
    m = torch.empty(rows, K, device=x.device, dtype=torch.float32)
    r = torch.empty(rows, device=x.device, dtype=torch.float32)
    if T_:
        kern = build_gemm_norm(n, C, TL_DTYPES[x.dtype], hc, gemm_minb())
        with on_device(x):
            kern(x.view(rows, D), hi, lo, m, r)
    return m, r


def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _ranges(rows: int, n: int, D: int, device) -> int:
    """Row blocks (of GEMM_BT) per token range of the row kernel: about 4 CTAs per SM in all, a
    power of two (few compiled variants). (dev/tilelang_precompile.py passes it to
    build_dx_dphi for every shape: the warp-specialised tile kernel ignores it.)"""
    blocks = -(-rows // GEMM_BT)
    cb = -(-D // 64)
    want = max(1, -(-4 * _num_sms(device) // cb))
    per = max(1, -(-blocks // want))
    return 1 << (per - 1).bit_length()


def _split(rows: int, n: int, D: int, device, cfg: DxConfig | None = None, hc: bool = False,
           C: int | None = None):
    """(nblk, R): token blocks per range (0: sized in the kernel from R) and the number of ranges.

    Tile kernel: the grid cdiv(D, br) x R is planned against minb CTAs per SM: the smallest R
    whose last wave is at least 90% full (else the fullest up to R = 16); fewer ranges mean a
    smaller dphi workspace. Row kernel: _ranges."""
    cfg = dx_config(cfg)
    C = D if C is None else C
    if not tile_ok(n, C, hc, cfg):
        per = _ranges(rows, n, D, device)
        return per, -(-rows // (GEMM_BT * per))
    blocks = -(-rows // cfg.bt)
    ncb = -(-D // cfg.br)
    slots = _num_sms(device) * cfg.minb
    best, best_eff = 1, 0.0
    for R in range(1, min(blocks, 16) + 1):
        waves = ncb * R / slots
        eff = waves / math.ceil(waves)
        if eff > best_eff + 1e-9:
            best, best_eff = R, eff
        if eff >= 0.9:
            best = R
            break
    if cfg.ws:
        return 0, best
    per = -(-blocks // best)
    per = 1 << (per - 1).bit_length()
    return per, -(-blocks // per)


def _du_split(du, dt, KP):
    """du * scale split into hi + lo in dt; scale a power of two that keeps lo out of fp16's
    subnormals (undone in the kernel through inv_scale). The torch form of build_dx_prep."""
    amax = du.abs().amax().clamp_min(1e-30)
    scale = torch.exp2(-torch.floor(torch.log2(amax)))
    du_hi, du_lo = split_hi_lo(du * scale, dt, KP)
    return du_hi, du_lo, (1.0 / scale).reshape(1)


def _aligned(t):
    """t, or a copy of it when its data is not 16-byte aligned (TMA needs that of every base)."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def dx_dphi_launch(x, phi, du, coef, h_pre, g_li, hc: bool = False, acc=None, cfg=None):
    """Everything dx_dphi prepares: (kernel, its arguments, dx, dphi workspace). kernel(*args)
    then writes dx (acc, when given, in place) and the workspace (summed over its first dim)."""
    T_, n, C = x.shape
    rows, D = (T_ * n, C) if hc else (T_, n * C)
    KP = kp(n, hc)
    dt = x.dtype
    cfg = dx_config(cfg)
    tile = tile_ok(n, C, hc, cfg)
    if cfg.prep:
        du_hi, du_lo, inv_scale, rowc = dx_prep(du.contiguous(), coef, h_pre, dt, hc)
    else:
        du_hi, du_lo, inv_scale = _du_split(du, dt, KP)
        rowc = None
        if tile:
            Rp = -(-rows // 8) * 8
            rowc = torch.zeros((2 if hc else n + 1), Rp, device=x.device, dtype=torch.float32)
            rowc[0, :rows] = coef.reshape(rows)
            if hc:
                rowc[1, :rows] = h_pre.reshape(rows)
            else:
                rowc[1:, :rows] = h_pre.t()
    phi_hi, phi_lo = split_weight_hi_lo(phi, dt, KP)
    nblk, R = _split(rows, n, D, x.device, cfg, hc, C)
    x = _aligned(x)
    dx = _aligned(acc) if acc is not None else torch.empty_like(x)
    ws = torch.empty(R, D, KP, device=x.device, dtype=torch.float32)
    has_li = g_li is not None
    gl = _aligned(g_li) if has_li else x.new_empty(T_, C)
    kern = build_dx_dphi(n, C, TL_DTYPES[dt], nblk, has_li, hc, acc is not None, cfg)
    if tile:
        mid = (rowc, gl)
    else:
        mid = (coef.reshape(rows), h_pre.reshape(rows, 1 if hc else n), gl)
    args = (x.view(rows, D), phi_hi, phi_lo, du_hi, du_lo, inv_scale, *mid, dx.view(rows, D), ws)
    return kern, args, dx, ws


def dx_dphi(x, phi, du, coef, h_pre, g_li, need_phi, hc: bool = False, acc=None, cfg=None):
    """(dx, dphi): dx = du @ phi^T + coef * x (+ h_pre * g_li) (+ acc), dphi = x^T @ du, over 2-D
    rows (mHC: tokens; HC: (token, stream) pairs). acc: a [T, n, C] gradient in x's dtype that dx
    is added to in place (and returned as dx). cfg: a DxConfig, a dict of its fields, or None
    (DX_CONFIG, with HCBENCH_TL_DX applied)."""
    kern, args, dx, ws = dx_dphi_launch(x, phi, du, coef, h_pre, g_li, hc, acc, cfg)
    with on_device(x):
        kern(*args)
    dphi = ws.sum(0)[:, :phi.shape[1]] if need_phi else None
    return dx, dphi


def _forward(x, phi, b, alpha, iters, with_li):
    m, r = gemm_norm(x, phi)
    h_pre, h_post, h_res = coeffs_from_m(m, b, alpha, x.shape[1], iters)
    li = apply_pre(x, h_pre) if with_li else None
    return li, h_pre, h_post, h_res, m, r


def _backward(x, phi, b, alpha, m, r, h_pre, iters, g_first, g_post, g_res, with_li, needs,
              acc=None):
    """acc: post's x gradient handed over through the site link (added into dx in place)."""
    T_, n, C = x.shape
    f32 = torch.float32
    dev = x.device
    if with_li:
        g_li = g_first.to(x.dtype).contiguous() if g_first is not None else None
        dh = dh_pre_of(x, g_li) if g_li is not None else torch.zeros(T_, n, device=dev, dtype=f32)
    else:
        g_li = None
        dh = g_first.to(f32).contiguous() if g_first is not None else torch.zeros(T_, n, device=dev,
                                                                                 dtype=f32)
    gp = g_post.to(f32).contiguous() if g_post is not None else torch.zeros(T_, n, device=dev, dtype=f32)
    gr = g_res.to(f32).contiguous() if g_res is not None else torch.zeros(T_, n, n, device=dev, dtype=f32)
    dlogit, du, coef = coeffs_backward(m, r, b, alpha, dh, gp, gr, C, iters)
    need_x, need_phi, need_b, need_alpha = needs
    dx = dphi = db = dalpha = None
    if need_x or need_phi:
        if T_:
            dx, dphi = dx_dphi(x, phi, du, coef, h_pre, g_li, need_phi,
                               acc=acc if need_x else None)
        else:
            dx = acc if acc is not None else torch.zeros_like(x)
            dphi = torch.zeros_like(phi)
    if need_b or need_alpha:
        K = dlogit.shape[1]
        sums = column_sums(dlogit, dlogit * m) if need_alpha else column_sums(dlogit)
        db = sums[:K] if need_b else None
        dalpha = segment_sums(sums[K:], (n, n, n * n)) if need_alpha else None
    return (dx if need_x else None), (dphi if need_phi else None), db, dalpha


class _MhcFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, b, alpha, iters, with_li, holder):
        li, h_pre, h_post, h_res, m, r = _forward(x, phi, b, alpha, iters, with_li)
        ctx.set_materialize_grads(False)
        ctx.iters, ctx.with_li, ctx.holder = iters, with_li, holder
        ctx.save_for_backward(x, phi, b, alpha, m, r, h_pre)
        return (li if with_li else h_pre), h_post, h_res

    @staticmethod
    def backward(ctx, g_first, g_post, g_res):
        needs = tuple(ctx.needs_input_grad[:4])
        x, phi, b, alpha, m, r, h_pre = ctx.saved_tensors
        # post's x gradient, when a linked post handed it over (kernels/site_link.py): taken on
        # every path, returned as dx when nothing else flows back
        acc = site_link.accumulator(ctx.holder[0], x) if needs[0] else None
        if (g_first is None and g_post is None and g_res is None) or not any(needs):
            return acc, None, None, None, None, None, None
        grads = _backward(x, phi, b, alpha, m, r, h_pre, ctx.iters, g_first, g_post, g_res,
                          ctx.with_li, needs, acc)
        return (*grads, None, None, None)


def _apply(x_user, x, phi, b, alpha, iters, with_li):
    """_MhcFn with h_res linked to the caller's x (kernels/site_link.py) when a gradient may be
    needed: a fused post of that x and h_res then hands its dx to this backward."""
    holder = [None]
    out = _MhcFn.apply(x, phi, b, alpha, iters, with_li, holder)
    if torch.is_grad_enabled() and x_user.requires_grad:
        holder[0] = site_link.attach(out[2], x_user)
    return out


def mhc_coeffs(x, phi, b, alpha, sinkhorn_iters: int = 20):
    """(h_pre [T,n], h_post [T,n], h_res [T,n,n]) in fp32, h_res indexed [token, dst, src]."""
    xc, phi, b, alpha = _check("mhc_coeffs", x, phi, b, alpha, sinkhorn_iters)
    return _apply(x, xc, phi, b, alpha, sinkhorn_iters, False)


def mhc_pre(x, phi, b, alpha, sinkhorn_iters: int = 20):
    """(layer_input [T,C] in x.dtype, h_post [T,n] fp32, h_res [T,n,n] fp32)."""
    xc, phi, b, alpha = _check("mhc_pre", x, phi, b, alpha, sinkhorn_iters)
    return _apply(x, xc, phi, b, alpha, sinkhorn_iters, True)
