"""mHC coefficients (norm + GEMM + Sinkhorn) fused with F_pre, and their backward, in Triton.

Public functions (same results as kernels.reference, autograd-enabled):
    mhc_coeffs(x, phi, b, alpha, sinkhorn_iters=20) -> (h_pre [T,n], h_post [T,n], h_res [T,n,n])  fp32
    mhc_pre(x, phi, b, alpha, sinkhorn_iters=20)    -> (layer_input [T,C] x.dtype, h_post, h_res)
Both take a keyword-only `config=` (dict or Config) to override the launch configuration; every
field can also be set through an environment variable HCBENCH_MHC_PRE_<FIELD> (e.g. HCBENCH_MHC_PRE_BT=32).
Without autograd (for a site-level autograd.Function): mhc_pre_forward / mhc_pre_backward.
sync_errors(): timed-out waits in the last launches (0 unless the cross-CTA synchronisation broke).

Forward: ONE kernel (`_fwd_kernel`) plus a memset of a small int32 sync buffer.
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
  here, 8-10% ahead of the non-split kernel at every width.
  Tried and dropped (dev/logs/tuning-20261124-h100/resident_fwd_probe.txt): programs that own one
  column slice for many token blocks, phi's slice kept in shared memory (no per-item phi reads
  from L2, which double the GEMM phase's L2 traffic), partials summed with fp32 atomics and the
  Sinkhorn epilogue in a kernel of its own: 672 us at best (4 warps, 2 per SM; register pressure,
  ~200 per thread, allows no more, and each program's load / GEMM / arrive / apply runs serially).
  config fused=False: phase 2 becomes a separate apply kernel (kernels/triton/apply_pre.py; x read
  twice from HBM).

Non-split forward (config split=False, or any ns_* field set explicitly; use_split()):
  `_phi_pack_kernel` re-lays phi out per call as
  [nC, 2*NP*NP] (NP = max(4, next_pow2(n)), zero padded, pre/post/res interleaved so that
  reshape + split of the accumulator gives the three groups), then `_fwd_ns_kernel`, grid
  cdiv(T, ns_bt), no workspace, atomics or waits: one CTA per ns_bt tokens loops over all n*C
  columns in chunks of ns_bk (column chunk outer, stream inner; x tiles prefetched one chunk ahead
  in registers, phi tiles staged by the pipeliner), accumulating v @ phi_packed (fwd_dot as above) and
  the sum of squares; the epilogue (r, sigmoid, 2*sigmoid, Sinkhorn) runs in registers and writes
  h_pre, h_post, h_res and the same m, r as the split path (the backward is shared). mhc_pre then
  re-reads the block's x (column chunks backwards: the latest lines first) for layer_input:
  from HBM unless the block's x (ns_bt * nC * e bytes) times the CTAs in flight fits in L2.

Backward: two kernels plus torch sums of small per-CTA partials.
  `_bwd_coef_kernel`, grid cdiv(T, BT1): per token dh_pre = sum_c g_li[c] x[i, c] (mhc_pre only:
  reads x and g_li), then from the saved m [T, K] and r [T]: the sigmoid / 2*sigmoid derivatives,
  the Sinkhorn backward and the alpha / bias / 1/r / norm chain rule. The Sinkhorn backward
  recomputes the forward iterates on chip from the logits, nothing stored: sqrt checkpointing, the
  state at the start of each segment of Q ~ sqrt(iters) iterations is recomputed from M0 and each
  state inside the segment from that start (O(iters^1.5) tiny math per token); then the gradient of
  the max shift goes to the arg-max entries (split on ties, as torch.amax). Writes du = dm/r
  [T, K] fp32, coef = dr/(nC r) [T] and per-CTA partials of db and dalpha.
  `_bwd_dx_dphi_kernel`, grid n * cdiv(C, BR) column blocks x TS token ranges (stream index
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
import os
from dataclasses import dataclass, fields, replace

import torch
import triton
import triton.language as tl

from kernels import site_link
from kernels.colsum import column_sums
from kernels.hilo import split_hi_lo, split_weight_hi_lo
from kernels.triton.apply_pre import apply_pre
from kernels.triton.common import (check_state, check_tensor, dot_xT_hilo, interpreting, num_sms,
                                    store_grad)

EPS_RMS = 1e-6
EPS_SK = 1e-6
MAX_SPIN = 1 << 22     # bounded spin: a broken sync sets an error flag instead of hanging forever


# ====================================================================== configuration
@dataclass(frozen=True)
class Config:
    # forward
    bt: int = 64          # tokens per block (>= 16, power of two: tl.dot M dimension)
    bk: int = 64          # columns per chunk within a stream (power of two >= 16)
    cw: int = 256         # slice width in columns (multiple of bk); S = cdiv(C, cw)
    lag: int = 2          # layer_input of group g - lag is done by the items of group g
    fused: bool = True    # layer_input in the same kernel (else a separate apply kernel)
    persist: int = 0      # 0: one CTA per item; k > 0: k CTAs per SM looping over tickets
    ring: int = -1        # partial-sum slots in groups: -1 auto (~2x the groups in flight), 0 all G
    early: bool = False   # sync counters read early with plain loads (vs atomics when needed)
    epi_unroll: int = 8   # partial-sum slices loaded together in the group epilogue (h_pre part;
                          # half as many for the h_post / h_res part)
    min_items: int = 2    # shrink cw until there are >= min_items * #SM work items
    warps: int = 4
    stages: int = 3
    precision: str = "tf32"   # tl.dot input precision: "tf32", "tf32x3" or "ieee"
    # forward GEMM (both forward kernels): "hilo" x as loaded (bf16/fp16, exact) times phi split
    # into hi + lo halves in x's dtype (kernels/hilo.py), two products, fp32 accumulation (phi to
    # ~16 bits); "f32": x converted to fp32 in registers and one product at `precision` (tf32
    # truncates phi to 11 bits). H100, n = 4, T = 16384, C = 4096: f32 split GEMM phase 666 us.
    fwd_dot: str = "hilo"
    apply_bt: int = 16    # separate apply kernel (fused=False)
    apply_bc: int = 256
    # backward, kernel 1 (per-token coefficient backward). Few tokens per CTA and a pipelined
    # dh_pre loop: more CTAs stream x while others run their Sinkhorn backward. H100, bf16, n = 4,
    # T = 16384, C = 4096 (torch.profiler): 258 us at 4 / 128 / 4 stages, 324 us at 16 / 64 / none
    # (dev/logs/tuning-20261124-h100/b1_probe.txt)
    b1_bt: int = 4
    b1_bc: int = 128
    b1_warps: int = 4
    b1_stages: int = 4    # software pipeline depth of the dh_pre loop (1: none)
    # backward, kernel 2 (dx and dphi): 64 tokens x 64 columns x 4 warps, 2 stages: 128 registers
    # and 41 KB of shared memory at n = 4 (sm_90, triton 3.6): 4 CTAs per SM (3 with dx_acc: 145
    # registers). H100, n = 4, T = 16384 (torch.profiler): 442 us at C = 4096, 618 us with
    # dx_acc, 800 us at C = 7168 (3 stages: 464-472 us at 4096; the tf32 kernel before it, 128
    # columns x 8 warps: 850 us under ncu)
    b2_bt: int = 64
    b2_br: int = 64       # columns per CTA (n >= 5: at most 64, and 8 warps unless set)
    b2_ts: int = 0        # token splits; 0: auto (fewest waves x work per CTA, b2_ctas per SM)
    b2_ctas: int = 0      # CTAs per SM for the auto split; 0: what the compiled kernel allows
    b2_warps: int = 4
    b2_stages: int = 2
    b2_dphi: str = "bf16"   # dphi product: "bf16" (x as loaded, du = hi + lo in bf16; bf16 x only)
                            # or "prec" (x in fp32, `precision`)
    # forward path choice: -1 auto (the split kernel above unless a non-split field is set
    # explicitly), 1 (True) the split kernel, 0 (False) the non-split kernel below. H100, bf16,
    # n = 4, T = 16384, fwd_dot hilo: split (bt 64, cw 256) 299 / 456 / 804 us at C = 2560 / 4096 /
    # 7168, non-split 321 / 503 / 865 us (dev/logs/tuning-20261124-h100/fwd_probe.txt)
    split: int = -1
    # non-split forward (_fwd_ns_kernel): one CTA per ns_bt tokens looping over all n*C columns
    # 64 tokens and 4 stages: 7-14% faster coefficient pass than 32/3 on an H100 (same log)
    ns_bt: int = 64       # tokens per CTA (tl.dot M)
    ns_bk: int = 64       # columns per chunk (first loop: GEMM + sum of squares)
    ns_bc: int = 64       # columns per chunk of layer_input (second loop)
    ns_warps: int = 4
    ns_stages: int = 4
    ns_prefetch: int = 1  # 1: x tiles loaded one chunk ahead into registers; 0: plain loads
    explicit: frozenset = frozenset()   # fields set by the caller or the environment (not heuristics)

    def with_env(self) -> "Config":
        kw = {}
        for f in fields(self):
            if f.name == "explicit":
                continue
            v = os.environ.get("HCBENCH_MHC_PRE_" + f.name.upper())
            if v is None:
                continue
            if f.type in ("bool", bool):
                kw[f.name] = v.lower() in ("1", "true", "yes", "on")
            elif f.type in ("int", int):
                kw[f.name] = int(v)
            else:
                kw[f.name] = v
        return replace(self, **kw, explicit=self.explicit | frozenset(kw)) if kw else self


DEFAULT = Config()


def _config(config) -> Config:
    cfg = DEFAULT.with_env()
    if config is None:
        return cfg
    if isinstance(config, Config):
        return config
    kw = dict(config)
    return replace(cfg, **kw, explicit=cfg.explicit | frozenset(kw))


def _np2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _num_sms(device) -> int:
    return num_sms(device, interpreter_sms=4)


# ====================================================================== Sinkhorn helpers
@triton.jit
def _sk_step(M, EPS: tl.constexpr):
    # M: [BT, NP(dst), NP(src)]; columns (sum over dst) first, then rows (sum over src).
    M = M * (1.0 / (tl.sum(M, axis=1) + EPS))[:, None, :]
    M = M * (1.0 / (tl.sum(M, axis=2) + EPS))[:, :, None]
    return M


@triton.jit
def _sk_step_bwd(Mp, G, valid, EPS: tl.constexpr):
    """Gradient w.r.t. M_{k-1} = Mp, given G = gradient w.r.t. M_k = step(Mp)."""
    cs = tl.sum(Mp, axis=1)[:, None, :] + EPS
    A = Mp / cs
    rs = tl.sum(A, axis=2)[:, :, None] + EPS
    Mk = A / rs
    dA = (G - tl.sum(G * Mk, axis=2)[:, :, None]) / rs
    dA = tl.where(valid, dA, 0.0)
    dM = (dA - tl.sum(dA * A, axis=1)[:, None, :]) / cs
    return tl.where(valid, dM, 0.0)


@triton.jit
def _sk_init(L, valid):
    """M0 = exp(L - max over the valid n x n entries), 0 at padded entries; also returns the max."""
    mx = tl.max(tl.max(tl.where(valid, L, -float("inf")), axis=2), axis=1)
    M0 = tl.where(valid, tl.exp(L - mx[:, None, None]), 0.0)
    return M0, mx


@triton.jit
def _sinkhorn_bwd(L, G, valid, iters, Q, EPS: tl.constexpr):
    """d loss / d logits of Sinkhorn(L) given G = d loss / d output; recomputes the iterates."""
    M0, mx = _sk_init(L, valid)
    nseg = (iters + Q - 1) // Q
    for sr in range(nseg):
        start = (nseg - 1 - sr) * Q
        end = tl.minimum(start + Q, iters)
        Ms = M0
        for _j in range(start):
            Ms = _sk_step(Ms, EPS)
        for kk in range(end - start):
            # back through iteration k = end - kk (1-based), which maps M_{k-1} to M_k
            M = Ms
            for _j in range(end - kk - 1 - start):
                M = _sk_step(M, EPS)
            G = _sk_step_bwd(M, G, valid, EPS)
    dL = G * M0
    tot = tl.sum(tl.sum(dL, axis=2), axis=1)
    ismax = valid & (L == mx[:, None, None])
    cnt = tl.sum(tl.sum(ismax.to(tl.float32), axis=2), axis=1)
    cnt = tl.maximum(cnt, 1.0)
    # the max shift: its gradient goes to the arg-max entries (split evenly on ties, as torch.amax)
    return dL - tl.where(ismax, (tot / cnt)[:, None, None], 0.0)


@triton.jit
def _flag_min(ptr, mask, other, NT: tl.constexpr):
    """A sync counter read with a plain (volatile) load, made uniform across the CTA.

    Every thread loads the counter itself and warps run at different times, so they may see
    different values; branching on that per thread would split the CTA around barriers. NT = the
    thread count: one element per thread, reduced to one value that every thread gets.
    """
    z = tl.zeros([NT], dtype=tl.int32)
    v = tl.load(ptr + z, mask=(z + mask.to(tl.int32)) != 0, other=other, volatile=True)
    return tl.min(v, axis=0)


# ====================================================================== forward kernel
@triton.jit
def _wait_until(cnt_ptr, target, err_ptr, MAXSPIN: tl.constexpr):
    """Polls a group counter until it reaches target. After MAXSPIN polls it gives up and raises
    the error flag (checked by tests and tuning) rather than hang the GPU."""
    cnt = tl.atomic_add(cnt_ptr, 0)
    spins = 0
    while (cnt < target) & (spins < MAXSPIN):
        cnt = tl.atomic_add(cnt_ptr, 0)
        spins += 1
    if cnt < target:
        tl.atomic_add(err_ptr, 1)


@triton.jit
def _dot_hilo(xt, hi_ptr, lo_ptr, off, mask, acc, DOT_F32: tl.constexpr):
    """acc + xt @ (hi + lo): xt [BT, BK] in x's dtype as loaded, hi / lo [BK, W] tiles of a
    weight split in x's dtype (kernels/hilo.py). DOT_F32: the same products in fp32 (the
    interpreter multiplies 16-bit float tiles as their bit patterns)."""
    hi = tl.load(hi_ptr + off, mask=mask, other=0.0)
    lo = tl.load(lo_ptr + off, mask=mask, other=0.0)
    if DOT_F32:
        xf = xt.to(tl.float32)
        acc = tl.dot(xf, hi.to(tl.float32), acc, input_precision="ieee")
        acc = tl.dot(xf, lo.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(xt, hi, acc)
        acc = tl.dot(xt, lo, acc)
    return acc


@triton.jit
def _fwd_kernel(x_ptr, phi_ptr, plo_ptr, b_ptr, alpha_ptr,
                ws_ptr, wss_ptr, sync_ptr,
                hpre_ptr, hpost_ptr, hres_ptr, m_ptr, r_ptr, li_ptr,
                T, C, G, S, CHUNKS, LAG, TOTAL, RING, iters,
                N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr,
                APPLY: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr,
                HILO: tl.constexpr, DOT_F32: tl.constexpr,
                MAXSPIN: tl.constexpr, NT: tl.constexpr, EARLY: tl.constexpr,
                EU: tl.constexpr, EU2: tl.constexpr):
    nC = N * C
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BK)
    kk = tl.arange(0, KP)
    kmask = kk < K
    jn = tl.arange(0, NP)
    jv = jn < N
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    valid = (i3 < N) & (j3 < N)
    cw = CHUNKS * BK

    vid = tl.atomic_add(sync_ptr, 1)
    while vid < TOTAL:
        g = vid // S
        s = vid - g * S
        c_lo = s * cw
        gp = g - LAG
        if APPLY:
            # Is group g - LAG ready? EARLY: read now with a plain load, used after phase 1 (the
            # latency hides behind the GEMM; the counter only grows, so S + 1 seen here stays
            # true) and only a group not yet ready costs atomics. Else: always one atomic (blocking
            # ~1 L2 round trip, but _flag_min's reduction costs ~45 registers).
            gpc = tl.minimum(tl.maximum(gp, 0), G - 1)
            if EARLY:
                ready = _flag_min(sync_ptr + 2 + gpc, (gp >= 0) & (gp < G), S + 1, NT)
            else:
                ready = S
        if g < G:
            # ---------------- phase 1: partial GEMM + sum of squares over slice s of block g
            tok = g * BT + rows
            tmask = tok < T
            xrow = tok.to(tl.int64) * nC
            # The partials of group g go to ring slot g % RING, last used by group g - RING: that
            # group's epilogue must be done (its counter at S + 2). Read early, checked after the loop.
            slot = g % RING
            gw = tl.maximum(g - RING, 0)
            if EARLY:
                early = _flag_min(sync_ptr + 2 + gw, g >= RING, S + 2, NT)
            else:
                early = tl.where(g >= RING, S, S + 2)
            acc = tl.zeros([BT, KP], dtype=tl.float32)
            ss = tl.zeros([BT], dtype=tl.float32)
            for j in range(N * CHUNKS):
                i = j // CHUNKS
                c = c_lo + (j - i * CHUNKS) * BK + cols
                cmask = c < C
                xt = tl.load(x_ptr + xrow[:, None] + (i * C + c)[None, :],
                             mask=tmask[:, None] & cmask[None, :], other=0.0)
                xf = xt.to(tl.float32)
                if HILO:
                    # phi hi / lo: [nC, KP] in x's dtype, zero padded past K
                    prow = (i * C + c).to(tl.int64) * KP
                    acc = _dot_hilo(xt, phi_ptr, plo_ptr, prow[:, None] + kk[None, :],
                                    cmask[:, None], acc, DOT_F32)
                else:
                    prow = (i * C + c).to(tl.int64) * K
                    pt = tl.load(phi_ptr + prow[:, None] + kk[None, :],
                                 mask=cmask[:, None] & kmask[None, :], other=0.0)
                    acc = tl.dot(xf, pt, acc, input_precision=PREC)
                ss += tl.sum(xf * xf, axis=1)     # (a [BT, BK] accumulator costs 26 registers)
            if early < S + 2:
                _wait_until(sync_ptr + 2 + gw, S + 2, sync_ptr + 1, MAXSPIN)
            tl.debug_barrier()
            wrow = (slot * S + s).to(tl.int64) * BT + rows
            tl.store(ws_ptr + wrow[:, None] * K + kk[None, :], acc, mask=kmask[None, :])
            tl.store(wss_ptr + wrow, ss)
            tl.debug_barrier()
            old = tl.atomic_add(sync_ptr + 2 + g, 1)
            if old == S - 1:
                # ---------------- epilogue, by the last item of group g to arrive. First only
                # what phase 2 needs (h_pre: the pre partials and the sums of squares), published
                # as counter S + 1; then h_post and the Sinkhorn iterations, counter S + 2.
                # The partial loads are unrolled by EU so that EU slices' loads are in flight.
                pre = tl.zeros([BT, NP], dtype=tl.float32)
                sq = tl.zeros([BT], dtype=tl.float32)
                for s0 in range(0, S, EU):
                    for u in tl.static_range(EU):
                        ok = (rows * 0 + s0 + u) < S
                        wr = (slot * S + s0 + u).to(tl.int64) * BT + rows
                        pre += tl.load(ws_ptr + wr[:, None] * K + jn[None, :],
                                       mask=ok[:, None] & jv[None, :], other=0.0, cache_modifier=".cg")
                        sq += tl.load(wss_ptr + wr, mask=ok, other=0.0, cache_modifier=".cg")
                r = tl.sqrt(sq / nC + 1e-6)
                pre = pre / r[:, None]
                t64 = tok.to(tl.int64)
                m2 = tmask[:, None] & jv[None, :]
                m3 = tmask[:, None, None] & valid
                hp = tl.sigmoid(tl.load(alpha_ptr) * pre
                                + tl.load(b_ptr + jn, mask=jv, other=0.0)[None, :])
                tl.store(hpre_ptr + t64[:, None] * N + jn[None, :], hp, mask=m2)
                if SAVE:
                    tl.store(m_ptr + t64[:, None] * K + jn[None, :], pre, mask=m2)
                    tl.store(r_ptr + t64, r, mask=tmask)
                tl.debug_barrier()
                tl.atomic_add(sync_ptr + 2 + g, 1)   # == S + 1: h_pre of group g is ready
                post = tl.zeros([BT, NP], dtype=tl.float32)
                res = tl.zeros([BT, NP, NP], dtype=tl.float32)
                for s0 in range(0, S, EU2):
                    for u in tl.static_range(EU2):
                        ok = (rows * 0 + s0 + u) < S
                        wr = (slot * S + s0 + u).to(tl.int64) * BT + rows
                        post += tl.load(ws_ptr + wr[:, None] * K + N + jn[None, :],
                                        mask=ok[:, None] & jv[None, :], other=0.0,
                                        cache_modifier=".cg")
                        res += tl.load(ws_ptr + wr[:, None, None] * K + 2 * N + i3 * N + j3,
                                       mask=ok[:, None, None] & valid, other=0.0,
                                       cache_modifier=".cg")
                post = post / r[:, None]
                res = res / r[:, None, None]
                if SAVE:
                    tl.store(m_ptr + t64[:, None] * K + N + jn[None, :], post, mask=m2)
                    tl.store(m_ptr + t64[:, None, None] * K + 2 * N + i3 * N + j3, res, mask=m3)
                hq = 2.0 * tl.sigmoid(tl.load(alpha_ptr + 1) * post
                                      + tl.load(b_ptr + N + jn, mask=jv, other=0.0)[None, :])
                L = tl.load(alpha_ptr + 2) * res + tl.load(b_ptr + 2 * N + i3 * N + j3, mask=valid,
                                                           other=0.0)
                M, _mx = _sk_init(L, valid)
                for _it in range(iters):
                    M = _sk_step(M, 1e-6)
                tl.store(hpost_ptr + t64[:, None] * N + jn[None, :], hq, mask=m2)
                tl.store(hres_ptr + t64[:, None, None] * (N * N) + i3 * N + j3, M, mask=m3)
                tl.debug_barrier()
                tl.atomic_add(sync_ptr + 2 + g, 1)   # == S + 2: group g done, its slot is free
        if APPLY:
            # ---------------- phase 2: layer_input for slice s of block g - LAG
            if (gp >= 0) & (gp < G):
                if ready < S + 1:
                    _wait_until(sync_ptr + 2 + gp, S + 1, sync_ptr + 1, MAXSPIN)
                tl.debug_barrier()
                tok = gp * BT + rows
                tmask = tok < T
                t64 = tok.to(tl.int64)
                xrow = t64 * nC
                for cc in range(CHUNKS):
                    # reverse chunk order: the most recently read lines first
                    c = c_lo + (CHUNKS - 1 - cc) * BK + cols
                    cmask = c < C
                    lm = tmask[:, None] & cmask[None, :]
                    li = tl.zeros([BT, BK], dtype=tl.float32)
                    for i in tl.static_range(N):
                        # .cg: straight from L2, written by another CTA (never a stale L1 line)
                        h_i = tl.load(hpre_ptr + t64 * N + i, mask=tmask, other=0.0,
                                      cache_modifier=".cg")
                        xt = tl.load(x_ptr + xrow[:, None] + (i * C + c)[None, :], mask=lm, other=0.0)
                        li += h_i[:, None] * xt.to(tl.float32)
                    tl.store(li_ptr + t64[:, None] * C + c[None, :],
                             li.to(li_ptr.dtype.element_ty), mask=lm)
        vid = tl.atomic_add(sync_ptr, 1)


# ====================================================================== non-split forward
@triton.jit
def _phi_pack_kernel(phi_ptr, out_ptr, lo_ptr, R,
                     N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, BR: tl.constexpr,
                     HILO: tl.constexpr):
    """phi [R, K] -> [R, 2W], W = NP*NP: column 2q+1 = res entry q = i*NP + j (i, j < N), column
    2q = pre/post entry q = 2j + h (h = 0 pre, 1 post; j < N); every other column 0.
    HILO: out gets phi rounded to lo_ptr's dtype (hi) and lo_ptr the rest, rounded the same way."""
    W: tl.constexpr = NP * NP
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    q2 = tl.arange(0, 2 * W)
    h = q2 % 2
    q = q2 // 2
    ri = q // NP
    rj = q - ri * NP
    pj = q // 2
    ph = q - pj * 2
    src = tl.where(h == 1, 2 * N + ri * N + rj, ph * N + pj)
    ok = tl.where(h == 1, (ri < N) & (rj < N), pj < N)
    rm = rr < R
    r64 = rr.to(tl.int64)
    v = tl.load(phi_ptr + r64[:, None] * K + src[None, :], mask=rm[:, None] & ok[None, :], other=0.0)
    off = r64[:, None] * (2 * W) + q2[None, :]
    if HILO:
        hi = v.to(lo_ptr.dtype.element_ty)
        tl.store(out_ptr + off, hi, mask=rm[:, None])
        tl.store(lo_ptr + off, (v - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty), mask=rm[:, None])
    else:
        tl.store(out_ptr + off, v, mask=rm[:, None])


