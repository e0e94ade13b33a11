"""The fused boundary of a chain of mHC sites (kernels/chain.py) in Triton: F_post,res of site l
fused with the coefficients of site l+1, the layer_input op that goes with it, and their backward.

Public functions (same results as kernels.reference, autograd-enabled):
    post_coeffs(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters=20, *, config=None)
        -> (x_next [T,n,C] x.dtype, h_pre, h_post [T,n] fp32, h_res [T,n,n] fp32)
       x, f, h_post, h_res: site l's post inputs; phi, b, alpha and the coefficients returned:
       site l+1's (reference.mhc_post_coeffs)
    layer_input(x, h_pre, *, config=None) -> layer_input [T,C] x.dtype    (Ops.apply_pre)
`config=` (dict or Config, kernels/triton/post_coeffs_config.py) overrides the launch
configuration; every field can also be set as HCBENCH_POST_COEFFS_<FIELD>.

Forward, per token (e = bytes of x's dtype):
  `post_coeffs_fwd_kernel` (post_coeffs_fwd.py), one program per (BT tokens, column slice of cw
  columns of every stream): reads x [n rows] and f of its slice chunk by chunk, writes x_next =
  h_res x + h_post f, and while the chunk of x_next is still in registers multiplies it (as
  stored, in x's dtype) by phi's hi and lo halves on tensor cores and sums its squares. Each slice
  writes its partial products and sums of squares to rows (s, t) of fp32 buffers [S, T, K] and
  [S, T]: every row has one writer, no atomics. Reads (n+1)C*e, writes nC*e + S(K+1)*4.
  `coeffs_finish_kernel`: per token, the S partials summed in slice order (deterministic), then
  r, 1/r, alpha, bias, sigmoid, 2*sigmoid and the Sinkhorn iterations (kernels/triton/sinkhorn.py);
  writes h_pre, h_post, h_res and, when a gradient is needed, m [K] and r for the backward.
  layer_input: the apply kernel (kernels/triton/apply_pre.py) reads x_next once: nC*e in, C*e out.
  A site then moves (3n+2)C*e: MATH.md's floor for a chain site.

Backward, per boundary, two kernels plus small sums; g_x is the next post's gradient of x_next,
g_li layer_input's (handed over by kernels/boundary_link.py, so layer_input's own backward does
nothing; that module says when the hand-over stays off and layer_input computes its own):
  `bwd_coef_kernel` (kernels/triton/mhc_pre_bwd.py, mhc_pre's own): dh_pre = sum_c g_li x_next
  (reads x_next and g_li), the gate and Sinkhorn backward from the saved m and r, and the norm's
  chain rule; writes du = dm/r [T, K], coef [T], per-program db / dalpha partials.
  `post_coeffs_bwd_kernel` (post_coeffs_bwd.py), one program per (br columns of every stream,
  token range): per token block it forms the whole gradient of x_next on chip,
      G = g_x + du @ phi^T + coef x_next + h_pre g_li,
  never written, and runs F_post,res's backward on it: dx = h_res^T G, df = h_post . G, and the
  partial C-sums dh_post = G . f and dh_res = G . x of its columns; dphi += x_next^T du on the same
  tiles (bf16 x: x as loaded times du's hi + lo halves). Reads g_x, x_next, x (nC*e each), f and
  g_li (C*e each); writes dx (nC*e) and df (C*e), plus fp32 partials: dh [C/br, T, n + n*n]
  (summed over column blocks by torch, in order) and dphi [token ranges, nC, K].
  Per site the backward moves (5n+4)C*e (g_x, x_next twice, x, f, g_li twice read; dx, df
  written): MATH.md's backward floor for a chain site with F between the sites. dx of site l is
  post(l)'s share only; site l's own coefficient and layer_input shares join it on chip in the
  boundary l-1 -> l. At site 0 (mhc_pre of kernels/triton/mhc_pre.py) dx goes through the site
  link (kernels/site_link.py) into mhc_pre's dx kernel.
By default both directions are deterministic: every partial has one writer and is summed in a
fixed order. `reduction="atomic"` (post_coeffs_config.py) instead adds the forward's slices, the
backward's column blocks (dh) and token ranges (dphi) with fp32 atomics into one zeroed buffer
each: no [S, T, K] buffer and no summing pass, but the order of the additions, so the last bits,
may change between runs. Which one is faster is a GPU measurement (dev/tune_chain.py); a run's
records name the one that ran (kernel_settings).
Not yet timed on a GPU either: the launch defaults (post_coeffs_config.py) are sized from the
registers of the sm_90 compile; dev/tune_chain.py times them against the unfused chain.
"""
from __future__ import annotations

