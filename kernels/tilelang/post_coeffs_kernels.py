"""The TileLang fused boundary's kernels (kernels/tilelang/post_coeffs.py's docstring says how they
work): F_post,res with the next site's partial products and sum of squares on the values it just
wrote, the per-token finish (partials summed in a fixed order, norm, gates, Sinkhorn), and the
backward's state-gradient kernel. All three compile for the CPU "c" target too."""
import functools

from kernels.reference import EPS_RMS
from kernels.tilelang.coef_kernels import sinkhorn_macros
from kernels.tilelang.common import TOK_PER_CTA, compile_kernel


@functools.cache
def build_fwd(n: int, C: int, dtype: str, bt: int, cw: int, cpu: bool):
    """x [T,n,C], f [T,C], h_post [T,n], h_res [T,n,n], phi [nC,K] -> x_next [T,n,C] and the
    partials ws [S,T,K+1] (column K: the sum of squares) of column slice s = cw columns of every
    stream (cw a multiple of 8). Grid (S, token blocks of bt), one thread per token, 8 columns
    (one 16-byte vector of every row: C is a multiple of 8) at a time."""
    import tilelang.language as T

    K = n * n + 2 * n
    V = 8
    S = -(-C // cw)
    Tn = T.dynamic("T")
    f32 = "float32"

    @T.macro
    def token(t, s, x, f, h_post, h_res, phi, out, ws, hr, hp, xr, fr, xf, orow, acc, v):
        if t < Tn:
            # the token's mixing stays in registers for the whole slice
            for k in T.unroll(n * n):
                hr[k] = h_res[t, k // n, k % n]
            for i in T.unroll(n):
                hp[i] = h_post[t, i]
            for k in T.unroll(K + 1):
                acc[k] = 0.0
            for c8 in T.serial(cw // V):
                if s * cw + c8 * V < C:
                    for j in T.unroll(n):
                        for e in T.vectorized(V):
                            xr[j * V + e] = x[t, j, s * cw + c8 * V + e]
                    for e in T.vectorized(V):
                        fr[e] = f[t, s * cw + c8 * V + e]
                    for k in T.unroll(n * V):
                        xf[k] = T.Cast(f32, xr[k])
                    for i in T.unroll(n):
                        for e in T.unroll(V):
                            v[0] = hp[i] * T.Cast(f32, fr[e])
                            for j in T.unroll(n):
                                v[0] += hr[i * n + j] * xf[j * V + e]
                            orow[e] = T.Cast(dtype, v[0])
                            # the next site's coefficients are those of x_next as stored
                            # (rounded), as in the unfused post then pre
                            v[0] = T.Cast(f32, orow[e])
                            acc[K] += v[0] * v[0]
                            # every thread reads the same phi row: one broadcast load per warp
                            for k in T.unroll(K):
                                acc[k] += v[0] * phi[i * C + s * cw + c8 * V + e, k]
                        for e in T.vectorized(V):
                            out[t, i, s * cw + c8 * V + e] = orow[e]
            for k in T.unroll(K + 1):
                ws[s, t, k] = acc[k]

    @T.prim_func
    def post_coeffs_fwd(x: T.Tensor((Tn, n, C), dtype), f: T.Tensor((Tn, C), dtype),
                        h_post: T.Tensor((Tn, n), f32), h_res: T.Tensor((Tn, n, n), f32),
                        phi: T.Tensor((n * C, K), f32), out: T.Tensor((Tn, n, C), dtype),
                        ws: T.Tensor((S, Tn, K + 1), f32)):
        with T.Kernel(S, T.ceildiv(Tn, bt), threads=1 if cpu else bt) as (s, g):
            hr = T.alloc_local((n * n,), f32)
            hp = T.alloc_local((n,), f32)
            xr = T.alloc_local((n * V,), dtype)
            fr = T.alloc_local((V,), dtype)
            xf = T.alloc_local((n * V,), f32)
            orow = T.alloc_local((V,), dtype)
            acc = T.alloc_local((K + 1,), f32)
            v = T.alloc_local((1,), f32)
            if cpu:
                for tx in T.serial(bt):
                    token(g * bt + tx, s, x, f, h_post, h_res, phi, out, ws, hr, hp, xr, fr, xf,
                          orow, acc, v)
            else:
                token(g * bt + T.get_thread_binding(0), s, x, f, h_post, h_res, phi, out, ws,
                      hr, hp, xr, fr, xf, orow, acc, v)

    return compile_kernel(post_coeffs_fwd, cpu)


@functools.cache
def build_finish(n: int, C: int, S: int, iters: int, cpu: bool):
    """ws [S,T,K+1] -> m [T,K] (the normalised products, kept for the backward), r [T], h_pre,
    h_post, h_res; one thread per token, the S partials summed in slice order."""
    import tilelang.language as T

    K = n * n + 2 * n
    nC = n * C
    nt = TOK_PER_CTA
    Tn = T.dynamic("T")
    f32 = "float32"

    _, coefficients = sinkhorn_macros(n, iters)

    @T.macro
    def token(t, ws, b, alpha, m, r, h_pre, h_post, h_res, acc, M, cs):
        if t < Tn:
            for k in T.unroll(K + 1):
                acc[k] = 0.0
            # slices in increasing order, whatever order their CTAs ran in: deterministic
            for s in T.serial(S):
                for k in T.unroll(K + 1):
                    acc[k] += ws[s, t, k]
            r[t] = T.sqrt(acc[K] / nC + EPS_RMS)
            for k in T.unroll(K):
                m[t, k] = acc[k] / r[t]
            coefficients(t, m, b, alpha, h_pre, h_post, h_res, M, cs)

    @T.prim_func
    def post_coeffs_finish(ws: T.Tensor((S, Tn, K + 1), f32), b: T.Tensor((K,), f32),
                           alpha: T.Tensor((3,), f32), m: T.Tensor((Tn, K), f32),
                           r: T.Tensor((Tn,), f32), h_pre: T.Tensor((Tn, n), f32),
                           h_post: T.Tensor((Tn, n), f32), h_res: T.Tensor((Tn, n, n), f32)):
        with T.Kernel(T.ceildiv(Tn, nt), threads=1 if cpu else nt) as bx:
            acc = T.alloc_local((K + 1,), f32)
            M = T.alloc_local((n * n,), f32)
            cs = T.alloc_local((2,), f32)
            if cpu:
                for tx in T.serial(nt):
                    token(bx * nt + tx, ws, b, alpha, m, r, h_pre, h_post, h_res, acc, M, cs)
            else:
                token(bx * nt + T.get_thread_binding(0), ws, b, alpha, m, r, h_pre, h_post,
                      h_res, acc, M, cs)

    return compile_kernel(post_coeffs_finish, cpu)


@functools.cache
def build_grad_state(n: int, C: int, dtype: str, nt: int, tps: int, has_gx: bool, has_li: bool,
                     state: bool, dphi: bool, cpu: bool):
    """The whole gradient of x_next,
        G[t, w] = g_x[t, w] + du[t] . phi[w] + coef[t] x_next[t, w] + h_pre[t, w // C] g_li[t, w % C]
    over the flattened columns w of [n, C], written in x's dtype (state), and the next site's dphi
    partials ws[R, nC, K] += x_next[t, w] du[t] over token range R of tps tokens. Grid (column
    blocks of nt, R), one thread per column: its phi row and its dphi row stay in registers while
    it walks the tokens (adjacent threads, adjacent columns: coalesced)."""
    import tilelang.language as T

    K = n * n + 2 * n
    nC = n * C
    Tn = T.dynamic("T")
    # the workspace's own token ranges: cdiv(T, tps), or 1 for the unused dummy (dphi False)
    Rw = T.dynamic("R")
    f32 = "float32"

    @T.macro
    def column(w, ts, gx, x1, phi, du, coef, h_pre, gli, G, ws, ph, acc, v):
        if w < nC:
            for k in T.unroll(K):
                ph[k] = phi[w, k]
                acc[k] = 0.0
            for tt in T.serial(tps):
                if ts * tps + tt < Tn:
                    v[1] = T.Cast(f32, x1[ts * tps + tt, w // C, w % C])
                    if state:
                        v[0] = coef[ts * tps + tt] * v[1]
                        if has_gx:
                            v[0] += T.Cast(f32, gx[ts * tps + tt, w // C, w % C])
                        if has_li:
                            v[0] += h_pre[ts * tps + tt, w // C] * T.Cast(f32, gli[ts * tps + tt, w % C])
                        for k in T.unroll(K):
                            v[0] += du[ts * tps + tt, k] * ph[k]
                        G[ts * tps + tt, w // C, w % C] = T.Cast(dtype, v[0])
                    if dphi:
                        for k in T.unroll(K):
                            acc[k] += v[1] * du[ts * tps + tt, k]
            if dphi:
                for k in T.unroll(K):
                    ws[ts, w, k] = acc[k]

    @T.prim_func
    def post_coeffs_grad_state(gx: T.Tensor((Tn, n, C), dtype), x1: T.Tensor((Tn, n, C), dtype),
                               phi: T.Tensor((nC, K), f32), du: T.Tensor((Tn, K), f32),
                               coef: T.Tensor((Tn,), f32), h_pre: T.Tensor((Tn, n), f32),
                               gli: T.Tensor((Tn, C), dtype), G: T.Tensor((Tn, n, C), dtype),
                               ws: T.Tensor((Rw, nC, K), f32)):
        with T.Kernel(T.ceildiv(nC, nt), T.ceildiv(Tn, tps), threads=1 if cpu else nt) as (cb, ts):
            ph = T.alloc_local((K,), f32)
            acc = T.alloc_local((K,), f32)
            v = T.alloc_local((2,), f32)
            if cpu:
                for tx in T.serial(nt):
                    column(cb * nt + tx, ts, gx, x1, phi, du, coef, h_pre, gli, G, ws, ph, acc, v)
            else:
                column(cb * nt + T.get_thread_binding(0), ts, gx, x1, phi, du, coef, h_pre, gli,
                       G, ws, ph, acc, v)

    return compile_kernel(post_coeffs_grad_state, cpu)