@triton.jit
def _fwd_ns_kernel(x_ptr, phic_ptr, plo_ptr, b_ptr, alpha_ptr,
                   hpre_ptr, hpost_ptr, hres_ptr, m_ptr, r_ptr, li_ptr,
                   T, C, iters,
                   N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, PF: tl.constexpr,
                   APPLY: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr,
                   HILO: tl.constexpr, DOT_F32: tl.constexpr):
    """One CTA per BT tokens: the whole v @ phi (packed phi, see _phi_pack_kernel), the epilogue
    in registers, then (APPLY) layer_input from a second pass over the same tokens' x."""
    W: tl.constexpr = NP * NP
    HW: tl.constexpr = W // 2
    pid = tl.program_id(0)
    nC = N * C
    rows = tl.arange(0, BT)
    tok = pid * BT + rows
    tmask = tok < T
    t64 = tok.to(tl.int64)
    xrow = t64 * nC
    cols = tl.arange(0, BK)
    q2 = tl.arange(0, 2 * W)
    nck = tl.cdiv(C, BK)
    acc = tl.zeros([BT, 2 * W], dtype=tl.float32)
    ss = tl.zeros([BT], dtype=tl.float32)
    # chunk j: columns (j // N) * BK + cols of stream j % N (column-chunk outer, streams inner, so
    # the second pass, walking column chunks backwards, re-reads the most recent lines first)
    # PF: x tiles are loaded one chunk ahead into registers (the pipeliner stages only phi, the
    # operand that goes through shared memory; x goes to the MMA from registers after the fp32
    # conversion). Past the last chunk, c >= C masks the prefetch off.
    if PF:
        xn = tl.load(x_ptr + xrow[:, None] + cols[None, :],
                     mask=tmask[:, None] & (cols < C)[None, :], other=0.0)
    for j in range(N * nck):
        cb = j // N
        i = j - cb * N
        c = cb * BK + cols
        cm = c < C
        kcol = i * C + c
        if PF:
            xc = xn
            j1 = j + 1
            cb1 = j1 // N
            c1 = cb1 * BK + cols
            xn = tl.load(x_ptr + xrow[:, None] + ((j1 - cb1 * N) * C + c1)[None, :],
                         mask=tmask[:, None] & (c1 < C)[None, :], other=0.0)
        else:
            xc = tl.load(x_ptr + xrow[:, None] + kcol[None, :], mask=tmask[:, None] & cm[None, :],
                         other=0.0)
        xt = xc.to(tl.float32)
        if HILO:
            acc = _dot_hilo(xc, phic_ptr, plo_ptr, kcol[:, None] * (2 * W) + q2[None, :], cm[:, None],
                            acc, DOT_F32)
        else:
            pt = tl.load(phic_ptr + kcol[:, None] * (2 * W) + q2[None, :], mask=cm[:, None], other=0.0)
            acc = tl.dot(xt, pt, acc, input_precision=PREC)
        ss += tl.sum(xt * xt, axis=1)
    # ---------------- epilogue (per token, in registers)
    r = tl.sqrt(ss / nC + 1e-6)
    acc = acc / r[:, None]
    pp, res = tl.split(tl.reshape(acc, [BT, W, 2]))
    pre, post = tl.split(tl.reshape(pp, [BT, HW, 2]))
    res = tl.reshape(res, [BT, NP, NP])
    jh = tl.arange(0, HW)
    jv = jh < N
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    valid = (i3 < N) & (j3 < N)
    m2 = tmask[:, None] & jv[None, :]
    m3 = tmask[:, None, None] & valid
    hp = tl.sigmoid(tl.load(alpha_ptr) * pre + tl.load(b_ptr + jh, mask=jv, other=0.0)[None, :])
    hq = 2.0 * tl.sigmoid(tl.load(alpha_ptr + 1) * post
                          + tl.load(b_ptr + N + jh, mask=jv, other=0.0)[None, :])
    L = tl.load(alpha_ptr + 2) * res + tl.load(b_ptr + 2 * N + i3 * N + j3, mask=valid, other=0.0)
    tl.store(hpre_ptr + t64[:, None] * N + jh[None, :], hp, mask=m2)
    tl.store(hpost_ptr + t64[:, None] * N + jh[None, :], hq, mask=m2)
    if SAVE:
        tl.store(m_ptr + t64[:, None] * K + jh[None, :], pre, mask=m2)
        tl.store(m_ptr + t64[:, None] * K + N + jh[None, :], post, mask=m2)
        tl.store(m_ptr + t64[:, None, None] * K + 2 * N + i3 * N + j3, res, mask=m3)
        tl.store(r_ptr + t64, r, mask=tmask)
    M, _mx = _sk_init(L, valid)
    for _it in range(iters):
        M = _sk_step(M, 1e-6)
    tl.store(hres_ptr + t64[:, None, None] * (N * N) + i3 * N + j3, M, mask=m3)
    if APPLY:
        # ---------------- layer_input = sum_i h_pre[i] x[i]; h_pre back from memory (written by
        # this CTA above: the barrier makes it visible to all its threads)
        tl.debug_barrier()
        cc = tl.arange(0, BC)
        ncc = tl.cdiv(C, BC)
        for u in range(ncc):
            c = (ncc - 1 - u) * BC + cc
            lm = tmask[:, None] & (c < C)[None, :]
            li = tl.zeros([BT, BC], dtype=tl.float32)
            for i in tl.static_range(N):
                h_i = tl.load(hpre_ptr + t64 * N + i, mask=tmask, other=0.0)
                xt = tl.load(x_ptr + xrow[:, None] + (i * C + c)[None, :], mask=lm, other=0.0)
                li += h_i[:, None] * xt.to(tl.float32)
            tl.store(li_ptr + t64[:, None] * C + c[None, :], li.to(li_ptr.dtype.element_ty), mask=lm)


