"""The fused boundary of a chain of mHC sites (kernels/chain.py) in TileLang: F_post,res of site l
fused with the coefficients of site l+1, the layer_input op that goes with it, and their backward.
Same contract as kernels/triton/post_coeffs.py.

Public functions (same results as kernels.reference, autograd-enabled):
    post_coeffs(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters=20, *, config=None)
        -> (x_next [T,n,C] x.dtype, h_pre, h_post [T,n] fp32, h_res [T,n,n] fp32)
       x, f, h_post, h_res: site l's post inputs; phi, b, alpha and the coefficients returned:
       site l+1's (reference.mhc_post_coeffs)
    layer_input(x, h_pre) -> layer_input [T,C] x.dtype    (Ops.apply_pre)
`config=` (a dict of Config's fields) overrides the launch sizes below.

Forward, per token (e = bytes of x's dtype), fused as the Triton version is:
  `build_fwd` (post_coeffs_kernels.py), grid (column slices of cw columns of every stream, token
  blocks of bt), one thread per token: reads x [n rows] and f of its slice V columns at a time
  (post_coeffs_kernels.vector_width: a 16-byte vector of each row, 8 bytes at n > 4), writes x_next = h_res x + h_post f, and with each value of x_next still in registers (as
  stored, rounded to x's dtype) adds its products with phi's row (fp32 FMAs, phi in fp32: every
  thread of a warp reads the same row, one broadcast load) and its square into K + 1 fp32
  accumulators. Each slice writes them to row (s, t) of a [S, T, K+1] buffer: every row has one
  writer, no atomics. Reads (n+1)C*e, writes nC*e + S(K+1)*4.
  `build_finish`, one thread per token: the S partials summed in slice order (deterministic),
  r, m = products / r, then the gates and the Sinkhorn iterations of mhc_pre's own macro
  (coef_kernels.sinkhorn_macros); writes h_pre, h_post, h_res and m [T,K], r [T] (the backward's).
  layer_input: mhc_pre's apply kernel (stream_kernels.build_apply) reads x_next once: nC*e in,
  C*e out. A site then moves (3n+2)C*e: MATH.md's floor for a chain site.
  What is not done yet: the products run on CUDA cores, not tensor cores (K FMAs per element of
  x_next: 24 at n = 4, 80 at n = 8), and a thread per token moves a vector of a row at a time, nC*e apart
  from its neighbours' (a warp's load touches 32 lines and uses part of each 32-byte sector; L1
  keeps the rest for the next columns). Compiled for sm_90a (nvcc), not yet run or
  timed on a GPU.

Backward, per boundary, fused but for dphi; g_x is the next post's gradient of x_next, g_li
layer_input's (handed over by kernels/boundary_link.py, so layer_input's own backward does
nothing; that module says when the hand-over stays off):
  1. dh_pre = sum_c g_li x_next (stream_kernels.build_dhpre, mhc_pre's): reads x_next, g_li.
  2. the gate and Sinkhorn backward from the saved m and r (coef_kernels.build_coef_bwd,
     mhc_pre's): du = dm / r [T,K], coef [T]; db, dalpha summed by torch (kernels.colsum).
  3. `build_bwd`, the forward's grid and threads (one per token, slices of cw columns): per V
     columns it forms the whole gradient of x_next in registers, never written,
        G = g_x + du @ phi^T + coef x_next + h_pre g_li
     (phi's rows read by all threads of a warp at once, as in the forward), and runs F_post,res's
     backward on it: dx = h_res^T G, df = h_post . G, and the slice's partial C-sums
     dh_post = G . f, dh_res = G . x into fp32 [S, T, n + n*n] (summed over slices by torch, in
     order). Reads g_x, x_next, x (nC*e each), f, g_li (C*e each); writes dx (nC*e), df (C*e).
  4. `build_dphi`, one thread per column of [n, C] over a token range: dphi = x_next^T du into
     fp32 partials [ranges, nC, K] (summed by torch in range order). Reads x_next (nC*e).
  Per site the backward moves (6n+4)C*e: x_next three times, g_x, x (5nC) and g_li twice, f
  (3C) read; dx, df (n+1)C written. MATH.md's floor for a chain site is (5n+4)C*e (28C against
  24C at n = 4): the Triton kernel adds dphi's x_next^T du on the tiles of step 3, a sum over
  tokens, with tensor-core dots over a token block. Here a thread holds one token, so that sum
  would cross threads; step 4 reads x_next once more instead.
  dx of site l is post(l)'s share only; site l's own coefficient and layer_input shares join it
  in boundary l-1 -> l (step 3 of that boundary). At site 0 dx goes through the site link
  (kernels/site_link.py) into mhc_pre's dx kernel.
Both directions are deterministic: every partial has one writer and is summed in a fixed order.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from kernels import boundary_link
from kernels.colsum import column_sums, segment_sums
from kernels.tilelang.common import (TL_DTYPES, check_device, check_state, check_tensor, on_device,
                                     pow2_at_least, supports)
from kernels.tilelang.mhc_pre import apply_pre, coeffs_backward, dh_pre_of
from kernels.tilelang.post_coeffs_kernels import build_bwd, build_dphi, build_finish, build_fwd

OP = "post_coeffs"
F32 = torch.float32


@dataclass(frozen=True)
class Config:
    # forward: a CTA is bt tokens (one thread each) x one slice of cw columns of every stream;
    # cw is halved (down to min_cw) until there are min_items CTAs per SM (cdiv(C, cw) partials
    # of (K + 1) * 4 bytes a token)
    bt: int = 128
    cw: int = 512
    min_cw: int = 64
    min_items: int = 2
    # CTAs per SM the forward / the backward's main kernel are compiled for (registers per
    # thread <= 65536 / (128 * minb)); 0: from n (minb_of)
    fwd_minb: int = 0
    bwd_minb: int = 0
    # (the backward's main kernel runs on the forward's grid, bt and cw)
    # backward's dphi kernel: nt columns (threads) per CTA, the tokens cut into ranges of a
    # power of two >= bwd_min_tps tokens so there are >= bwd_items CTAs per SM
    nt: int = 128
    bwd_min_tps: int = 16
    bwd_items: int = 4


def _config(config) -> Config:
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    names = {f.name for f in fields(Config)}
    unknown = sorted(set(config) - names)
    if unknown:     # a knob that does nothing must not pass for a tuned run
        raise ValueError(f"{OP}: unknown setting {', '.join(unknown)}; config takes "
                         f"{', '.join(sorted(names))}")
    return replace(Config(), **dict(config))


# Registers of the sm_90a compile (ptxas -v, C = 4096, bf16): one thread holds a token's mixing
# and K or more fp32 accumulators, and unrolled, the compiler keeps many phi loads in flight.
# Unbounded, the forward takes 255 registers from n = 4 on (2 CTAs per SM). The bounds below are
# the tightest without spills: forward 128 registers at n <= 4, 168 at n = 5; backward 128 at
# n <= 2, 168 at n = 4 (n = 3 spills at 168, so it keeps 255, as n >= 6 does; n = 8's backward
# spills 392 bytes even at 255). Not timed: fewer registers mean more tokens in flight, but fewer phi
# loads ahead.
FWD_MINB = {1: 4, 2: 4, 3: 4, 4: 4, 5: 3}
BWD_MINB = {1: 4, 2: 4, 4: 3}


def minb_of(n: int, cfg: Config = Config()) -> tuple[int, int]:
    """(forward, backward) CTAs per SM the kernels are compiled for."""
    return cfg.fwd_minb or FWD_MINB.get(n, 1), cfg.bwd_minb or BWD_MINB.get(n, 1)


def sm_count(device) -> int:
    # the CPU target has no SMs: 4, so that small test shapes still split into several slices
    return torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 4


def fwd_sizes(C: int, T: int, sms: int, cfg: Config = Config()) -> tuple[int, int, int]:
    """(bt, cw, S) of the forward kernel for T tokens on `sms` SMs (dev/tilelang_precompile.py
    compiles what this picks)."""
    bt = pow2_at_least(max(1, cfg.bt))
    groups = -(-T // bt)
    # (multiples of 8: the kernel moves 16-byte vectors, 8 columns of a row)
    cw = max(8, min(cfg.cw, C) // 8 * 8)
    while cw > cfg.min_cw and groups * -(-C // cw) < cfg.min_items * sms:
        cw = max(cfg.min_cw, cw // 2) // 8 * 8 or 8
    return bt, cw, -(-C // cw)


def bwd_sizes(n: int, C: int, T: int, sms: int, cfg: Config = Config()) -> tuple[int, int, int]:
    """(nt, tps, R) of the dphi kernel: threads per CTA, tokens per range, ranges."""
    nt = pow2_at_least(max(1, cfg.nt))
    cbs = -(-(n * C) // nt)
    want = max(1, -(-cfg.bwd_items * sms // cbs))
    tps = pow2_at_least(max(cfg.bwd_min_tps, -(-T // want)))
    return nt, tps, -(-T // tps)


def _forward(x, f, h_post, h_res, phi, b, alpha, iters, cfg: Config):
    T, n, C = x.shape
    K = n * n + 2 * n
    dev = x.device
    cpu = dev.type == "cpu"
    x_next = torch.empty_like(x)
    h_pre = torch.empty(T, n, device=dev, dtype=F32)
    h_post_n = torch.empty(T, n, device=dev, dtype=F32)
    h_res_n = torch.empty(T, n, n, device=dev, dtype=F32)
    m = torch.empty(T, K, device=dev, dtype=F32)
    r = torch.empty(T, device=dev, dtype=F32)
    if T == 0:
        return x_next, h_pre, h_post_n, h_res_n, m, r
    bt, cw, S = fwd_sizes(C, T, sm_count(dev), cfg)
    ws = torch.empty(S, T, K + 1, device=dev, dtype=F32)
    with on_device(x):
        build_fwd(n, C, TL_DTYPES[x.dtype], bt, cw, cpu, 1 if cpu else minb_of(n, cfg)[0])(
            x, f, h_post, h_res, phi, x_next, ws)
        build_finish(n, C, S, iters, cpu)(ws, b, alpha, m, r, h_pre, h_post_n, h_res_n)
    return x_next, h_pre, h_post_n, h_res_n, m, r


def _coef_backward(x_next, m, r, b, alpha, iters, g_li, g_hpre, g_hpost, g_hres, needs_sums):
    """du [T, K], coef [T] and the db / dalpha sums of the next site's coefficients."""
    T, n, C = x_next.shape
    dev = x_next.device
    dh = dh_pre_of(x_next, g_li) if g_li is not None else torch.zeros(T, n, device=dev, dtype=F32)
    if g_hpre is not None:      # h_pre also feeds something besides layer_input
        dh = dh + g_hpre.to(F32)
    gp = g_hpost.to(F32).contiguous() if g_hpost is not None else torch.zeros(T, n, device=dev,
                                                                              dtype=F32)
    gr = g_hres.to(F32).contiguous() if g_hres is not None else torch.zeros(T, n, n, device=dev,
                                                                            dtype=F32)
    dlogit, du, coef = coeffs_backward(m, r, b, alpha, dh.contiguous(), gp, gr, C, iters)
    K = m.shape[1]
    need_b, need_alpha = needs_sums
    db = dalpha = None
    if need_b or need_alpha:
        sums = column_sums(dlogit, dlogit * m) if need_alpha else column_sums(dlogit)
        db = sums[:K] if need_b else None
        dalpha = segment_sums(sums[K:], (n, n, n * n)) if need_alpha else None
    return du, coef, db, dalpha


