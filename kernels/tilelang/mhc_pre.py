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
  _build_gemm_norm (GPU only: wgmma + TMA): grid cdiv(T, 64); a CTA streams its 64 tokens' x
    [64, nC] in 64-column chunks (TMA, 3 stages, warp-specialised), accumulates x @ phi_hi and
    x @ phi_lo in one [64, KP] fp32 fragment and the sum of squares from the same shared tile;
    writes m = (x @ phi) / r [T, K] and r [T] (also what the backward needs).
  _build_coef (per token, one thread each): bias, alpha, sigmoid, 2*sigmoid, the max-shifted exp
    and all Sinkhorn iterations in registers; writes h_pre, h_post, h_res.
  _build_apply (mhc_pre only; one CTA per token): layer_input = sum_i h_pre[i] x[i].
  HBM bytes per token: read 2nC*e (x twice: GEMM, then apply) + small, write C*e + (n*n+3n+1)*4.
  The floor (MATH.md) reads x once: the GEMM kernel would have to finish a token block's Sinkhorn
  and then re-read the block's x, which at 64 tokens x nC is 2 MB per CTA (n=4, C=4096), far past
  what stays in L1 or L2 across CTAs in flight; this version pays the second read (the
  Triton non-split path does too unless the block fits in L2).

Backward:
  _build_dhpre (mhc_pre only; one CTA per token): dh_pre[i] = sum_c g_li[c] x[i, c].
  _build_coef_bwd (per token, one thread each): sigmoid derivatives, the Sinkhorn backward -
    recomputing the iterates on chip from the logits, nothing stored: checkpoints every
    Q = ceil(sqrt(iters)) iterations, each iterate of a segment recomputed from its checkpoint -,
    the max shift (its gradient to the arg-max entries, split on ties as torch.amax), the
    alpha / bias / 1/r chain. Writes dlogit [T, K] (torch sums it into db and dalpha),
    du = alpha * dlogit / r [T, K] and coef = dr / (nC r) [T].
  _build_dx_dphi (GPU only): grid (cdiv(nC, 64) row blocks of the flattened x, token ranges);
    a CTA keeps its phi rows (hi, lo) in shared memory and streams its token range:
      dphi rows += x_tile^T @ du   (two wgmmas: du hi, lo)
      dx tile    = du @ phi_rows^T (three wgmmas) + coef * x + h_pre[t, stream] * g_li
    dphi per range goes to a [ranges, nC, KP] workspace summed by torch. du is scaled by a power
    of two before the split (no fp16 underflow), undone in fp32.
  HBM bytes per token: read 2nC*e (x in dhpre and dx/dphi) + (n+1)C*e (g_li, the n re-reads
  mostly from L2) + small, write nC*e.