import contextlib

import torch
import triton

from kernels import boundary_link
from kernels.colsum import column_sums
from kernels.hilo import split_weight_hi_lo
from kernels.reference import EPS_RMS, EPS_SK
from kernels.triton.apply_pre import apply_pre
from kernels.triton.common import (check_device, check_state, check_tensor, coef_shapes, interpreting, np2,
                                   num_sms, resident_ctas, supports)
from kernels.triton.mhc_pre import coef_backward
from kernels.triton.post_coeffs_bwd import post_coeffs_bwd_kernel
from kernels.triton.post_coeffs_config import Config, config_of
from kernels.triton.post_coeffs_fwd import coeffs_finish_kernel, post_coeffs_fwd_kernel

OP = "post_coeffs"
F32 = torch.float32


def _on(device):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def default_bc(n: int) -> int:
    """Columns per chunk where the config leaves bc at 0, sized for two programs an SM at bt 32
    and 8 warps (sm_90, C = 4096, triton 3.9, dev/sm90_occupancy.py): 64 at n <= 2 (91-118
    registers); 32 at n = 3 and 5-7 (100-127; 64 takes 136 at n = 3); 16 at n = 8 (118; 32 takes
    159). n = 4 keeps 64: 166 registers, one program an SM, against 96 and two at 16 columns, until
    a GPU run compares them (dev/gpu_chain_diagnostics.sh times both)."""
    return 64 if n <= 2 or n == 4 else 32 if n <= 7 else 16


