"""The fused boundary's forward kernels (kernels/triton/post_coeffs.py's docstring says how they
work): F_post,res with the next site's partial GEMM and sum of squares on the tile it just wrote,
and the per-token finish (partials summed in a fixed order, norm, gates, Sinkhorn)."""
import triton
import triton.language as tl

from kernels.triton.mhc_pre_fwd import dot_hilo
from kernels.triton.sinkhorn import sk_init, sk_step


@triton.jit
def _destination(i, xs, f, hqb, hrb, ob, phi_ptr, plo_ptr, rows, tmask, c, cmask, lm, kk, acc, ss, nC, C,
                 N: tl.constexpr, KP: tl.constexpr, DOT_F32: tl.constexpr):
    """Row i of x_next on one chunk: mixed, stored, and added into the next site's partial
    products (acc) and sum of squares (ss)."""
    y = tl.load(hqb + rows * N + i, mask=tmask, other=0.0)[:, None] * f
    for j in tl.static_range(N):
        hr = tl.load(hrb + rows * (N * N) + i * N + j, mask=tmask, other=0.0)
        y += hr[:, None] * xs[j].to(tl.float32)
    # the next site's coefficients are those of x_next as stored (rounded), as in the unfused
    # post then pre
    yq = y.to(ob.dtype.element_ty)
    tl.store(ob + rows[:, None] * nC + i * C + c[None, :], yq, mask=lm)
    acc = dot_hilo(yq, phi_ptr, plo_ptr, ((i * C + c) * KP)[:, None] + kk[None, :], cmask[:, None], acc,
                   DOT_F32)
    yf = yq.to(tl.float32)
    return acc, ss + tl.sum(yf * yf, axis=1)


@triton.jit
def post_coeffs_fwd_kernel(x_ptr, f_ptr, hpost_ptr, hres_ptr, phi_ptr, plo_ptr, out_ptr,
                           ws_ptr, wss_ptr, T, C, S, CHUNKS,
                           N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                           BT: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr,
                           ATOMIC: tl.constexpr, UNROLL: tl.constexpr, DOT_F32: tl.constexpr):
    # Program (token block g, column slice s), s fastest: neighbouring programs share tokens.
    # Addresses: one 64-bit base per token block, 32-bit offsets inside it (a 64-bit address per
    # element costs two registers per element of every tile).
    pid = tl.program_id(0)
    g = pid // S
    s = pid - g * S
    nC = N * C
    rows = tl.arange(0, BT)
    tmask = g * BT + rows < T
    t0 = (g * BT).to(tl.int64)
    xb = x_ptr + t0 * nC
    ob = out_ptr + t0 * nC
    fb = f_ptr + t0 * C
    hqb = hpost_ptr + t0 * N
    hrb = hres_ptr + t0 * (N * N)
    cols = tl.arange(0, BC)
    kk = tl.arange(0, KP)
    acc = tl.zeros([BT, KP], dtype=tl.float32)
    ss = tl.zeros([BT], dtype=tl.float32)
    for ch in tl.range(0, CHUNKS, num_stages=STAGES):
        c = (s * CHUNKS + ch) * BC + cols
        cmask = c < C
        lm = tmask[:, None] & cmask[None, :]
        # the n source rows of the chunk, loaded once: every destination row mixes all of them
        xs = ()
        for j in tl.static_range(N):
            xs = xs + (tl.load(xb + rows[:, None] * nC + j * C + c[None, :], mask=lm, other=0.0),)
        f = tl.load(fb + rows[:, None] * C + c[None, :], mask=lm, other=0.0).to(tl.float32)
        # destinations in a loop, not unrolled: unrolled, the compiler issues every destination's
        # loads and products at once (255 registers and spills at n = 4, sm_90, 32 x 64 tiles);
        # UNROLL (small tiles) lets it issue the n destinations' phi loads together instead of
        # one L2 round trip after another
        if UNROLL:
            for i in tl.static_range(N):
                acc, ss = _destination(i, xs, f, hqb, hrb, ob, phi_ptr, plo_ptr, rows, tmask, c, cmask, lm,
                                       kk, acc, ss, nC, C, N, KP, DOT_F32)
        else:
            for i in range(N):
                acc, ss = _destination(i, xs, f, hqb, hrb, ob, phi_ptr, plo_ptr, rows, tmask, c, cmask, lm,
                                       kk, acc, ss, nC, C, N, KP, DOT_F32)
    if ATOMIC:      # every slice adds into row t of one zeroed [T, K] and [T]
        w = t0 + rows
        tl.atomic_add(ws_ptr + w[:, None] * K + kk[None, :], acc, mask=tmask[:, None] & (kk < K)[None, :],
                      sem="relaxed")
        tl.atomic_add(wss_ptr + w, ss, mask=tmask, sem="relaxed")
    else:           # this slice's partials: row (s, token) of [S, T, K] and [S, T], one writer each
        w = s.to(tl.int64) * T + t0 + rows
        tl.store(ws_ptr + w[:, None] * K + kk[None, :], acc, mask=tmask[:, None] & (kk < K)[None, :])
        tl.store(wss_ptr + w, ss, mask=tmask)