CPU ("c" target, tests): _build_coef, _build_coef_bwd, _build_apply and _build_dhpre compile
there (the per-token threads become a serial loop); the two GEMM kernels are GPU only.
"""

import functools
import math

import torch

from kernels.hilo import split_hi_lo
from kernels.tilelang.common import (
    TL_DTYPES,
    block_c,
    check_state,
    check_tensor,
    compile_kernel,
    on_device,
)

EPS_RMS = 1e-6
EPS_SK = 1e-6
TOK_PER_CTA = 128       # per-token kernels: tokens (threads) per CTA
GEMM_BT = 64            # tokens per CTA of the GEMM kernels (wgmma M)
GEMM_BK = 64            # columns of x per chunk


def _kp(n: int, hc: bool = False) -> int:
    return max(16, -(-((n + 2) if hc else (n * n + 2 * n)) // 16) * 16)


def _seg(iters: int) -> int:
    return max(1, math.isqrt(iters - 1) + 1) if iters > 1 else 1


# ====================================================================== per-token kernels
@functools.cache
def _build_coef(n: int, iters: int, cpu: bool):
    """m [T, K] -> h_pre, h_post, h_res; one thread per token."""
    import tilelang.language as T

    K = n * n + 2 * n
    nn = n * n
    nt = TOK_PER_CTA
    Tn = T.dynamic("T")
    f32 = "float32"

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
    def token(t, m, b, alpha, h_pre, h_post, h_res, M, cs):
        if t < Tn:
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
def _build_apply(n: int, C: int, dtype: str, cpu: bool):
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
def _build_dhpre(n: int, C: int, dtype: str, cpu: bool):
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
@functools.cache
def _build_gemm_norm(n: int, C: int, dtype: str, hc: bool = False):
    """hc=False: rows are tokens, x [T, nC], phi [nC, n*n+2n] (mHC).
    hc=True: rows are (token, stream) pairs, x [T*n, C], w [C, n+2] (HC's per-stream norm and
    projections are the same row-norm GEMM: m = (x_row . w) * rsqrt(mean x_row^2 + eps))."""
    import tilelang.language as T

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
def _build_dx_dphi(n: int, C: int, dtype: str, nblk: int, has_li: bool, hc: bool = False):
    """nblk: row blocks (of GEMM_BT) per range; grid (cdiv(D, BR), ranges). Rows and D as in
    _build_gemm_norm; the layer_input term h_pre * g_li: mHC h_pre [T, n] at (row, col // C) and
    g_li [T, C] at (row, col % C); HC h_pre [T*n, 1] at (row, 0) and g_li [T, C] at (row // n, col)."""
    import tilelang.language as T

    KP = _kp(n, hc)
    NC = C if hc else n * C
    HW = 1 if hc else n
    BT = GEMM_BT
    BR = 64
    Tn = T.dynamic("T")
    Tg = T.dynamic("Tg")
    f32 = "float32"

    @T.prim_func
    def mhc_dx_dphi(x: T.Tensor((Tn, NC), dtype), phi_hi: T.Tensor((NC, KP), dtype),
                    phi_lo: T.Tensor((NC, KP), dtype), du_hi: T.Tensor((Tn, KP), dtype),
                    du_lo: T.Tensor((Tn, KP), dtype), inv_scale: T.Tensor((1,), f32),
                    coef: T.Tensor((Tn,), f32), h_pre: T.Tensor((Tn, HW), f32),
                    g_li: T.Tensor((Tg, C), dtype), dx: T.Tensor((Tn, NC), dtype),
                    dphi_ws: T.Tensor((T.ceildiv(Tn, BT * nblk), NC, KP), f32)):
        with T.Kernel(T.ceildiv(NC, BR), T.ceildiv(Tn, BT * nblk), threads=128) as (rb, ts):
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
                        if has_li and hc:
                            dx[t0 + i, rb * BR + j] = (
                                dxs[i, j] * inv_scale[0] + coef[t0 + i] * xs[i, j]
                                + h_pre[t0 + i, 0] * g_li[(t0 + i) // n, rb * BR + j])
                        elif has_li:
                            dx[t0 + i, rb * BR + j] = (
                                dxs[i, j] * inv_scale[0] + coef[t0 + i] * xs[i, j]
                                + h_pre[t0 + i, (rb * BR + j) // C] * g_li[t0 + i, (rb * BR + j) % C])
                        else:
                            dx[t0 + i, rb * BR + j] = dxs[i, j] * inv_scale[0] + coef[t0 + i] * xs[i, j]
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
        kern = _build_apply(n, C, TL_DTYPES[x.dtype], x.device.type == "cpu")
        with on_device(x):
            kern(x, h_pre, out)
    return out


def dh_pre_of(x, g_li):
    T_, n, C = x.shape
    dh = torch.empty(T_, n, device=x.device, dtype=torch.float32)
    if T_:
        kern = _build_dhpre(n, C, TL_DTYPES[x.dtype], x.device.type == "cpu")
        with on_device(x):
            kern(x, g_li, dh)
    return dh


def gemm_norm(x, phi, hc: bool = False):
    """(m [rows, K], r [rows]) on the GPU; rows are tokens (mHC) or (token, stream) pairs (HC)."""
    T_, n, C = x.shape
    rows, D = (T_ * n, C) if hc else (T_, n * C)
    K = phi.shape[1]
    hi, lo = split_hi_lo(phi, x.dtype, _kp(n, hc))
    m = torch.empty(rows, K, device=x.device, dtype=torch.float32)
    r = torch.empty(rows, device=x.device, dtype=torch.float32)
    if T_:
        kern = _build_gemm_norm(n, C, TL_DTYPES[x.dtype], hc)
        with on_device(x):
            kern(x.view(rows, D), hi, lo, m, r)
    return m, r


def _ranges(rows: int, n: int, D: int, device) -> int:
    """Row blocks per range of the dx/dphi kernel: about 4 CTAs per SM in all."""
    nblk = -(-rows // GEMM_BT)
    cb = -(-D // 64)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, -(-4 * sms // cb))
    per = max(1, -(-nblk // want))
    return 1 << (per - 1).bit_length()      # a power of two: few compiled variants


def dx_dphi(x, phi, du, coef, h_pre, g_li, need_phi, hc: bool = False):
    """(dx, dphi): dx = du @ phi^T + coef * x (+ h_pre * g_li), dphi = x^T @ du, over 2-D rows."""
    T_, n, C = x.shape
    rows, D = (T_ * n, C) if hc else (T_, n * C)
    K = phi.shape[1]
    KP = _kp(n, hc)
    dt = x.dtype
    # a power-of-two scale keeps du's lo part out of fp16's subnormals; undone in the kernel
    amax = du.abs().amax().clamp_min(1e-30)
    scale = torch.exp2(-torch.floor(torch.log2(amax)))
    du_hi, du_lo = split_hi_lo(du * scale, dt, KP)
    phi_hi, phi_lo = split_hi_lo(phi, dt, KP)
    per = _ranges(rows, n, D, x.device)
    nr = -(-rows // (GEMM_BT * per))
    dx = torch.empty_like(x)
    ws = torch.empty(nr, D, KP, device=x.device, dtype=torch.float32)
    has_li = g_li is not None
    kern = _build_dx_dphi(n, C, TL_DTYPES[dt], per, has_li, hc)
    hp = h_pre.reshape(rows, 1 if hc else n)
    with on_device(x):
        kern(x.view(rows, D), phi_hi, phi_lo, du_hi, du_lo, (1.0 / scale).reshape(1), coef, hp,
             g_li if has_li else x.new_empty(T_, C), dx.view(rows, D), ws)
    dphi = ws.sum(0)[:, :K] if need_phi else None
    return dx, dphi


def _forward(x, phi, b, alpha, iters, with_li):
    m, r = gemm_norm(x, phi)
    h_pre, h_post, h_res = coeffs_from_m(m, b, alpha, x.shape[1], iters)
    li = apply_pre(x, h_pre) if with_li else None
    return li, h_pre, h_post, h_res, m, r


def _backward(x, phi, b, alpha, m, r, h_pre, iters, g_first, g_post, g_res, with_li, needs):
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
            dx, dphi = dx_dphi(x, phi, du, coef, h_pre, g_li, need_phi)
        else:
            dx, dphi = torch.zeros_like(x), torch.zeros_like(phi)
    if need_b:
        db = dlogit.sum(0)
    if need_alpha:
        prod = dlogit * m
        dalpha = torch.stack([prod[:, :n].sum(), prod[:, n:2 * n].sum(), prod[:, 2 * n:].sum()])
    return (dx if need_x else None), (dphi if need_phi else None), db, dalpha


class _MhcFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, b, alpha, iters, with_li):
        li, h_pre, h_post, h_res, m, r = _forward(x, phi, b, alpha, iters, with_li)
        ctx.set_materialize_grads(False)
        ctx.iters, ctx.with_li = iters, with_li
        ctx.save_for_backward(x, phi, b, alpha, m, r, h_pre)
        return (li if with_li else h_pre), h_post, h_res

    @staticmethod
    def backward(ctx, g_first, g_post, g_res):
        needs = tuple(ctx.needs_input_grad[:4])
        if (g_first is None and g_post is None and g_res is None) or not any(needs):
            return None, None, None, None, None, None
        x, phi, b, alpha, m, r, h_pre = ctx.saved_tensors
        grads = _backward(x, phi, b, alpha, m, r, h_pre, ctx.iters, g_first, g_post, g_res,
                          ctx.with_li, needs)
        return (*grads, None, None)


def mhc_coeffs(x, phi, b, alpha, sinkhorn_iters: int = 20):
    """(h_pre [T,n], h_post [T,n], h_res [T,n,n]) in fp32, h_res indexed [token, dst, src]."""
    x, phi, b, alpha = _check("mhc_coeffs", x, phi, b, alpha, sinkhorn_iters)
    return _MhcFn.apply(x, phi, b, alpha, sinkhorn_iters, False)


def mhc_pre(x, phi, b, alpha, sinkhorn_iters: int = 20):
    """(layer_input [T,C] in x.dtype, h_post [T,n] fp32, h_res [T,n,n] fp32)."""
    x, phi, b, alpha = _check("mhc_pre", x, phi, b, alpha, sinkhorn_iters)
    return _MhcFn.apply(x, phi, b, alpha, sinkhorn_iters, True)