# ====================================================================== backward kernels
@triton.jit
def _bwd_coef_kernel(x_ptr, gli_ptr, gpre_ptr, gpost_ptr, gres_ptr, m_ptr, r_ptr, b_ptr, alpha_ptr,
                     du_ptr, coef_ptr, dbp_ptr, dap_ptr,
                     T, C, iters, Q,
                     N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr,
                     HAS_LI: tl.constexpr, HAS_GPRE: tl.constexpr, HAS_GPOST: tl.constexpr,
                     HAS_GRES: tl.constexpr):
    pid = tl.program_id(0)
    nC = N * C
    rows = tl.arange(0, BT)
    tok = pid * BT + rows
    tmask = tok < T
    t64 = tok.to(tl.int64)
    jn = tl.arange(0, NP)
    jv = jn < N
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    valid = (i3 < N) & (j3 < N)
    m2 = tmask[:, None] & jv[None, :]
    m3 = tmask[:, None, None] & valid

    # ---- dh_pre
    if HAS_LI:
        # dh_pre[t, i] = sum_c g_li[t, c] x[t, i, c]: elementwise accumulation, one reduction at the end
        acc3 = tl.zeros([BT, NP, BC], dtype=tl.float32)
        c3 = tl.arange(0, BC)[None, None, :]
        for c0 in tl.range(0, C, BC, num_stages=STAGES):
            cm3 = (c0 + c3) < C
            gl = tl.load(gli_ptr + t64[:, None, None] * C + c0 + c3,
                         mask=tmask[:, None, None] & cm3, other=0.0).to(tl.float32)
            x3 = tl.load(x_ptr + t64[:, None, None] * nC + i3 * C + c0 + c3,
                         mask=tmask[:, None, None] & (i3 < N) & cm3, other=0.0)
            acc3 += x3.to(tl.float32) * gl
        dh = tl.sum(acc3, axis=2)
    elif HAS_GPRE:
        dh = tl.load(gpre_ptr + t64[:, None] * N + jn[None, :], mask=m2, other=0.0)
    else:
        dh = tl.zeros([BT, NP], dtype=tl.float32)

    # ---- recompute the coefficients from the saved m, r
    mp = tl.load(m_ptr + t64[:, None] * K + jn[None, :], mask=m2, other=0.0)
    mq = tl.load(m_ptr + t64[:, None] * K + N + jn[None, :], mask=m2, other=0.0)
    mr = tl.load(m_ptr + t64[:, None, None] * K + 2 * N + i3 * N + j3, mask=m3, other=0.0)
    r = tl.load(r_ptr + t64, mask=tmask, other=1.0)
    a0 = tl.load(alpha_ptr)
    a1 = tl.load(alpha_ptr + 1)
    a2 = tl.load(alpha_ptr + 2)
    hp = tl.sigmoid(a0 * mp + tl.load(b_ptr + jn, mask=jv, other=0.0)[None, :])
    dpre = tl.where(m2, dh * hp * (1.0 - hp), 0.0)
    if HAS_GPOST:
        gq = tl.load(gpost_ptr + t64[:, None] * N + jn[None, :], mask=m2, other=0.0)
        sq = tl.sigmoid(a1 * mq + tl.load(b_ptr + N + jn, mask=jv, other=0.0)[None, :])
        dpost = tl.where(m2, 2.0 * gq * sq * (1.0 - sq), 0.0)
    else:
        dpost = tl.zeros([BT, NP], dtype=tl.float32)
    if HAS_GRES:
        L = a2 * mr + tl.load(b_ptr + 2 * N + i3 * N + j3, mask=valid, other=0.0)
        Gr = tl.load(gres_ptr + t64[:, None, None] * (N * N) + i3 * N + j3, mask=m3, other=0.0)
        dres = _sinkhorn_bwd(L, Gr, valid, iters, Q, 1e-6)
        dres = tl.where(m3, dres, 0.0)
    else:
        dres = tl.zeros([BT, NP, NP], dtype=tl.float32)

    # ---- chain rule: m = u / r, u = v @ phi, r = sqrt(mean(v^2) + eps)
    dmp = a0 * dpre
    dmq = a1 * dpost
    dmr = a2 * dres
    dr = -(tl.sum(dmp * mp, axis=1) + tl.sum(dmq * mq, axis=1)
           + tl.sum(tl.sum(dmr * mr, axis=2), axis=1)) / r
    tl.store(coef_ptr + t64, dr / (nC * r), mask=tmask)
    tl.store(du_ptr + t64[:, None] * K + jn[None, :], dmp / r[:, None], mask=m2)
    tl.store(du_ptr + t64[:, None] * K + N + jn[None, :], dmq / r[:, None], mask=m2)
    tl.store(du_ptr + t64[:, None, None] * K + 2 * N + i3 * N + j3, dmr / r[:, None, None], mask=m3)
    # ---- per-CTA partials of db and dalpha (summed on the host side)
    pb = pid.to(tl.int64) * K
    tl.store(dbp_ptr + pb + jn, tl.sum(dpre, axis=0), mask=jv)
    tl.store(dbp_ptr + pb + N + jn, tl.sum(dpost, axis=0), mask=jv)
    vj = (tl.arange(0, NP)[:, None] < N) & (tl.arange(0, NP)[None, :] < N)
    tl.store(dbp_ptr + pb + 2 * N + tl.arange(0, NP)[:, None] * N + tl.arange(0, NP)[None, :],
             tl.sum(dres, axis=0), mask=vj)
    tl.store(dap_ptr + pid * 3, tl.sum(tl.sum(dpre * mp, axis=1), axis=0))
    tl.store(dap_ptr + pid * 3 + 1, tl.sum(tl.sum(dpost * mq, axis=1), axis=0))
    tl.store(dap_ptr + pid * 3 + 2, tl.sum(tl.sum(tl.sum(dres * mr, axis=2), axis=1), axis=0))