def _dphi(x_next, du, cfg: Config):
    T, n, C = x_next.shape
    K = du.shape[1]
    nt, tps, R = bwd_sizes(n, C, T, sm_count(x_next.device), cfg)
    ws = torch.empty(R, n * C, K, device=x_next.device, dtype=F32)
    with on_device(x_next):
        build_dphi(n, C, TL_DTYPES[x_next.dtype], nt, tps, x_next.device.type == "cpu")(
            x_next, du, ws)
    return ws[0] if R == 1 else ws.sum(0)


def _post_backward(g_x, x_next, x, f, h_post, h_res, phi, du, coef, h_pre, g_li, needs,
                   cfg: Config):
    """(dx, df, dh_post, dh_res), each None where not needed: step 3 of the backward."""
    need_x, need_f, need_hpost, need_hres = needs
    need_dh = need_hpost or need_hres
    T, n, C = x.shape
    dev = x.device
    bt, cw, S = fwd_sizes(C, T, sm_count(dev), cfg)
    # (x or f stands in for an output or input the variant leaves alone)
    dx = torch.empty_like(x) if need_x else x
    df = torch.empty_like(f) if need_f else f
    dh = torch.empty(S, T, n + n * n, device=dev, dtype=F32) if need_dh else du.new_empty(1, T, n + n * n)
    cpu = dev.type == "cpu"
    kern = build_bwd(n, C, TL_DTYPES[x.dtype], bt, cw, g_x is not None, g_li is not None,
                     need_x, need_f, need_dh, cpu, 1 if cpu else minb_of(n, cfg)[1])
    with on_device(x):
        kern(g_x if g_x is not None else x, x_next, x, f, h_post, h_res, phi, du, coef, h_pre,
             g_li if g_li is not None else f, dx, df, dh)
    dh_sum = (dh[0] if S == 1 else dh.sum(0)) if need_dh else None
    return (dx if need_x else None, df if need_f else None,
            dh_sum[:, :n] if need_hpost else None,
            dh_sum[:, n:].reshape(T, n, n) if need_hres else None)


