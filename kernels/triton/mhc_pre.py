"""mHC coefficients (norm + GEMM + Sinkhorn) fused with F_pre, and their backward, in Triton.

Public functions (same results as kernels.reference, autograd-enabled):
    mhc_coeffs(x, phi, b, alpha, sinkhorn_iters=20) -> (h_pre [T,n], h_post [T,n], h_res [T,n,n])  fp32
    mhc_pre(x, phi, b, alpha, sinkhorn_iters=20)    -> (layer_input [T,C] x.dtype, h_post, h_res)
Both take a keyword-only `config=` (dict or Config, kernels/triton/mhc_pre_config.py) to override the launch configuration; every
field can also be set through an environment variable HCBENCH_MHC_PRE_<FIELD> (e.g. HCBENCH_MHC_PRE_BT=32).
Without autograd (for a site-level autograd.Function): mhc_pre_forward / mhc_pre_backward.
sync_errors(): timed-out waits in the last launches (0 unless the cross-CTA synchronisation broke).

Forward: ONE kernel (`fwd_kernel`, kernels/triton/mhc_pre_fwd.py) plus a memset of a small int32 sync buffer.
  Work items (g, s), g a token block of BT tokens, s a column slice (the same `cw` columns of all n
  streams; S = cdiv(C, cw) slices). The grid is one CTA per item (or `persist` CTAs per SM looping);
  item ids come from an atomic ticket, so groups are processed in order whatever order the hardware
  dispatches CTAs in. An item reads x[block g, :, slice s] once and does
    phase 1: partial v @ phi on tensor cores (fwd_dot "hilo", the default: x as loaded times phi's
             hi and lo halves in x's dtype, two products, fp32 accumulation; "f32": x in fp32, phi
             in tf32; K = n*n+2n padded to a power of two >= 16, padded columns zero) and the
             partial sum of squares, stored to a ring of partial-sum slots (slots are reused while
             still in L2, so the partials are never written back to HBM). The LAST item of group g
             to arrive (atomic counter) sums the S partials and runs the per-token epilogue in
             registers: r, 1/r, alpha, bias, sigmoid, 2*sigmoid, max-shifted exp and all Sinkhorn
             iterations on a [BT, n, n] tile padded to a power of two (padded entries are 0 and
             never enter a sum); it writes h_pre, h_post, h_res (and m, r for backward) and marks
             group g ready.
    phase 2: (mhc_pre) layer_input for slice s of group g - LAG: waits until that group is ready
             (its items took earlier tickets, so the wait never deadlocks), then re-reads
             x[g - LAG, :, slice s], read about (LAG * S + #CTAs in flight) items ago: an L2 hit
             when that many slices (BT * n * cw * 2 bytes each) fit in L2 (50 MB on H100).
  HBM bytes per token: read n*C*e once (e = 2; plus phi from L2), write C*e (layer_input) +
  (n*n + 2n)*4 (coefficients) + (n*n + 2n + 1)*4 (m, r, only when a gradient is needed). x is read
  twice only as far as the phase-2 re-read misses L2 (dev/tune_mhc_pre.py measures it).
  Measured (ncu, H100, bf16, n = 4, T = 16384, C = 4096, bt 64, cw 256): 462 us, DRAM read 1.06 GB,
  i.e. x twice: the ~400 items in flight (3 CTAs per SM x 128 KB) already fill L2, so the re-read
  misses. Smaller items keep x in L2 (cw 64: 73% L2 hits) but lose more to per-item overhead
  (1.3 ms); one CTA per SM (persist=1) starves the loads (0.69 ms). Still the fastest forward
  here, 8-10% ahead of a non-split kernel (one CTA per 64 tokens over all n*C columns, no
  workspace or waits: 321 / 503 / 865 us against 299 / 456 / 804 us at C = 2560 / 4096 / 7168,
  dev/logs/tuning-20261124-h100/fwd_probe.txt), which commit ce5315f is the last to have.
  Tried and dropped (dev/logs/tuning-20261124-h100/resident_fwd_probe.txt): programs that own one
  column slice for many token blocks, phi's slice kept in shared memory (no per-item phi reads
  from L2, which double the GEMM phase's L2 traffic), partials summed with fp32 atomics and the
  Sinkhorn epilogue in a kernel of its own: 672 us at best (4 warps, 2 per SM; register pressure,
  ~200 per thread, allows no more, and each program's load / GEMM / arrive / apply runs serially).
  config fused=False: phase 2 becomes a separate apply kernel (kernels/triton/apply_pre.py; x read
  twice from HBM).

Backward: two kernels (kernels/triton/mhc_pre_bwd.py) plus torch sums of small per-CTA partials;
the Sinkhorn steps of both directions are kernels/triton/sinkhorn.py.
  `bwd_coef_kernel`, grid cdiv(T, BT1): per token dh_pre = sum_c g_li[c] x[i, c] (mhc_pre only:
  reads x and g_li), then from the saved m [T, K] and r [T]: the sigmoid / 2*sigmoid derivatives,
  the Sinkhorn backward and the alpha / bias / 1/r / norm chain rule. The Sinkhorn backward
  recomputes the forward iterates on chip from the logits, nothing stored: sqrt checkpointing, the
  state at the start of each segment of Q ~ sqrt(iters) iterations is recomputed from M0 and each
  state inside the segment from that start (O(iters^1.5) tiny math per token); then the gradient of
  the max shift goes to the arg-max entries (split on ties, as torch.amax). Writes du = dm/r
  [T, K] fp32, coef = dr/(nC r) [T] and per-CTA partials of db and dalpha.
  `bwd_dx_dphi_kernel`, grid n * cdiv(C, BR) column blocks x TS token ranges (stream index
  fastest, so the n CTAs reading the same g_li columns run together; TS from the CTAs per SM the
  compiled kernel really allows, `b2_ctas`): each CTA keeps its phi rows [BR, KP] on chip and
  streams its token range once through a STAGES-deep software pipeline (last range first, each
  range from its end, so the first reads hit what the first kernel left in L2):
  dx = du @ phi^T + coef * v + h_pre[i] * g_li on tensor cores (tf32), and v^T @ du with bf16 x as
  loaded times du split into hi + lo bf16 halves (fp32 accumulation; `b2_dphi=prec` for the
  earlier PREC product), written once per CTA ([TS, nC, K], summed by torch). H100, bf16, n = 4,
  T = 16384, C = 4096: 442 us (850 us before this layout), 618 us with post's dx added in (ACC).
  HBM bytes per token (mhc_pre): read 2nC*e (x twice) + 2C*e (g_li) + (K+1)*4 (+ n*4), write nC*e
  (dx). mhc_coeffs' backward reads x once (the first kernel does not need it).
  mhc_pre_backward(..., dx_accumulate=) adds dx in place into a given x gradient (a site-level
  autograd Function can fold F_post,res's dx in: nC extra read instead of autograd's 3nC add).
  mhc_pre / mhc_coeffs do the same through autograd: h_res carries a kernels/site_link.py link to
  x, a fused post given that h_res and x hands its dx over, and the dx kernel adds into it (ACC).
  An x-once fused backward (phase-1 partial dh_pre by ticket, phase-2 dx/dphi by slice owners,
  config bwd_fused) was measured at 1.28 ms against 0.70 ms for the two kernels above at
  C = 4096 on an H100 and removed; commit 5acf0f3 is the last to have it (docs/kernels.md).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
import triton

from kernels import site_link
from kernels.colsum import column_sums
from kernels.hilo import split_hi_lo, split_weight_hi_lo
from kernels.reference import EPS_RMS, EPS_SK
from kernels.triton.apply_pre import apply_pre
from kernels.triton.common import (check_state, check_tensor, coef_shapes, interpreting, np2, num_sms,
                                   resident_ctas)
from kernels.triton.mhc_pre_bwd import bwd_coef_kernel, bwd_dx_dphi_kernel
from kernels.triton.mhc_pre_config import Config, config_of
from kernels.triton.mhc_pre_fwd import fwd_kernel

MAX_SPIN = 1 << 22     # bounded spin: a broken sync sets an error flag instead of hanging forever


def _num_sms(device) -> int:
    return num_sms(device, interpreter_sms=4)


def _check(op, x, phi, b, alpha, sinkhorn_iters):
    T, n, C = check_state(op, x)
    K = n * n + 2 * n
    phi = check_tensor(op, phi, "phi", (n * C, K), torch.float32, x.device)
    b = check_tensor(op, b, "b", (K,), torch.float32, x.device)
    alpha = check_tensor(op, alpha, "alpha", (3,), torch.float32, x.device)
    if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 1:
        raise ValueError(f"{op}: sinkhorn_iters must be an int >= 1, got {sinkhorn_iters!r}")
    return x.contiguous(), phi, b, alpha, T, n, C, K


def _hilo(cfg: Config) -> bool:
    if cfg.fwd_dot not in ("hilo", "f32"):
        raise ValueError(f"mhc_pre: config fwd_dot must be 'hilo' or 'f32', got {cfg.fwd_dot!r}")
    return cfg.fwd_dot == "hilo"


def phi_as_used(phi: torch.Tensor, dtype: torch.dtype, config=None) -> torch.Tensor:
    """The phi the forward GEMM multiplies by, in fp32 (for a reference that matches the kernel):
    hi + lo in dtype for fwd_dot="hilo", else phi at `precision` (tf32: the H100's tensor cores
    drop the low 13 mantissa bits, truncation; measured in dev/logs/tuning-20261123-h100/pass4)."""
    cfg = config_of(config)
    if _hilo(cfg):
        hi, lo = split_hi_lo(phi.detach().float(), dtype, phi.shape[1])
        return hi.float() + lo.float()
    if cfg.precision == "tf32":
        bits = phi.detach().float().contiguous().view(torch.int32)
        return (bits & ~0x1FFF).view(torch.float32)
    return phi.detach().float()


# The forward's sizes at n >= 5 where the config does not set them. Compiled for sm_90 at C = 4096
# (triton 3.9, dev/sm90_occupancy.py): the n <= 4 default (64 tokens x 64 columns, 4 warps) spills
# at n = 5 and 7 and takes 175 registers at n = 6 and 8, two programs and 8 warps an SM; 64 x 32 at
# 8 warps takes 184 at n = 5 and 7 and 141 at n = 8, one program an SM (128 at n = 6: two).
# 32 x 32 at 4 warps takes 106-152 with no spills at n = 5-8: 3-4 programs, 12-16 warps an SM,
# about the 16 of the n = 4 default that the H100 tuning picked. Chosen from the compile, not yet
# timed on a GPU (dev/gpu_heldout_diagnostics.sh times the alternatives).
WIDE = {"bt": 32, "bk": 32, "warps": 4}


def fwd_sizes(n: int, T: int, C: int, sms: int, cfg: Config) -> tuple[int, int, int, int]:
    """The forward's launch sizes (bt, bk, warps, cw) for x [T, n, C] on `sms` SMs: the config's,
    made powers of two, with WIDE's bt, bk and warps at n >= 5 where the config leaves them, and
    the slice width halved until there are min_items * sms work items."""
    if coef_shapes(n)[2] >= 64:     # n >= 5: phi tiles of 64 or 128 columns
        cfg = replace(cfg, **{k: v for k, v in WIDE.items() if k not in cfg.explicit})
    bt = max(16, min(np2(cfg.bt), np2(T)))
    bk = max(16, np2(cfg.bk))
    warps = cfg.warps
    cw = max(bk, (cfg.cw // bk) * bk)
    G = triton.cdiv(T, bt)
    while cw > bk and G * triton.cdiv(C, cw) < cfg.min_items * sms:
        cw = max(bk, (cw // 2 // bk) * bk)
    return bt, bk, warps, cw


def epilogue_unroll(n: int, S: int, cfg: Config) -> tuple[int, int]:
    """Slices whose partial sums the group epilogue loads together: for h_pre, and for h_post /
    h_res (their [BT, n*n] tiles cost registers, so fewer)."""
    NP = coef_shapes(n)[1]
    eu = min(max(1, cfg.epi_unroll if NP <= 4 else cfg.epi_unroll // 2), np2(S))
    eu2 = min(max(1, cfg.epi_unroll // 2 if NP <= 4 else cfg.epi_unroll // 8), np2(S))
    return eu, eu2


def _forward(x, phi, b, alpha, iters, apply, save, cfg: Config):
    T, n, C = x.shape
    K, NP, KP = coef_shapes(n)
    dev = x.device
    f32 = torch.float32
    h_pre = torch.empty(T, n, device=dev, dtype=f32)
    h_post = torch.empty(T, n, device=dev, dtype=f32)
    h_res = torch.empty(T, n, n, device=dev, dtype=f32)
    m = torch.empty(T, K, device=dev, dtype=f32) if save else h_pre
    r = torch.empty(T, device=dev, dtype=f32) if save else h_pre
    li = torch.empty(T, C, device=dev, dtype=x.dtype) if apply else x
    if T == 0:
        return li, h_pre, h_post, h_res, m, r
    nsm = _num_sms(dev)
    bt, bk, warps, cw = fwd_sizes(n, T, C, nsm, cfg)
    G = triton.cdiv(T, bt)
    S = triton.cdiv(C, cw)
    fused = apply and cfg.fused
    lag = max(1 if interpreting() else 0, cfg.lag) if fused else 0
    if lag == 0 and fused and S > nsm:
        lag = 1     # lag 0 waits for the own group: needs all S items of a group resident
    total = (G + lag) * S
    grid = total if cfg.persist <= 0 else min(total, cfg.persist * nsm)
    if cfg.ring > 0:
        ring = min(G, cfg.ring)
    elif cfg.ring == 0:
        ring = G
    else:   # about twice the groups in flight: slots are overwritten in L2, never written back
        resident = min(grid, nsm * (cfg.persist if cfg.persist > 0 else 3))
        ring = min(G, 2 * triton.cdiv(resident, S) + lag + 4)
    eu, eu2 = epilogue_unroll(n, S, cfg)
    ws = torch.empty(ring * S * bt * K, device=dev, dtype=f32)
    wss = torch.empty(ring * S * bt, device=dev, dtype=f32)
    sync = torch.zeros(G + 2, device=dev, dtype=torch.int32)
    hilo = _hilo(cfg)
    phi_hi, phi_lo = split_weight_hi_lo(phi, x.dtype, KP) if hilo else (phi, phi)
    fwd_kernel[(grid,)](
        x, phi_hi, phi_lo, b, alpha, ws, wss, sync, h_pre, h_post, h_res, m, r, li,
        T, C, G, S, cw // bk, lag, total, ring, iters,
        N=n, NP=NP, K=K, KP=KP, BT=bt, BK=bk, APPLY=fused, SAVE=save, PREC=cfg.precision,
        HILO=hilo, DOT_F32=interpreting(),
        MAXSPIN=MAX_SPIN, NT=32 * warps, EARLY=cfg.early, EU=eu, EU2=eu2,
        EPS_RMS=EPS_RMS, EPS_SK=EPS_SK,
        num_warps=warps, num_stages=cfg.stages)
    _LAST["sync"] = sync
    if apply and not fused:
        abt, abc = np2(cfg.apply_bt), np2(cfg.apply_bc)
        apply_pre(x, h_pre, li, abt, abc)
    return li, h_pre, h_post, h_res, m, r


_LAST: dict = {}


def sync_errors() -> int:
    """Timed-out waits in the last forward and last fused backward (0 when synchronisation worked)."""
    return sum(int(v[1].item()) for v in _LAST.values())


def coef_backward(x, g_li, g_hpre, g_post, g_res, m, r, b, alpha, iters, cfg):
    """du [T, K], coef [T] and the per-program db / dalpha partials [g1, K], [g1, 3] of the mHC
    coefficients of x (bwd_coef_kernel; cfg's b1_* fields size it). A gradient given as None is
    absent; T >= 1."""
    T, n, C = x.shape
    K, NP, _ = coef_shapes(n)
    dev, f32 = x.device, torch.float32
    bt1 = max(1, min(np2(cfg.b1_bt), np2(T)))
    bc1 = max(16, np2(cfg.b1_bc))
    while bc1 > 16 and bt1 * NP * bc1 > 4096:     # bound the [BT, NP, BC] fp32 accumulator
        bc1 //= 2
    g1 = triton.cdiv(T, bt1)
    du = torch.empty(T, K, device=dev, dtype=f32)
    coef = torch.empty(T, device=dev, dtype=f32)
    dbp = torch.empty(g1, K, device=dev, dtype=f32)
    dap = torch.empty(g1, 3, device=dev, dtype=f32)
    Q = max(1, math.isqrt(iters - 1) + 1) if iters > 1 else 1
    absent = m      # a pointer the kernel never reads
    bwd_coef_kernel[(g1,)](
        x, g_li if g_li is not None else x, g_hpre if g_hpre is not None else absent,
        g_post if g_post is not None else absent, g_res if g_res is not None else absent,
        m, r, b, alpha, du, coef, dbp, dap, T, C, iters, Q,
        N=n, NP=NP, K=K, BT=bt1, BC=bc1, STAGES=cfg.b1_stages, HAS_LI=g_li is not None,
        HAS_GPRE=g_hpre is not None, HAS_GPOST=g_post is not None, HAS_GRES=g_res is not None,
        EPS_SK=EPS_SK, num_warps=cfg.b1_warps)
    return du, coef, dbp, dap


def _backward(x, phi, b, alpha, m, r, h_pre, iters, g_first, g_post, g_res, with_li, needs, cfg,
              dx_acc=None):
    need_x, need_phi, need_b, need_alpha = needs
    T, n, C = x.shape
    K, NP, KP = coef_shapes(n)
    dev = x.device
    f32 = torch.float32
    has_li = with_li and g_first is not None
    has_gpre = (not with_li) and g_first is not None
    gli = g_first.contiguous() if has_li else x
    gpre = g_first.contiguous() if has_gpre else None
    gpost = g_post.contiguous() if g_post is not None else None
    gres = g_res.contiguous() if g_res is not None else None
    dx = dphi = db = dalpha = None
    if T == 0:
        dx0 = dx_acc if dx_acc is not None else torch.zeros_like(x)
        return (dx0 if need_x else None, torch.zeros_like(phi) if need_phi else None,
                torch.zeros_like(b) if need_b else None, torch.zeros_like(alpha) if need_alpha else None)
    du, coef, dbp, dap = coef_backward(x, gli if has_li else None, gpre, gpost, gres, m, r, b, alpha,
                                       iters, cfg)
    if need_b or need_alpha:
        sums = column_sums(dbp, dap)
        db = sums[:K] if need_b else None
        dalpha = sums[K:] if need_alpha else None
    if need_x or need_phi:
        bt2 = max(16, min(np2(cfg.b2_bt), np2(T)))
        br = max(16, np2(cfg.b2_br))
        warps2 = cfg.b2_warps
        if KP >= 64:                  # n >= 5: [BR, KP] phi rows + dphi accumulator
            if "b2_br" not in cfg.explicit:
                br = min(br, 64)
            if "b2_warps" not in cfg.explicit:
                warps2 = max(warps2, 8)
        ncb = triton.cdiv(C, br)
        nblk = triton.cdiv(T, bt2)
        acc = need_x and dx_acc is not None
        dx = (dx_acc if acc else torch.empty_like(x)) if need_x else x
        if cfg.b2_dphi not in ("bf16", "prec"):
            raise ValueError(f"mhc_pre: b2_dphi must be 'bf16' or 'prec', got {cfg.b2_dphi!r}")
        kw = dict(N=n, K=K, KP=KP, BT=bt2, BR=br, STAGES=cfg.b2_stages, HAS_LI=has_li, DX=need_x,
                  DPHI=need_phi, ACC=acc, PREC=cfg.precision,
                  DPHI_BF16=(cfg.b2_dphi == "bf16" and x.dtype == torch.bfloat16
                             and cfg.precision == "tf32"),
                  DOT_F32=interpreting(), EVEN_T=T % bt2 == 0, EVEN_C=C % br == 0,
                  num_warps=warps2)
        if cfg.b2_ts > 0:
            ts = min(cfg.b2_ts, nblk)
        else:   # the smallest split within 5% of the fewest waves x work per CTA, for the CTAs
                # that fit on an SM (b2_ctas, 0: from the compiled kernel's registers and smem)
            ctas = cfg.b2_ctas if cfg.b2_ctas > 0 else resident_ctas(
                bwd_dx_dphi_kernel, [x, phi, du, coef, h_pre, gli, dx, du, T, C, ncb, bt2, 3],
                kw, 3)
            slots, units = ctas * _num_sms(dev), n * ncb
            t_k = {k: triton.cdiv(k * units, slots) / k for k in range(1, min(nblk, 64) + 1)}
            ts = min(k for k, v in t_k.items() if v <= 1.05 * min(t_k.values()))
        tps = triton.cdiv(nblk, ts) * bt2
        ts = triton.cdiv(T, tps)
        dphi_ws = torch.empty(ts, n * C, K, device=dev, dtype=f32) if need_phi else du
        bwd_dx_dphi_kernel[(n * ncb * ts,)](
            x, phi, du, coef, h_pre, gli, dx, dphi_ws, T, C, ncb, tps, ts, **kw)
        if not need_x:
            dx = None
        if need_phi:
            dphi = dphi_ws[0] if ts == 1 else dphi_ws.sum(0)
    return dx, dphi, db, dalpha


def _on(device):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _MhcFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, b, alpha, iters, with_li, cfg, grad_mode, link):
        # (forward runs with grad mode off: the caller's grad mode comes in as an argument)
        save = grad_mode and any(ctx.needs_input_grad[:4])
        with _on(x.device):
            li, h_pre, h_post, h_res, m, r = _forward(x, phi, b, alpha, iters, with_li, save, cfg)
        ctx.set_materialize_grads(False)
        ctx.iters, ctx.with_li, ctx.cfg, ctx.link = iters, with_li, cfg, link
        if save:
            ctx.save_for_backward(x, phi, b, alpha, m, r, h_pre)
        if with_li:
            return li, h_post, h_res
        return h_pre, h_post, h_res

    @staticmethod
    def backward(ctx, g_first, g_post, g_res):
        needs = tuple(ctx.needs_input_grad[:4])
        x, phi, b, alpha, m, r, h_pre = ctx.saved_tensors
        # post's x gradient, when a linked post handed it over (kernels/site_link.py)
        acc = site_link.accumulator(ctx.link[0], x) if needs[0] else None
        if g_first is None and g_post is None and g_res is None:
            return acc, None, None, None, None, None, None, None, None
        with _on(x.device):
            dx, dphi, db, dalpha = _backward(x, phi, b, alpha, m, r, h_pre, ctx.iters, g_first,
                                             g_post, g_res, ctx.with_li, needs, ctx.cfg, dx_acc=acc)
        return dx, dphi, db, dalpha, None, None, None, None, None


def _apply(x_user, x, phi, b, alpha, iters, with_li, cfg):
    """_MhcFn with h_res linked to x (kernels/site_link.py) when a gradient may be needed."""
    holder = [None]
    out = _MhcFn.apply(x, phi, b, alpha, iters, with_li, cfg, torch.is_grad_enabled(), holder)
    if torch.is_grad_enabled() and x_user.requires_grad:
        holder[0] = site_link.attach(out[2], x_user)
    return out


# ---------------------------------------------------------------- entry points without autograd
def mhc_pre_forward(x, phi, b, alpha, sinkhorn_iters: int = 20, *, layer_input: bool = True,
                    save: bool = True, config=None):
    """Forward without autograd, for a site-level autograd.Function.

    Returns (first, h_post, h_res, saved): first is layer_input (layer_input=True) or h_pre;
    saved (None unless save) is what mhc_pre_backward needs: x, the parameters and per token
    m [K], r and h_pre fp32 ((n*n + 3n + 1) * 4 bytes).
    """
    op = "mhc_pre" if layer_input else "mhc_coeffs"
    x, phi, b, alpha, *_ = _check(op, x, phi, b, alpha, sinkhorn_iters)
    cfg = config_of(config)
    with _on(x.device):
        li, h_pre, h_post, h_res, m, r = _forward(x, phi, b, alpha, sinkhorn_iters, layer_input, save,
                                                  cfg)
    saved = (x, phi, b, alpha, m, r, h_pre, sinkhorn_iters, layer_input, cfg) if save else None
    return (li if layer_input else h_pre), h_post, h_res, saved


def mhc_pre_backward(saved, g_first, g_h_post, g_h_res, *, needs=(True, True, True, True),
                     dx_accumulate=None):
    """Backward without autograd: (dx, dphi, db, dalpha) from mhc_pre_forward's saved state.

    g_first is the gradient of layer_input (or of h_pre); any gradient may be None. needs says which
    of (x, phi, b, alpha) to return (the others are None). dx_accumulate: an x-shaped tensor in
    x's dtype that receives dx in place (dx_accumulate += dx, returned as dx): when x also feeds
    F_post,res, this replaces autograd's separate add of the two x gradients (3nC bytes per token)
    by one extra read of nC.
    """
    x, phi, b, alpha, m, r, h_pre, iters, with_li, cfg = saved
    if dx_accumulate is not None:
        check_tensor("mhc_pre_backward", dx_accumulate, "dx_accumulate", tuple(x.shape), x.dtype,
                     x.device)
        if not dx_accumulate.is_contiguous():
            raise ValueError("mhc_pre_backward: dx_accumulate must be contiguous")
    if g_first is None and g_h_post is None and g_h_res is None:
        return (dx_accumulate if needs[0] else None), None, None, None
    with _on(x.device):
        return _backward(x, phi, b, alpha, m, r, h_pre, iters, g_first, g_h_post, g_h_res, with_li,
                         tuple(needs), cfg, dx_acc=dx_accumulate)


def mhc_coeffs(x, phi, b, alpha, sinkhorn_iters: int = 20, *, config=None):
    """(h_pre [T,n], h_post [T,n], h_res [T,n,n]) in fp32, h_res indexed [token, dst, src]."""
    xc, phi, b, alpha, *_ = _check("mhc_coeffs", x, phi, b, alpha, sinkhorn_iters)
    return _apply(x, xc, phi, b, alpha, sinkhorn_iters, False, config_of(config))


def mhc_pre(x, phi, b, alpha, sinkhorn_iters: int = 20, *, config=None):
    """(layer_input [T,C] in x.dtype, h_post [T,n] fp32, h_res [T,n,n] fp32)."""
    xc, phi, b, alpha, *_ = _check("mhc_pre", x, phi, b, alpha, sinkhorn_iters)
    return _apply(x, xc, phi, b, alpha, sinkhorn_iters, True, config_of(config))
