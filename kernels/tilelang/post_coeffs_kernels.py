"""The TileLang fused boundary's kernels (kernels/tilelang/post_coeffs.py's docstring says how they
work): F_post,res with the next site's partial products and sum of squares on the values it just
wrote, the per-token finish (partials summed in a fixed order, norm, gates, Sinkhorn), and the
backward's two kernels: F_post,res's backward on x_next's whole gradient formed in registers,
and the next site's dphi. All four compile for the CPU "c" target too."""
import functools

from kernels.reference import EPS_RMS
from kernels.tilelang.coef_kernels import sinkhorn_macros
from kernels.tilelang.common import TOK_PER_CTA, compile_kernel


def vector_width(n: int) -> int:
    """Columns a thread of the per-token kernels moves at a time: one 16-byte vector of each row,
    or 8 bytes at n > 4 (registers: the backward holds three [n, V] tiles of a token, the
    forward two, besides its n*n mixing and K or more accumulators)."""
    return 8 if n <= 4 else 4


@functools.cache
def build_fwd(n: int, C: int, dtype: str, bt: int, cw: int, cpu: bool, minb: int = 1):
    """x [T,n,C], f [T,C], h_post [T,n], h_res [T,n,n], phi [nC,K] -> x_next [T,n,C] and the
    partials ws [S,T,K+1] (column K: the sum of squares) of column slice s = cw columns of every
    stream (cw a multiple of 8). Grid (S, token blocks of bt), one thread per token, V columns
    of every row at a time (vector_width; C is a multiple of 8)."""
    import tilelang.language as T

    K = n * n + 2 * n
    V = vector_width(n)
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
            if not cpu and minb > 1:
                T.annotate_min_blocks_per_sm(minb)
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
def build_bwd(n: int, C: int, dtype: str, bt: int, cw: int, has_gx: bool, has_li: bool,
              need_dx: bool, need_df: bool, need_dh: bool, cpu: bool, minb: int = 1):
    """The boundary's backward on x_next's whole gradient, formed in registers and never written,
        G[i] = g_x[i] + du . phi[i*C + c] + coef x_next[i] + h_pre[i] g_li          (per column c)
    and F_post,res's backward on it: dx[j] = sum_i h_res[i, j] G[i], df = sum_i h_post[i] G[i],
    and the slice's partial C-sums dh[s, t] = (G[i] . f, G[i] . x[j]) [S, T, n + n*n]. Grid
    (S slices of cw columns, token blocks of bt), one thread per token, V columns at a time."""
    import tilelang.language as T

    K = n * n + 2 * n
    V = vector_width(n)
    S = -(-C // cw)
    Tn = T.dynamic("T")
    # dh's own first dimension: S, or 1 for the unused dummy (need_dh False)
    Sd = T.dynamic("S")
    f32 = "float32"

    @T.macro
    def token(t, s, gx, x1, x0, f, h_post, h_res, phi, du, coef, h_pre, gli, dx, df, dh,
              dl, hr, hq, hp, acc, a, b, cv, G, ov, v):
        if t < Tn:
            for k in T.unroll(K):
                dl[k] = du[t, k]
            for k in T.unroll(n * n):
                hr[k] = h_res[t, k // n, k % n]
                acc[n + k] = 0.0
            for i in T.unroll(n):
                hq[i] = h_post[t, i]
                hp[i] = h_pre[t, i]
                acc[i] = 0.0
            v[1] = coef[t]
            for c8 in T.serial(cw // V):
                if s * cw + c8 * V < C:
                    # the gradient of x_next, V columns of every stream
                    for i in T.unroll(n):
                        for e in T.vectorized(V):
                            a[i * V + e] = x1[t, i, s * cw + c8 * V + e]
                        if has_gx:
                            for e in T.vectorized(V):
                                b[i * V + e] = gx[t, i, s * cw + c8 * V + e]
                        for e in T.unroll(V):
                            G[i * V + e] = v[1] * T.Cast(f32, a[i * V + e])
                            if has_gx:
                                G[i * V + e] += T.Cast(f32, b[i * V + e])
                    if has_li:
                        for e in T.vectorized(V):
                            cv[e] = gli[t, s * cw + c8 * V + e]
                        for i in T.unroll(n):
                            for e in T.unroll(V):
                                G[i * V + e] += hp[i] * T.Cast(f32, cv[e])
                    # through the next site's coefficients: every thread reads the same phi row
                    for i in T.unroll(n):
                        for e in T.unroll(V):
                            for k in T.unroll(K):
                                G[i * V + e] += dl[k] * phi[i * C + s * cw + c8 * V + e, k]
                    # F_post,res backward
                    if need_dx:
                        for j in T.unroll(n):
                            for e in T.unroll(V):
                                v[0] = 0.0
                                for i in T.unroll(n):
                                    v[0] += hr[i * n + j] * G[i * V + e]
                                ov[e] = T.Cast(dtype, v[0])
                            for e in T.vectorized(V):
                                dx[t, j, s * cw + c8 * V + e] = ov[e]
                    if need_df:
                        for e in T.unroll(V):
                            v[0] = 0.0
                            for i in T.unroll(n):
                                v[0] += hq[i] * G[i * V + e]
                            ov[e] = T.Cast(dtype, v[0])
                        for e in T.vectorized(V):
                            df[t, s * cw + c8 * V + e] = ov[e]
                    if need_dh:
                        for e in T.vectorized(V):
                            cv[e] = f[t, s * cw + c8 * V + e]
                        for i in T.unroll(n):
                            for e in T.unroll(V):
                                acc[i] += G[i * V + e] * T.Cast(f32, cv[e])
                        for j in T.unroll(n):
                            for e in T.vectorized(V):
                                a[j * V + e] = x0[t, j, s * cw + c8 * V + e]
                        for i in T.unroll(n):
                            for j in T.unroll(n):
                                for e in T.unroll(V):
                                    acc[n + i * n + j] += G[i * V + e] * T.Cast(f32, a[j * V + e])
            if need_dh:
                for k in T.unroll(n + n * n):
                    dh[s, t, k] = acc[k]

    @T.prim_func
    def post_coeffs_bwd(gx: T.Tensor((Tn, n, C), dtype), x1: T.Tensor((Tn, n, C), dtype),
                        x0: T.Tensor((Tn, n, C), dtype), f: T.Tensor((Tn, C), dtype),
                        h_post: T.Tensor((Tn, n), f32), h_res: T.Tensor((Tn, n, n), f32),
                        phi: T.Tensor((n * C, K), f32), du: T.Tensor((Tn, K), f32),
                        coef: T.Tensor((Tn,), f32), h_pre: T.Tensor((Tn, n), f32),
                        gli: T.Tensor((Tn, C), dtype), dx: T.Tensor((Tn, n, C), dtype),
                        df: T.Tensor((Tn, C), dtype), dh: T.Tensor((Sd, Tn, n + n * n), f32)):
        with T.Kernel(S, T.ceildiv(Tn, bt), threads=1 if cpu else bt) as (s, g):
            if not cpu and minb > 1:
                T.annotate_min_blocks_per_sm(minb)
            dl = T.alloc_local((K,), f32)
            hr = T.alloc_local((n * n,), f32)
            hq = T.alloc_local((n,), f32)
            hp = T.alloc_local((n,), f32)
            acc = T.alloc_local((n + n * n,), f32)
            a = T.alloc_local((n * V,), dtype)
            b = T.alloc_local((n * V,), dtype)
            cv = T.alloc_local((V,), dtype)
            G = T.alloc_local((n * V,), f32)
            ov = T.alloc_local((V,), dtype)
            v = T.alloc_local((2,), f32)
            if cpu:
                for tx in T.serial(bt):
                    token(g * bt + tx, s, gx, x1, x0, f, h_post, h_res, phi, du, coef, h_pre, gli,
                          dx, df, dh, dl, hr, hq, hp, acc, a, b, cv, G, ov, v)
            else:
                token(g * bt + T.get_thread_binding(0), s, gx, x1, x0, f, h_post, h_res, phi, du,
                      coef, h_pre, gli, dx, df, dh, dl, hr, hq, hp, acc, a, b, cv, G, ov, v)

    return compile_kernel(post_coeffs_bwd, cpu)


@functools.cache
def build_dphi(n: int, C: int, dtype: str, nt: int, tps: int, cpu: bool):
    """The next site's dphi partials ws[R, nC, K] = sum over token range R (tps tokens) of
    x_next[t, w] du[t]. Grid (column blocks of nt, R), one thread per flattened column w of
    [n, C]: its dphi row stays in registers while it walks the tokens (adjacent threads,
    adjacent columns: coalesced; du[t] is the same for all, a broadcast)."""
    import tilelang.language as T

    K = n * n + 2 * n
    nC = n * C
    Tn = T.dynamic("T")
    f32 = "float32"

    @T.macro
    def column(w, ts, x1, du, ws, acc, v):
        if w < nC:
            for k in T.unroll(K):
                acc[k] = 0.0
            for tt in T.serial(tps):
                if ts * tps + tt < Tn:
                    v[0] = T.Cast(f32, x1[ts * tps + tt, w // C, w % C])
                    for k in T.unroll(K):
                        acc[k] += v[0] * du[ts * tps + tt, k]
            for k in T.unroll(K):
                ws[ts, w, k] = acc[k]

    @T.prim_func
    def post_coeffs_dphi(x1: T.Tensor((Tn, n, C), dtype), du: T.Tensor((Tn, K), f32),
                         ws: T.Tensor((T.ceildiv(Tn, tps), nC, K), f32)):
        with T.Kernel(T.ceildiv(nC, nt), T.ceildiv(Tn, tps), threads=1 if cpu else nt) as (cb, ts):
            acc = T.alloc_local((K,), f32)
            v = T.alloc_local((1,), f32)
            if cpu:
                for tx in T.serial(nt):
                    column(cb * nt + tx, ts, x1, du, ws, acc, v)
            else:
                column(cb * nt + T.get_thread_binding(0), ts, x1, du, ws, acc, v)

    return compile_kernel(post_coeffs_dphi, cpu)