def _backward(saved, g_x, g_hpre, g_hpost, g_hres, g_li, needs, iters, cfg: Config):
    x, f, h_post, h_res, phi, b, alpha, x_next, m, r, h_pre = saved
    need_x, need_f, need_hpost, need_hres, need_phi, need_b, need_alpha = needs
    g_x = g_x.to(x.dtype).contiguous() if g_x is not None else None
    du, coef, db, dalpha = _coef_backward(x_next, m, r, b, alpha, iters, g_li, g_hpre, g_hpost,
                                          g_hres, (need_b, need_alpha))
    dx = df = dh_post = dh_res = None
    if need_x or need_f or need_hpost or need_hres:
        dx, df, dh_post, dh_res = _post_backward(g_x, x_next, x, f, h_post, h_res, phi, du, coef,
                                                 h_pre, g_li, needs[:4], cfg)
    dphi = _dphi(x_next, du, cfg) if need_phi else None
    return dx, df, dh_post, dh_res, dphi, db, dalpha


# (TileLang's forward always keeps the norm's m and r: they cost O(K) a token)
_boundary = boundary_link.boundary_function(
    OP, lambda x, f, h_post, h_res, phi, b, alpha, iters, save, cfg:
        _forward(x, f, h_post, h_res, phi, b, alpha, iters, cfg), _backward, supports, check_device)