def fwd_sizes(n: int, T: int, C: int, sms: int, cfg: Config) -> tuple[int, int, int]:
    """The forward's launch sizes (bt, bc, cw) for x [T, n, C] on `sms` SMs: the config's, made
    powers of two, bc from n where the config leaves it at 0, and the slice width halved until
    there are min_items * sms work items."""
    bt = max(16, min(np2(cfg.bt), np2(T)))
    bc = max(16, np2(cfg.bc)) if cfg.bc > 0 else default_bc(n)
    cw = max(bc, cfg.cw // bc * bc)
    groups = triton.cdiv(T, bt)
    while cw > bc and groups * triton.cdiv(C, cw) < cfg.min_items * sms:
        cw = max(bc, cw // 2 // bc * bc)
    return bt, bc, cw


def _forward(x, f, h_post, h_res, phi, b, alpha, iters, save, cfg: Config):
    T, n, C = x.shape
    K, NP, KP = coef_shapes(n)
    dev = x.device
    x_next = torch.empty_like(x)
    h_pre = torch.empty(T, n, device=dev, dtype=F32)
    h_post_n = torch.empty(T, n, device=dev, dtype=F32)
    h_res_n = torch.empty(T, n, n, device=dev, dtype=F32)
    m = torch.empty(T, K, device=dev, dtype=F32) if save else h_pre
    r = torch.empty(T, device=dev, dtype=F32) if save else h_pre
    if T == 0:
        return x_next, h_pre, h_post_n, h_res_n, m, r
    bt, bc, cw = fwd_sizes(n, T, C, num_sms(dev, interpreter_sms=4), cfg)
    groups = triton.cdiv(T, bt)
    S = triton.cdiv(C, cw)
    atomic = cfg.reduction == "atomic"
    rows = 1 if atomic else S          # partial rows the finishing kernel sums
    alloc = torch.zeros if atomic else torch.empty
    ws = alloc(rows, T, K, device=dev, dtype=F32)
    wss = alloc(rows, T, device=dev, dtype=F32)
    phi_hi, phi_lo = split_weight_hi_lo(phi, x.dtype, KP)
    post_coeffs_fwd_kernel[(groups * S,)](
        x, f, h_post, h_res, phi_hi, phi_lo, x_next, ws, wss, T, C, S, cw // bc,
        N=n, K=K, KP=KP, BT=bt, BC=bc, STAGES=cfg.stages, ATOMIC=atomic, UNROLL=bool(cfg.unroll),
        DOT_F32=interpreting(),
        num_warps=cfg.warps)
    fbt = max(1, min(np2(cfg.fin_bt), np2(T)))
    coeffs_finish_kernel[(triton.cdiv(T, fbt),)](
        ws, wss, b, alpha, h_pre, h_post_n, h_res_n, m, r, T, n * C, rows, iters,
        N=n, NP=NP, K=K, BT=fbt, SAVE=save, EPS_RMS=EPS_RMS, EPS_SK=EPS_SK,
        num_warps=cfg.fin_warps)
    return x_next, h_pre, h_post_n, h_res_n, m, r


def _coef_backward(x_next, m, r, b, alpha, iters, g_li, g_hpre, g_hpost, g_hres, cfg: Config):
    """du [T, K], coef [T] and the db / dalpha sums of the next site's coefficients."""
    T, n, C = x_next.shape
    K = coef_shapes(n)[0]
    dev = x_next.device
    if g_li is None and g_hpre is None and g_hpost is None and g_hres is None:
        return (torch.zeros(T, K, device=dev, dtype=F32), torch.zeros(T, device=dev, dtype=F32),
                torch.zeros(K, device=dev, dtype=F32), torch.zeros(3, device=dev, dtype=F32))
    if g_li is not None and g_hpre is not None:
        # h_pre also feeds something besides layer_input: one h_pre gradient for the kernel
        g_hpre = g_hpre + torch.einsum("tc,tic->ti", g_li.float(), x_next.float())
        g_li = None
    du, coef, dbp, dap = coef_backward(x_next, g_li, g_hpre, g_hpost, g_hres, m, r, b, alpha,
                                       iters, cfg)
    sums = column_sums(dbp, dap)
    return du, coef, sums[:K], sums[K:]


def _br(cfg: Config, NP: int, KP: int) -> int:
    if cfg.b2_br > 0:
        return max(16, np2(cfg.b2_br))
    # registers: the [NP * br, KP] dphi accumulator and phi^T tile live for the whole program and
    # the [BT, NP * br] tiles for a token block; NP * br <= 256 and NP * br * KP <= 8192 compile
    # to 142 / 172 / 169 registers at n = 1 / 4 / 8 (sm_90, 8 warps, no spills)
    return max(16, min(256 // NP, 1 << (8192 // (NP * KP)).bit_length() - 1))


def _backward(saved, g_x, g_hpre, g_hpost, g_hres, g_li, needs, iters, cfg: Config):
    x, f, h_post, h_res, phi, b, alpha, x_next, m, r, h_pre = saved
    need_x, need_f, need_hpost, need_hres, need_phi, need_b, need_alpha = needs
    T, n, C = x.shape
    K, NP, KP = coef_shapes(n)
    dev = x.device
    du, coef, db, dalpha = _coef_backward(
        x_next, m, r, b, alpha, iters, g_li,
        *(g.contiguous() if g is not None else None for g in (g_hpre, g_hpost, g_hres)), cfg)
    dx = df = dh_post = dh_res = dphi = None
    need_dh = need_hpost or need_hres
    if need_x or need_f or need_dh or need_phi:
        bt2 = max(16, min(np2(cfg.b2_bt), np2(T)))
        br = _br(cfg, NP, KP)
        ncb = triton.cdiv(C, br)
        nblk = triton.cdiv(T, bt2)
        if cfg.precision not in ("tf32", "tf32x3", "ieee"):
            raise ValueError(f"{OP}: precision must be 'tf32', 'tf32x3' or 'ieee', got {cfg.precision!r}")
        atomic = cfg.reduction == "atomic"
        alloc = torch.zeros if atomic else torch.empty
        dx = torch.empty_like(x) if need_x else x
        df = torch.empty_like(f) if need_f else f
        dhp = alloc(1 if atomic else ncb, T, n, device=dev, dtype=F32) if need_dh else du
        dhr = alloc(1 if atomic else ncb, T, n, n, device=dev, dtype=F32) if need_dh else du
        g_x = g_x.to(x.dtype).contiguous() if g_x is not None else None
        args = [g_x if g_x is not None else x, x_next, x, f, h_post, h_res, phi, du, coef, h_pre,
                g_li if g_li is not None else f, dx, df, dhp, dhr]
        kw = dict(N=n, NP=NP, K=K, KP=KP, BT=bt2, BR=br, STAGES=cfg.b2_stages,
                  HAS_GX=g_x is not None, HAS_LI=g_li is not None, NEED_DX=need_x, NEED_DF=need_f,
                  NEED_DH=need_dh, DPHI=need_phi, PREC=cfg.precision,
                  DPHI_BF16=x.dtype == torch.bfloat16 and cfg.precision == "tf32",
                  ATOMIC=atomic, DOT_F32=interpreting(), num_warps=cfg.b2_warps)
        if cfg.b2_ts > 0:
            ts = min(cfg.b2_ts, nblk)
        else:   # the fewest token ranges within 5% of the fewest waves x work per program, for
                # the programs that fit on an SM (b2_ctas, 0: from the compiled kernel)
            ctas = cfg.b2_ctas if cfg.b2_ctas > 0 else resident_ctas(
                post_coeffs_bwd_kernel, args + [du, T, C, ncb, bt2, 3], kw, 1)
            slots = ctas * num_sms(dev, interpreter_sms=4)
            t_k = {k: triton.cdiv(k * ncb, slots) / k for k in range(1, min(nblk, 64) + 1)}
            ts = min(k for k, v in t_k.items() if v <= 1.05 * min(t_k.values()))
        tps = triton.cdiv(nblk, ts) * bt2
        ts = triton.cdiv(T, tps)
        dphi_ws = alloc(1 if atomic else ts, n * C, K, device=dev, dtype=F32) if need_phi else du
        post_coeffs_bwd_kernel[(ncb * ts,)](*args, dphi_ws, T, C, ncb, tps, ts, **kw)
        if not need_x:
            dx = None
        if not need_f:
            df = None
        if need_dh:
            dh_post = (dhp[0] if dhp.shape[0] == 1 else dhp.sum(0)) if need_hpost else None
            dh_res = (dhr[0] if dhr.shape[0] == 1 else dhr.sum(0)) if need_hres else None
        if need_phi:
            dphi = dphi_ws[0] if dphi_ws.shape[0] == 1 else dphi_ws.sum(0)
    return (dx, df, dh_post, dh_res, dphi, db if need_b else None, dalpha if need_alpha else None)


_boundary = boundary_link.boundary_function(OP, _forward, _backward, supports, check_device, _on)


class _LayerInputFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre, link, cfg):
        T, n, C = x.shape
        li = torch.empty(T, C, device=x.device, dtype=x.dtype)
        if T:
            with _on(x.device):
                apply_pre(x, h_pre, li, np2(cfg.apply_bt), np2(cfg.apply_bc))
        ctx.set_materialize_grads(False)
        ctx.link = link
        ctx.save_for_backward(x, h_pre)
        return li

    @staticmethod
    def backward(ctx, g):
        if g is None or boundary_link.hand_over(ctx, ctx.link, g):
            return None, None, None, None
        # Not at a linked boundary: the unfused backward (x read again, its gradient written).
        x, h_pre = ctx.saved_tensors
        gf = g.float()
        dx = (h_pre.unsqueeze(-1) * gf.unsqueeze(1)).to(x.dtype) if ctx.needs_input_grad[0] else None
        dh = torch.einsum("tc,tic->ti", gf, x.float()) if ctx.needs_input_grad[1] else None
        return dx, dh, None, None


def post_coeffs(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters: int = 20, *, config=None):
    """(x_next [T,n,C] x.dtype, h_pre [T,n], h_post [T,n], h_res [T,n,n] fp32): F_post,res of a
    site, then the next site's mHC coefficients from x_next (phi, b, alpha are the next site's).
    x [T,n,C] bf16/fp16 (n in 1..8, C a multiple of 8), f [T,C] x's dtype, h_post [T,n] and
    h_res [T,n,n] fp32 [token, dst, src], phi [n*C, n*n+2n], b [n*n+2n], alpha [3] fp32."""
    return _boundary(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters, config_of(config))


def layer_input(x, h_pre, *, config=None):
    """layer_input [T,C] = sum_i h_pre[:, i] x[:, i] in x's dtype (fp32 accumulation),
    differentiable. Given post_coeffs' own x_next and h_pre, its backward is done inside
    post_coeffs' backward (kernels/boundary_link.py)."""
    T, n, C = check_state("layer_input", x, "x")
    link = boundary_link.claim(x, h_pre)
    h_pre = check_tensor("layer_input", h_pre, "h_pre", (T, n), F32, x.device)
    return _LayerInputFn.apply(x.contiguous(), h_pre, link, config_of(config))