@triton.jit
def _bwd_dx_dphi_kernel(x_ptr, phi_ptr, du_ptr, coef_ptr, hpre_ptr, gli_ptr, dx_ptr, dphi_ptr,
                        T, C, NCB, TPS, TS,
                        N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                        BT: tl.constexpr, BR: tl.constexpr, STAGES: tl.constexpr,
                        HAS_LI: tl.constexpr, DX: tl.constexpr, DPHI: tl.constexpr,
                        ACC: tl.constexpr, PREC: tl.constexpr, DPHI_BF16: tl.constexpr,
                        DOT_F32: tl.constexpr, EVEN_T: tl.constexpr, EVEN_C: tl.constexpr):
    # CTA (stream i, BR columns, token range ts): dx = du @ phi_i^T + coef x + h_pre[i] g_li on
    # tensor cores (tf32), dphi_i partial += x^T @ du (DPHI_BF16: bf16 x as loaded times du split
    # into hi + lo in bf16, fp32 accumulation: x exact, du to ~16 bits; else PREC on x in fp32).
    # Addresses: a 64-bit scalar base per token block + loop-invariant 32-bit in-block offsets.
    # (C itself, not C/8: triton's divisibility-by-16 specialisation of C gives the 16-byte row
    # alignment at the widths that matter, and C/8 cost 8-16 registers at n = 4.)
    # EVEN_T / EVEN_C: whole token blocks / column blocks (no masks to carry through the
    # software pipeline, STAGES deep).
    pid = tl.program_id(0)
    i = pid % N                       # stream fastest: the n CTAs sharing g_li columns run together
    cb = (pid // N) % NCB
    # The last token range first, each range walked from its end: the first reads then hit what the
    # coefficient-backward kernel (tokens in increasing order) left in L2.
    ts = TS - 1 - pid // (N * NCB)
    nC = N * C
    c = cb * BR + tl.arange(0, BR)
    cmask = c < C
    kk = tl.arange(0, KP)
    kmask = kk < K
    prow = (i * C + c).to(tl.int64)
    rows = tl.arange(0, BT)
    if DX:
        phi_t = tl.load(phi_ptr + prow[:, None] * K + kk[None, :],
                        mask=cmask[:, None] & kmask[None, :], other=0.0)
        phi_T = tl.trans(phi_t)
    acc = tl.zeros([BR, KP], dtype=tl.float32)
    t_lo = ts * TPS
    t_hi = tl.minimum(t_lo + TPS, T)
    nb = tl.cdiv(t_hi - t_lo, BT)
    xo = rows[:, None] * nC + (i * C + c)[None, :]
    go = rows[:, None] * C + c[None, :]
    do = rows[:, None] * K + kk[None, :]
    for kb in tl.range(0, nb, num_stages=STAGES):
        t0 = t_lo + (nb - 1 - kb) * BT
        t064 = t0.to(tl.int64)
        if EVEN_T:
            tmask = rows >= 0
        else:
            tmask = rows < t_hi - t0
        if EVEN_C:
            lm = tmask[:, None]
        else:
            lm = tmask[:, None] & cmask[None, :]
        xb = x_ptr + t064 * nC
        if EVEN_T and EVEN_C:
            xt = tl.load(xb + xo)
        else:
            xt = tl.load(xb + xo, mask=lm, other=0.0)
        if EVEN_T:
            du = tl.load(du_ptr + t064 * K + do, mask=kmask[None, :], other=0.0)
        else:
            du = tl.load(du_ptr + t064 * K + do, mask=tmask[:, None] & kmask[None, :], other=0.0)
        if DPHI:
            if DPHI_BF16:
                acc = dot_xT_hilo(xt, du, acc, DOT_F32)
            elif DOT_F32:
                acc = tl.dot(tl.trans(xt.to(tl.float32)), du, acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(xt.to(tl.float32)), du, acc, input_precision=PREC)
        if DX:
            if DOT_F32:
                dxt = tl.dot(du, phi_T, input_precision="ieee")
            else:
                dxt = tl.dot(du, phi_T, input_precision=PREC)
            cf = tl.load(coef_ptr + t0 + rows, mask=tmask, other=0.0)
            dxt += cf[:, None] * xt.to(tl.float32)
            if HAS_LI:
                hp = tl.load(hpre_ptr + (t0 + rows).to(tl.int64) * N + i, mask=tmask, other=0.0)
                gb = gli_ptr + t064 * C
                if EVEN_T and EVEN_C:
                    gl = tl.load(gb + go)
                else:
                    gl = tl.load(gb + go, mask=lm, other=0.0)
                dxt += hp[:, None] * gl.to(tl.float32)
            optr = dx_ptr + t064 * nC + xo
            store_grad(optr, dxt, lm, EVEN_T and EVEN_C, ACC)
    if DPHI:
        tl.store(dphi_ptr + ts.to(tl.int64) * nC * K + prow[:, None] * K + kk[None, :], acc,
                 mask=cmask[:, None] & kmask[None, :])


def _check(op, x, phi, b, alpha, sinkhorn_iters):
    T, n, C = check_state(op, x)
    K = n * n + 2 * n
    phi = check_tensor(op, phi, "phi", (n * C, K), torch.float32, x.device)
    b = check_tensor(op, b, "b", (K,), torch.float32, x.device)
    alpha = check_tensor(op, alpha, "alpha", (3,), torch.float32, x.device)
    if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 1:
        raise ValueError(f"{op}: sinkhorn_iters must be an int >= 1, got {sinkhorn_iters!r}")
    return x.contiguous(), phi, b, alpha, T, n, C, K


def _shapes(n):
    K = n * n + 2 * n
    return K, max(2, _np2(n)), max(16, _np2(K))


# Config fields that only the non-split forward reads: set explicitly, they make split=auto pick it.
_NS_FIELDS = frozenset({"ns_bt", "ns_bk", "ns_bc", "ns_warps", "ns_stages", "ns_prefetch"})


def _ns_bt(cfg: Config, T: int) -> int:
    return max(16, min(_np2(cfg.ns_bt), _np2(T)))


def use_split(cfg: Config) -> bool:
    """Which forward runs: the split kernel (the default at every T) or the non-split one."""
    if cfg.split >= 0:
        return bool(cfg.split)
    return not (cfg.explicit & _NS_FIELDS)


def _ns_np(n: int) -> int:
    return max(4, _np2(n))      # res tile [NP, NP] with NP*NP >= 16 (tl.dot N >= 16)


def pack_phi(phi: torch.Tensor, n: int, hilo_dtype: torch.dtype | None = None):
    """phi [nC, n*n+2n] -> [nC, 2*NP*NP] in the non-split kernel's column order (zero padded);
    with hilo_dtype, the pair (hi, lo) of that layout in that dtype (kernels/hilo.py's split)."""
    R, K = phi.shape
    NP = _ns_np(n)
    out = torch.empty(R, 2 * NP * NP, device=phi.device, dtype=hilo_dtype or phi.dtype)
    lo = torch.empty_like(out) if hilo_dtype is not None else out
    BR = 64
    if R:
        _phi_pack_kernel[(triton.cdiv(R, BR),)](phi, out, lo, R, N=n, NP=NP, K=K, BR=BR,
                                                HILO=hilo_dtype is not None, num_warps=4)
    return (out, lo) if hilo_dtype is not None else out


def _hilo(cfg: Config) -> bool:
    if cfg.fwd_dot not in ("hilo", "f32"):
        raise ValueError(f"mhc_pre: config fwd_dot must be 'hilo' or 'f32', got {cfg.fwd_dot!r}")
    return cfg.fwd_dot == "hilo"


def phi_as_used(phi: torch.Tensor, dtype: torch.dtype, config=None) -> torch.Tensor:
    """The phi the forward GEMM multiplies by, in fp32 (for a reference that matches the kernel):
    hi + lo in dtype for fwd_dot="hilo", else phi at `precision` (tf32: the H100's tensor cores
    drop the low 13 mantissa bits, truncation; measured in dev/logs/tuning-20261123-h100/pass4)."""
    cfg = _config(config)
    if _hilo(cfg):
        hi, lo = split_hi_lo(phi.detach().float(), dtype, phi.shape[1])
        return hi.float() + lo.float()
    if cfg.precision == "tf32":
        bits = phi.detach().float().contiguous().view(torch.int32)
        return (bits & ~0x1FFF).view(torch.float32)
    return phi.detach().float()


def _forward_ns(x, phi, b, alpha, iters, apply, save, cfg, outs):
    li, h_pre, h_post, h_res, m, r = outs
    T, n, C = x.shape
    K = n * n + 2 * n
    NP = _ns_np(n)
    bt = _ns_bt(cfg, T)
    bk = max(16, _np2(cfg.ns_bk))
    bc = max(16, _np2(cfg.ns_bc))
    hilo = _hilo(cfg)
    if hilo:
        phic, plo = pack_phi(phi, n, x.dtype)
    else:
        phic = plo = pack_phi(phi, n)
    _fwd_ns_kernel[(triton.cdiv(T, bt),)](
        x, phic, plo, b, alpha, h_pre, h_post, h_res, m, r, li, T, C, iters,
        N=n, NP=NP, K=K, BT=bt, BK=bk, BC=bc, PF=cfg.ns_prefetch > 0, APPLY=apply, SAVE=save,
        PREC=cfg.precision, HILO=hilo, DOT_F32=interpreting(), num_warps=cfg.ns_warps,
        num_stages=cfg.ns_stages)
    _LAST.pop("sync", None)
    return outs


def _forward(x, phi, b, alpha, iters, apply, save, cfg: Config):
    T, n, C = x.shape
    K, NP, KP = _shapes(n)
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
    if not use_split(cfg):
        return _forward_ns(x, phi, b, alpha, iters, apply, save, cfg, (li, h_pre, h_post, h_res, m, r))
    bt = max(16, min(_np2(cfg.bt), _np2(T)))
    bk = max(16, _np2(cfg.bk))
    warps = cfg.warps
    if KP >= 64 and "bk" not in cfg.explicit:      # n >= 5: wide phi tiles, keep registers in check
        bk, warps = min(bk, 32), max(warps, 8)
    cw = max(bk, (cfg.cw // bk) * bk)
    G = triton.cdiv(T, bt)
    nsm = _num_sms(dev)
    while cw > bk and G * triton.cdiv(C, cw) < cfg.min_items * nsm:
        cw = max(bk, (cw // 2 // bk) * bk)
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
    # epilogue unroll: slices whose partials are loaded together ([BT, n*n] tiles cost registers)
    eu = min(max(1, cfg.epi_unroll if NP <= 4 else cfg.epi_unroll // 2), _np2(S))
    eu2 = min(max(1, cfg.epi_unroll // 2 if NP <= 4 else cfg.epi_unroll // 8), _np2(S))
    ws = torch.empty(ring * S * bt * K, device=dev, dtype=f32)
    wss = torch.empty(ring * S * bt, device=dev, dtype=f32)
    sync = torch.zeros(G + 2, device=dev, dtype=torch.int32)
    hilo = _hilo(cfg)
    phi_hi, phi_lo = split_weight_hi_lo(phi, x.dtype, KP) if hilo else (phi, phi)
    _fwd_kernel[(grid,)](
        x, phi_hi, phi_lo, b, alpha, ws, wss, sync, h_pre, h_post, h_res, m, r, li,
        T, C, G, S, cw // bk, lag, total, ring, iters,
        N=n, NP=NP, K=K, KP=KP, BT=bt, BK=bk, APPLY=fused, SAVE=save, PREC=cfg.precision,
        HILO=hilo, DOT_F32=interpreting(),
        MAXSPIN=MAX_SPIN, NT=32 * warps, EARLY=cfg.early, EU=eu, EU2=eu2,
        num_warps=warps, num_stages=cfg.stages)
    _LAST["sync"] = sync
    if apply and not fused:
        abt, abc = _np2(cfg.apply_bt), _np2(cfg.apply_bc)
        apply_pre(x, h_pre, li, abt, abc)
    return li, h_pre, h_post, h_res, m, r


_LAST: dict = {}


def sync_errors() -> int:
    """Timed-out waits in the last forward and last fused backward (0 when synchronisation worked)."""
    return sum(int(v[1].item()) for v in _LAST.values())


def _backward(x, phi, b, alpha, m, r, h_pre, iters, g_first, g_post, g_res, with_li, needs, cfg,
              dx_acc=None):
    need_x, need_phi, need_b, need_alpha = needs
    T, n, C = x.shape
    K, NP, KP = _shapes(n)
    dev = x.device
    f32 = torch.float32
    has_li = with_li and g_first is not None
    has_gpre = (not with_li) and g_first is not None
    gli = g_first.contiguous() if has_li else x
    gpre = g_first.contiguous() if has_gpre else m
    gpost = g_post.contiguous() if g_post is not None else m
    gres = g_res.contiguous() if g_res is not None else m
    dx = dphi = db = dalpha = None
    if T == 0:
        dx0 = dx_acc if dx_acc is not None else torch.zeros_like(x)
        return (dx0 if need_x else None, torch.zeros_like(phi) if need_phi else None,
                torch.zeros_like(b) if need_b else None, torch.zeros_like(alpha) if need_alpha else None)
    bt1 = max(1, min(_np2(cfg.b1_bt), _np2(T)))
    bc1 = max(16, _np2(cfg.b1_bc))
    while bc1 > 16 and bt1 * NP * bc1 > 4096:     # bound the [BT, NP, BC] fp32 accumulator
        bc1 //= 2
    g1 = triton.cdiv(T, bt1)
    du = torch.empty(T, K, device=dev, dtype=f32)
    coef = torch.empty(T, device=dev, dtype=f32)
    dbp = torch.empty(g1, K, device=dev, dtype=f32)
    dap = torch.empty(g1, 3, device=dev, dtype=f32)
    Q = max(1, math.isqrt(iters - 1) + 1) if iters > 1 else 1
    _bwd_coef_kernel[(g1,)](
        x, gli, gpre, gpost, gres, m, r, b, alpha, du, coef, dbp, dap,
        T, C, iters, Q,
        N=n, NP=NP, K=K, BT=bt1, BC=bc1, STAGES=cfg.b1_stages, HAS_LI=has_li,
        HAS_GPRE=has_gpre, HAS_GPOST=g_post is not None, HAS_GRES=g_res is not None,
        num_warps=cfg.b1_warps)
    if need_b or need_alpha:
        sums = column_sums(dbp, dap)
        db = sums[:K] if need_b else None
        dalpha = sums[K:] if need_alpha else None
    if need_x or need_phi:
        bt2 = max(16, min(_np2(cfg.b2_bt), _np2(T)))
        br = max(16, _np2(cfg.b2_br))
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
            from kernels.triton.hc_pre import resident_ctas
            ctas = cfg.b2_ctas if cfg.b2_ctas > 0 else resident_ctas(
                _bwd_dx_dphi_kernel, [x, phi, du, coef, h_pre, gli, dx, du, T, C, ncb, bt2, 3],
                kw, 3)
            slots, units = ctas * _num_sms(dev), n * ncb
            t_k = {k: triton.cdiv(k * units, slots) / k for k in range(1, min(nblk, 64) + 1)}
            ts = min(k for k, v in t_k.items() if v <= 1.05 * min(t_k.values()))
        tps = triton.cdiv(nblk, ts) * bt2
        ts = triton.cdiv(T, tps)
        dphi_ws = torch.empty(ts, n * C, K, device=dev, dtype=f32) if need_phi else du
        _bwd_dx_dphi_kernel[(n * ncb * ts,)](
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
    cfg = _config(config)
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
    return _apply(x, xc, phi, b, alpha, sinkhorn_iters, False, _config(config))


def mhc_pre(x, phi, b, alpha, sinkhorn_iters: int = 20, *, config=None):
    """(layer_input [T,C] in x.dtype, h_post [T,n] fp32, h_res [T,n,n] fp32)."""
    xc, phi, b, alpha, *_ = _check("mhc_pre", x, phi, b, alpha, sinkhorn_iters)
    return _apply(x, xc, phi, b, alpha, sinkhorn_iters, True, _config(config))