class _LayerInputFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre, link):
        ctx.set_materialize_grads(False)
        ctx.link = link
        ctx.save_for_backward(x, h_pre)
        return apply_pre(x, h_pre)

    @staticmethod
    def backward(ctx, g):
        if g is None or boundary_link.hand_over(ctx, ctx.link, g):
            return None, None, None
        # Not at a linked boundary: layer_input's own backward (x read again, its gradient written).
        x, h_pre = ctx.saved_tensors
        g = g.to(x.dtype).contiguous()
        dx = (h_pre.unsqueeze(-1) * g.float().unsqueeze(1)).to(x.dtype) \
            if ctx.needs_input_grad[0] else None
        dh = dh_pre_of(x, g) if ctx.needs_input_grad[1] else None
        return dx, dh, None


def post_coeffs(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters: int = 20, *, config=None):
    """(x_next [T,n,C] x.dtype, h_pre [T,n], h_post [T,n], h_res [T,n,n] fp32): F_post,res of a
    site, then the next site's mHC coefficients from x_next (phi, b, alpha are the next site's).
    x [T,n,C] bf16/fp16 (n in 1..8, C a multiple of 8), f [T,C] x's dtype, h_post [T,n] and
    h_res [T,n,n] fp32 [token, dst, src], phi [n*C, n*n+2n], b [n*n+2n], alpha [3] fp32."""
    return _boundary(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters, _config(config))


def layer_input(x, h_pre):
    """layer_input [T,C] = sum_i h_pre[:, i] x[:, i] in x's dtype (fp32 accumulation),
    differentiable. Given post_coeffs' own x_next and h_pre, its backward is done inside
    post_coeffs' backward (kernels/boundary_link.py)."""
    T, n, C = check_state("layer_input", x, "x")
    link = boundary_link.claim(x, h_pre)
    h_pre = check_tensor("layer_input", h_pre, "h_pre", (T, n), F32, x.device)
    return _LayerInputFn.apply(x.contiguous(), h_pre, link)
