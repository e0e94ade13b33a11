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
  _build_gemm_norm (GPU only: wgmma + TMA; sized for GEMM_MINB = 2 CTAs per SM, so the 256 CTAs
    of T = 16384 fit one wave of 132 SMs): grid cdiv(T, 64); a CTA streams its 64 tokens' x
    [64, nC] in 64-column chunks (TMA, 3 stages, warp-specialised), accumulates x @ phi_hi and
    x @ phi_lo in one [64, KP] fp32 fragment and the sum of squares from the same shared tile;
    writes m = (x @ phi) / r [T, K] and r [T] (also what the backward needs).
  _build_coef (per token, one thread each): bias, alpha, sigmoid, 2*sigmoid, the max-shifted exp
    and all Sinkhorn iterations in registers; writes h_pre, h_post, h_res.
  build_apply (mhc_pre only; one CTA per token): layer_input = sum_i h_pre[i] x[i].
  HBM bytes per token: read 2nC*e (x twice: GEMM, then apply) + small, write C*e + (n*n+3n+1)*4.
  The floor (MATH.md) reads x once: the GEMM kernel would have to finish a token block's Sinkhorn
  and then re-read the block's x, which at 64 tokens x nC is 2 MB per CTA (n=4, C=4096), far past
  what stays in L1 or L2 across CTAs in flight; this version pays the second read.