@triton.jit
def coeffs_finish_kernel(ws_ptr, wss_ptr, b_ptr, alpha_ptr, hpre_ptr, hpost_ptr, hres_ptr,
                         m_ptr, r_ptr, T, nC, S, iters,
                         N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                         SAVE: tl.constexpr, EPS_RMS: tl.constexpr, EPS_SK: tl.constexpr):
    pid = tl.program_id(0)
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
    pre = tl.zeros([BT, NP], dtype=tl.float32)
    post = tl.zeros([BT, NP], dtype=tl.float32)
    res = tl.zeros([BT, NP, NP], dtype=tl.float32)
    sq = tl.zeros([BT], dtype=tl.float32)
    # slices in increasing order, whatever order their programs ran in: deterministic
    w = t64
    for _s in range(S):
        pre += tl.load(ws_ptr + w[:, None] * K + jn[None, :], mask=m2, other=0.0)
        post += tl.load(ws_ptr + w[:, None] * K + N + jn[None, :], mask=m2, other=0.0)
        res += tl.load(ws_ptr + w[:, None, None] * K + 2 * N + i3 * N + j3, mask=m3, other=0.0)
        sq += tl.load(wss_ptr + w, mask=tmask, other=0.0)
        w += T
    r = tl.sqrt(sq / nC + EPS_RMS)
    pre = pre / r[:, None]
    post = post / r[:, None]
    res = res / r[:, None, None]
    hp = tl.sigmoid(tl.load(alpha_ptr) * pre + tl.load(b_ptr + jn, mask=jv, other=0.0)[None, :])
    hq = 2.0 * tl.sigmoid(tl.load(alpha_ptr + 1) * post
                          + tl.load(b_ptr + N + jn, mask=jv, other=0.0)[None, :])
    L = tl.load(alpha_ptr + 2) * res + tl.load(b_ptr + 2 * N + i3 * N + j3, mask=valid, other=0.0)
    M, _mx = sk_init(L, valid)
    for _it in range(iters):
        M = sk_step(M, EPS_SK)
    tl.store(hpre_ptr + t64[:, None] * N + jn[None, :], hp, mask=m2)
    tl.store(hpost_ptr + t64[:, None] * N + jn[None, :], hq, mask=m2)
    tl.store(hres_ptr + t64[:, None, None] * (N * N) + i3 * N + j3, M, mask=m3)
    if SAVE:
        tl.store(m_ptr + t64[:, None] * K + jn[None, :], pre, mask=m2)
        tl.store(m_ptr + t64[:, None] * K + N + jn[None, :], post, mask=m2)
        tl.store(m_ptr + t64[:, None, None] * K + 2 * N + i3 * N + j3, res, mask=m3)
        tl.store(r_ptr + t64, r, mask=tmask)
