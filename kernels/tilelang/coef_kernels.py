"""The per-token mHC kernels in TileLang (kernels/tilelang/mhc_pre.py's docstring says how they
work): the Sinkhorn macros, written once, the coefficient epilogue and its backward. Both compile
for the CPU "c" target too."""
import functools

from kernels.reference import EPS_SK
from kernels.tilelang.common import TOK_PER_CTA, compile_kernel, seg


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
def build_coef(n: int, iters: int, cpu: bool):
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
def build_coef_bwd(n: int, C: int, iters: int, cpu: bool):
    """(m, r, dh_pre, g_post, g_res) -> dlogit [T, K], du [T, K], coef [T]; one thread per token."""
    import tilelang.language as T

    K = n * n + 2 * n
    nn = n * n
    nC = n * C
    nt = TOK_PER_CTA
    Q = seg(iters)
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