Backward:
  build_dhpre (mhc_pre only; one CTA per token): dh_pre[i] = sum_c g_li[c] x[i, c].
  _build_coef_bwd (per token, one thread each): sigmoid derivatives, the Sinkhorn backward -
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
    _build_dx_dphi_tile (default; mHC when br divides C, so a CTA's columns lie in one stream,
    HC when n divides bt): every operand of the elementwise part - x, du, coef and h_pre (one
    [n+1, T] fp32 array, h_pre transposed so a stream's values are contiguous), the g_li tile,
    dx_in - arrives in shared memory through the pipeline (TMA from a producer warpgroup,
    warp-specialised, or cp.async), the result leaves through a shared tile and a TMA store;
    2 CTAs per SM (__launch_bounds__, no setmaxnreg), R sized at launch so the last wave of CTAs
    is nearly full. _build_dx_dphi_row (the first version; any n and C): the elementwise part
    reads coef, h_pre and g_li element by element from global memory after a round trip of the
    GEMM tile through fp32 shared memory, 1 CTA per SM (240 registers): 2.3 ms at n=4, C=4096,
    T=16384 on an H100 (514 GB/s).
    mHC CTAs are launched stream fastest (the n CTAs reading the same g_li columns together).
    Its inputs come from _build_dx_prep (one thread per row): du scaled by a power of two and
    split into hi + lo, inv_scale, and the coef / h_pre rows, in one launch instead of about a
    dozen torch ops (DxConfig.prep = 0: those torch ops).
  HBM bytes per token: read 2nC*e (x in dhpre and dx/dphi) + C*e (g_li; its n re-reads from
  L2) (+ nC*e dx_in) + small, write nC*e.

Site link (kernels/site_link.py): mhc_pre / mhc_coeffs tag h_res with a link to the caller's x;
a fused post (kernels/tilelang/post.py) of that x and h_res hands its dx over instead of
returning it, and this backward takes it first (on every path that returns dx) and adds into it.

CPU ("c" target, tests): _build_coef, _build_coef_bwd, build_apply and build_dhpre compile
there (the per-token threads become a serial loop); the two GEMM kernels are GPU only.
"""

import functools
import json
import math
import os
from dataclasses import dataclass, replace

import torch

from kernels import site_link
from kernels.colsum import column_sums, segment_sums
from kernels.hilo import split_hi_lo, split_weight_hi_lo
from kernels.reference import EPS_RMS, EPS_SK
from kernels.tilelang.common import (
    TL_DTYPES,
    block_c,
    check_state,
    check_tensor,
    compile_kernel,
    on_device,
)

TOK_PER_CTA = 128       # per-token kernels: tokens (threads) per CTA
GEMM_BT = 64            # tokens per CTA of the GEMM kernels (wgmma M)
GEMM_BK = 64            # columns of x per chunk


def _kp(n: int, hc: bool = False) -> int:
    return max(16, -(-((n + 2) if hc else (n * n + 2 * n)) // 16) * 16)


def _seg(iters: int) -> int:
    return max(1, math.isqrt(iters - 1) + 1) if iters > 1 else 1


# ====================================================================== per-token kernels
def sinkhorn_macros(n: int, iters: int):
    """(sk_step, coefficients): T.macro pieces of one token's forward epilogue, per thread.
    sk_step(M, cs): one Sinkhorn iteration (columns, then rows) on the [n*n] local M.
    coefficients(t, m, b, alpha, h_pre, h_post, h_res, M, cs): token t's h_pre, h_post, h_res from
    its logits m[t, :] (sigmoid, 2*sigmoid, max-shifted exp and `iters` Sinkhorn iterations)."""
    import tilelang.language as T

    nn = n * n

    @T.macro
    def sk_step(M, cs):
        for j in T.unroll(n):
            cs[0] = 0.0
            for i in T.unroll(n):
                cs[0] += M[i * n + j]
            for i in T.unroll(n):
                M[i * n + j] = M[i * n + j] / (cs[0] + EPS_SK)
        for i in T.unroll(n):
            cs[0] = 0.0
            for j in T.unroll(n):
                cs[0] += M[i * n + j]
            for j in T.unroll(n):
                M[i * n + j] = M[i * n + j] / (cs[0] + EPS_SK)

    @T.macro
    def coefficients(t, m, b, alpha, h_pre, h_post, h_res, M, cs):
        for i in T.unroll(n):
            h_pre[t, i] = T.sigmoid(alpha[0] * m[t, i] + b[i])
            h_post[t, i] = 2.0 * T.sigmoid(alpha[1] * m[t, n + i] + b[n + i])
        for k in T.unroll(nn):
            M[k] = alpha[2] * m[t, 2 * n + k] + b[2 * n + k]
        cs[1] = M[0]
        for k in T.unroll(nn):
            cs[1] = T.max(cs[1], M[k])
        for k in T.unroll(nn):
            M[k] = T.exp(M[k] - cs[1])
        for _ in T.serial(iters):
            sk_step(M, cs)
        for k in T.unroll(nn):
            h_res[t, k // n, k % n] = M[k]

    return sk_step, coefficients


@functools.cache
def _build_coef(n: int, iters: int, cpu: bool):
    """m [T, K] -> h_pre, h_post, h_res; one thread per token."""
    import tilelang.language as T

    K = n * n + 2 * n
    nn = n * n
    nt = TOK_PER_CTA
    Tn = T.dynamic("T")
    f32 = "float32"

    _, coefficients = sinkhorn_macros(n, iters)

    @T.macro
    def token(t, m, b, alpha, h_pre, h_post, h_res, M, cs):
        if t < Tn:
            coefficients(t, m, b, alpha, h_pre, h_post, h_res, M, cs)

    @T.prim_func
    def mhc_coef(m: T.Tensor((Tn, K), f32), b: T.Tensor((K,), f32), alpha: T.Tensor((3,), f32),
                 h_pre: T.Tensor((Tn, n), f32), h_post: T.Tensor((Tn, n), f32),
                 h_res: T.Tensor((Tn, n, n), f32)):
        with T.Kernel(T.ceildiv(Tn, nt), threads=1 if cpu else nt) as bx:
            M = T.alloc_local((nn,), f32)
            cs = T.alloc_local((2,), f32)
            if cpu:
                for tx in T.serial(nt):
                    token(bx * nt + tx, m, b, alpha, h_pre, h_post, h_res, M, cs)
            else:
                token(bx * nt + T.get_thread_binding(0), m, b, alpha, h_pre, h_post, h_res, M, cs)

    return compile_kernel(mhc_coef, cpu)


@functools.cache
def _build_coef_bwd(n: int, C: int, iters: int, cpu: bool):
    """(m, r, dh_pre, g_post, g_res) -> dlogit [T, K], du [T, K], coef [T]; one thread per token."""
    import tilelang.language as T

    K = n * n + 2 * n
    nn = n * n
    nC = n * C
    nt = TOK_PER_CTA
    Q = _seg(iters)
    nseg = -(-iters // Q)
    Tn = T.dynamic("T")
    f32 = "float32"

    sk_step, _ = sinkhorn_macros(n, iters)

    @T.macro
    def sk_step_bwd(P, G, cs, rs, s):
        # P = M_{k-1} (overwritten with A), G = dL/dM_k in, dL/dM_{k-1} out.
        for j in T.unroll(n):
            cs[j] = EPS_SK
            for i in T.unroll(n):
                cs[j] += P[i * n + j]
            for i in T.unroll(n):
                P[i * n + j] = P[i * n + j] / cs[j]
        for i in T.unroll(n):
            rs[i] = EPS_SK
            for j in T.unroll(n):
                rs[i] += P[i * n + j]
            s[0] = 0.0
            for j in T.unroll(n):
                s[0] += G[i * n + j] * (P[i * n + j] / rs[i])
            for j in T.unroll(n):
                G[i * n + j] = (G[i * n + j] - s[0]) / rs[i]
        for j in T.unroll(n):
            s[0] = 0.0
            for i in T.unroll(n):
                s[0] += G[i * n + j] * P[i * n + j]
            for i in T.unroll(n):
                G[i * n + j] = (G[i * n + j] - s[0]) / cs[j]

    @T.macro
    def token(t, m, r, b, alpha, dh_pre, g_post, g_res, dlogit, du, coef,
              L, M0, P, G, ck, cs, rs, s):
        if t < Tn:
            # s[1]: sum of dm * m (for dr); s[2..]: scratch
            s[1] = 0.0
            for i in T.unroll(n):
                s[2] = T.sigmoid(alpha[0] * m[t, i] + b[i])
                s[3] = dh_pre[t, i] * s[2] * (1.0 - s[2])
                dlogit[t, i] = s[3]
                du[t, i] = alpha[0] * s[3] / r[t]
                s[1] += alpha[0] * s[3] * m[t, i]
                s[2] = T.sigmoid(alpha[1] * m[t, n + i] + b[n + i])
                s[3] = 2.0 * g_post[t, i] * s[2] * (1.0 - s[2])
                dlogit[t, n + i] = s[3]
                du[t, n + i] = alpha[1] * s[3] / r[t]
                s[1] += alpha[1] * s[3] * m[t, n + i]
            # Sinkhorn backward
            for k in T.unroll(nn):
                L[k] = alpha[2] * m[t, 2 * n + k] + b[2 * n + k]
                G[k] = g_res[t, k // n, k % n]
            s[4] = L[0]
            for k in T.unroll(nn):
                s[4] = T.max(s[4], L[k])
            for k in T.unroll(nn):
                M0[k] = T.exp(L[k] - s[4])
                P[k] = M0[k]
            for sg in T.serial(nseg):
                for k in T.unroll(nn):
                    ck[sg * nn + k] = P[k]
                for q in T.serial(Q):
                    if sg * Q + q < iters:
                        sk_step(P, cs)
            for sr in T.serial(nseg):
                # segment sg = nseg-1-sr: iterations sg*Q+1 .. sg*Q+len (1-based) from checkpoint
                # M_{sg*Q}; the last segment may be short (len = iters - sg*Q)
                for kk in T.serial(Q):
                    if kk < T.min(Q, iters - (nseg - 1 - sr) * Q):
                        # back through iteration sg*Q + len - kk (maps M_{k-1} to M_k)
                        for k in T.unroll(nn):
                            P[k] = ck[(nseg - 1 - sr) * nn + k]
                        for _ in T.serial(T.min(Q, iters - (nseg - 1 - sr) * Q) - kk - 1):
                            sk_step(P, cs)
                        sk_step_bwd(P, G, cs, rs, s)
            s[5] = 0.0
            s[6] = 0.0
            for k in T.unroll(nn):
                G[k] = G[k] * M0[k]
                s[5] += G[k]
                s[6] += T.if_then_else(L[k] == s[4], 1.0, 0.0)
            for k in T.unroll(nn):
                s[7] = G[k] - T.if_then_else(L[k] == s[4], s[5] / s[6], 0.0)
                dlogit[t, 2 * n + k] = s[7]
                du[t, 2 * n + k] = alpha[2] * s[7] / r[t]
                s[1] += alpha[2] * s[7] * m[t, 2 * n + k]
            coef[t] = -s[1] / (r[t] * r[t] * nC)

    @T.prim_func
    def mhc_coef_bwd(m: T.Tensor((Tn, K), f32), r: T.Tensor((Tn,), f32), b: T.Tensor((K,), f32),
                     alpha: T.Tensor((3,), f32), dh_pre: T.Tensor((Tn, n), f32),
                     g_post: T.Tensor((Tn, n), f32), g_res: T.Tensor((Tn, n, n), f32),
                     dlogit: T.Tensor((Tn, K), f32), du: T.Tensor((Tn, K), f32),
                     coef: T.Tensor((Tn,), f32)):
        with T.Kernel(T.ceildiv(Tn, nt), threads=1 if cpu else nt) as bx:
            L = T.alloc_local((nn,), f32)
            M0 = T.alloc_local((nn,), f32)
            P = T.alloc_local((nn,), f32)
            G = T.alloc_local((nn,), f32)
            ck = T.alloc_local((nseg * nn,), f32)
            cs = T.alloc_local((n,), f32)
            rs = T.alloc_local((n,), f32)
            s = T.alloc_local((8,), f32)
            if cpu:
                for tx in T.serial(nt):
                    token(bx * nt + tx, m, r, b, alpha, dh_pre, g_post, g_res, dlogit, du, coef,
                          L, M0, P, G, ck, cs, rs, s)
            else:
                token(bx * nt + T.get_thread_binding(0), m, r, b, alpha, dh_pre, g_post, g_res,
                      dlogit, du, coef, L, M0, P, G, ck, cs, rs, s)

    return compile_kernel(mhc_coef_bwd, cpu)


# ====================================================================== per-token streaming kernels
@functools.cache
def build_apply(n: int, C: int, dtype: str, cpu: bool):
    """layer_input[t] = sum_i h_pre[t, i] x[t, i]; one CTA per token, C in BLOCK chunks."""
    import tilelang.language as T

    blk = block_c(C)
    nch = -(-C // blk)
    Tn = T.dynamic("T")
    f32 = "float32"

    @T.prim_func
    def mhc_apply(x: T.Tensor((Tn, n, C), dtype), h_pre: T.Tensor((Tn, n), f32),
                  out: T.Tensor((Tn, C), dtype)):
        with T.Kernel(Tn, threads=max(32, blk // 8)) as t:
            xl = T.alloc_fragment((n, blk), f32)
            ol = T.alloc_fragment((blk,), f32)
            hp = T.alloc_fragment((n,), f32)
            T.copy(h_pre[t, 0], hp)
            for c0 in T.serial(nch):
                T.copy(x[t, 0, c0 * blk], xl)
                for c in T.Parallel(blk):
                    ol[c] = 0.0
                    for i in T.unroll(n):
                        ol[c] += hp[i] * xl[i, c]
                T.copy(ol, out[t, c0 * blk])

    return compile_kernel(mhc_apply, cpu)


@functools.cache
def build_dhpre(n: int, C: int, dtype: str, cpu: bool):
    """dh_pre[t, i] = sum_c g_li[t, c] x[t, i, c]; one CTA per token, one reducer per stream."""
    import tilelang.language as T

    blk = block_c(C)
    nch = -(-C // blk)
    Tn = T.dynamic("T")
    f32 = "float32"

    @T.prim_func
    def mhc_dhpre(x: T.Tensor((Tn, n, C), dtype), g: T.Tensor((Tn, C), dtype),
                  dh: T.Tensor((Tn, n), f32)):
        with T.Kernel(Tn, threads=max(32, blk // 8)) as t:
            xl = T.alloc_fragment((n, blk), f32)
            gl = T.alloc_fragment((blk,), f32)
            if cpu:
                acc = T.alloc_local((n,), f32)
                for i in T.serial(n):
                    acc[i] = 0.0
            else:
                acc = T.alloc_reducer((n,), f32, op="sum")
                T.reducer_init(acc)
            for c0 in T.serial(nch):
                T.copy(x[t, 0, c0 * blk], xl)
                T.copy(g[t, c0 * blk], gl)
                for i in T.unroll(n):
                    for c in T.Parallel(blk):
                        if cpu:
                            acc[i] += gl[c] * xl[i, c]
                        else:
                            T.reducer_update(acc[i], gl[c] * xl[i, c])
            if cpu:
                for i in T.serial(n):
                    dh[t, i] = acc[i]
            else:
                tot = T.alloc_fragment((n,), f32)
                T.finalize_reducer(acc, tot)
                for i in T.Parallel(n):
                    dh[t, i] = tot[i]

    return compile_kernel(mhc_dhpre, cpu)


# ====================================================================== GEMM kernels (GPU)
# CTAs per SM the GEMM + norm kernel is sized for: 1 let TileLang give the consumer warpgroup 240
# registers (one CTA per SM: cdiv(T, 64) = 256 CTAs at T = 16384 ran in two waves on 132 SMs);
# 2 keeps it under 128 and puts two CTAs on every SM. HCBENCH_TL_GEMM_MINB overrides.
GEMM_MINB = 2


def _gemm_minb() -> int:
    return int(os.environ.get("HCBENCH_TL_GEMM_MINB", GEMM_MINB))


@functools.cache
def _build_gemm_norm(n: int, C: int, dtype: str, hc: bool = False, minb: int | None = None):
    """hc=False: rows are tokens, x [T, nC], phi [nC, n*n+2n] (mHC).
    hc=True: rows are (token, stream) pairs, x [T*n, C], w [C, n+2] (HC's per-stream norm and
    projections are the same row-norm GEMM: m = (x_row . w) * rsqrt(mean x_row^2 + eps)).
    minb: CTAs per SM (None: _gemm_minb())."""
    import tilelang.language as T

    minb = _gemm_minb() if minb is None else minb

    K = (n + 2) if hc else n * n + 2 * n
    KP = _kp(n, hc)
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
def _build_dx_prep(n: int, dtype: str, hc: bool, cpu: bool):
    """The dx / dphi kernel's inputs in one pass, one thread per row (tokens, or HC's (token,
    stream) pairs): du [R, K] fp32 and amax = max |du| -> du_hi, du_lo [R, KP] in dtype
    (du * 2^-floor(log2 amax) split into hi + lo, zero padded; the same numbers as _du_split),
    inv_scale [1]; rowc [NR, Rp] fp32 for the tile kernel: coef in row 0, h_pre in rows 1..
    (mHC: h_pre[t, i] at [1 + i, t]; HC: h_pre per row at [1, r]), zeros past R."""
    import tilelang.language as T

    K = (n + 2) if hc else n * n + 2 * n
    KP = _kp(n, hc)
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


def dx_prep(du, coef, h_pre, dtype, hc: bool):
    """_build_dx_prep on du [R, K], coef [R], h_pre (mHC [R, n]; HC [T, n], R = T * n):
    (du_hi, du_lo, inv_scale, rowc)."""
    rows = du.shape[0]
    n = h_pre.shape[1]
    KP = _kp(n, hc)
    Rp = -(-rows // 8) * 8
    dev = du.device
    amax = torch.linalg.vector_norm(du, float("inf")).reshape(1)
    du_hi = torch.empty(rows, KP, device=dev, dtype=dtype)
    du_lo = torch.empty(rows, KP, device=dev, dtype=dtype)
    inv_scale = torch.empty(1, device=dev, dtype=torch.float32)
    rowc = torch.empty((2 if hc else n + 1), Rp, device=dev, dtype=torch.float32)
    kern = _build_dx_prep(n, TL_DTYPES[dtype], hc, dev.type == "cpu")
    with on_device(du):
        kern(du, amax, coef.reshape(rows), h_pre.reshape(rows, 1 if hc else n), du_hi, du_lo,
             inv_scale, rowc)
    return du_hi, du_lo, inv_scale, rowc


@dataclass(frozen=True)
class DxConfig:
    """Launch of the dx / dphi kernel; dev/tune_tilelang_bwd.py times the alternatives.

    impl "tile": _build_dx_dphi_tile where it applies (mHC: C % br == 0, so a CTA's columns lie
    in one stream; HC: bt % n == 0, so a row block holds whole tokens), else the first version
    (_build_dx_dphi_row, also impl "row"). ws: warp-specialised (a TMA producer warpgroup, token
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
    prep: int = 1         # du split and rowc by _build_dx_prep (1) or by torch ops (0)


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


def _dx_config(cfg=None) -> DxConfig:
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


def _tile_ok(n: int, C: int, hc: bool, cfg: DxConfig) -> bool:
    return cfg.impl == "tile" and (cfg.bt % n == 0 if hc else C % cfg.br == 0)


@functools.cache
def build_dx_dphi(n: int, C: int, dtype: str, nblk: int, has_li: bool, hc: bool = False,
                   acc: bool = False, cfg: DxConfig | None = None):
    """The dx / dphi kernel for cfg (None: the default): the tile kernel where it applies, else
    the row kernel. nblk: token blocks per range (ignored by the warp-specialised tile kernel,
    whose ranges are sized at launch). Kernel arguments as dx_dphi passes them."""
    cfg = _dx_config(cfg)
    if _tile_ok(n, C, hc, cfg):
        return _build_dx_dphi_tile(n, C, dtype, 0 if cfg.ws else nblk, has_li, hc, acc, cfg.bt,
                                   cfg.br, cfg.stages, cfg.minb, cfg.ws)
    return _build_dx_dphi_row(n, C, dtype, nblk, has_li, hc, acc)


def _compile_gpu(func, pass_configs=None):
    """common.compile_kernel for the GPU, with pass configs."""
    import tilelang
    spec = os.environ.get("HCBENCH_TILELANG_TARGET")
    return tilelang.compile(func, target=json.loads(spec) if spec else "auto",
                            pass_configs=pass_configs or {})


def _build_dx_dphi_tile(n: int, C: int, dtype: str, nblk: int, has_li: bool, hc: bool, acc: bool,
                        bt: int, br: int, stages: int, minb: int, ws: bool):
    """dx = du @ phi^T * inv_scale + coef * x (+ h_pre * g_li) (+ dx, acc: in place) and the
    per-range dphi = x^T @ du * inv_scale, every operand of the elementwise part staged in shared
    memory by the pipeline (TMA or cp.async) and dx written back by a TMA store.

    Rows and columns as in _build_gemm_norm. rowc [NR, Rp] fp32 carries the per-row scalars:
    row 0 coef; mHC rows 1..n h_pre transposed (h_pre[t, s] at [1 + s, t]: a CTA's stream s is
    fixed, C % br == 0); HC row 1 h_pre per (token, stream) row. g_li tile: mHC [bt, br] at
    (t0, column within the stream); HC [bt / n, br] at (t0 / n, column), row i of the tile using
    g_li row i // n. Token range ts of R (dphi_ws's first dimension) covers blocks
    [ts * nb, (ts + 1) * nb), nb = nblk, or cdiv(cdiv(T, bt), R) when nblk == 0 (ws only).
    Loads past T or past the last column read zeros; the TMA store drops rows and columns
    outside dx."""
    import tilelang.language as T

    KP = _kp(n, hc)
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

    return _compile_gpu(mhc_dx_dphi_tile, None if ws else {"tl.disable_warp_specialized": True})


def _build_dx_dphi_row(n: int, C: int, dtype: str, nblk: int, has_li: bool, hc: bool = False,
                       acc: bool = False):
    """The first dx / dphi kernel (any n, any C multiple of 8): nblk row blocks (of GEMM_BT) per
    range, grid (cdiv(D, 64), R); the elementwise part reads coef, h_pre, g_li (and dx, acc)
    straight from global memory: mHC h_pre [T, n] at (row, col // C) and g_li [T, C] at
    (row, col % C); HC h_pre [T*n, 1] at (row, 0) and g_li [T, C] at (row // n, col)."""
    import tilelang.language as T

    KP = _kp(n, hc)
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
    """Kernel _build_coef on a [T, K] m: (h_pre, h_post, h_res)."""
    T_ = m.shape[0]
    f32 = torch.float32
    h_pre = torch.empty(T_, n, device=m.device, dtype=f32)
    h_post = torch.empty(T_, n, device=m.device, dtype=f32)
    h_res = torch.empty(T_, n, n, device=m.device, dtype=f32)
    if T_:
        kern = _build_coef(n, iters, m.device.type == "cpu")
        with on_device(m):
            kern(m, b, alpha, h_pre, h_post, h_res)
    return h_pre, h_post, h_res


def coeffs_backward(m, r, b, alpha, dh_pre, g_post, g_res, C, iters):
    """Kernel _build_coef_bwd: (dlogit [T,K], du [T,K], coef [T]); all gradients given (zeros if none)."""
    T_ = m.shape[0]
    n = dh_pre.shape[1]
    dlogit = torch.empty_like(m)
    du = torch.empty_like(m)
    coef = torch.empty_like(r)
    if T_:
        kern = _build_coef_bwd(n, C, iters, m.device.type == "cpu")
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
    hi, lo = split_weight_hi_lo(phi, x.dtype, _kp(n, hc))
    m = torch.empty(rows, K, device=x.device, dtype=torch.float32)
    r = torch.empty(rows, device=x.device, dtype=torch.float32)
    if T_:
        kern = _build_gemm_norm(n, C, TL_DTYPES[x.dtype], hc, _gemm_minb())
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
    cfg = _dx_config(cfg)
    C = D if C is None else C
    if not _tile_ok(n, C, hc, cfg):
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
    subnormals (undone in the kernel through inv_scale). The torch form of _build_dx_prep."""
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
    KP = _kp(n, hc)
    dt = x.dtype
    cfg = _dx_config(cfg)
    tile = _tile_ok(n, C, hc, cfg)
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
