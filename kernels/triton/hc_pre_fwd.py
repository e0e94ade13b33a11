"""The HC pre forward kernel (kernels/triton/hc_pre.py's docstring says how it works): rows
(token, stream) of x on tensor cores against w as hi + lo, sums of squares, and per row r, z,
tanh, h_pre, h_post and a column of h_res."""
import triton
import triton.language as tl


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def tanh(z):
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def fwd_gemm_kernel(x_ptr, whi_ptr, wlo_ptr, b_ptr, s_ptr, hpre_ptr, hpost_ptr, hres_ptr, z_ptr, r_ptr,
                     R, C, EPS,
                     N: tl.constexpr, NK: tl.constexpr, NKP: tl.constexpr,
                     BM: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, SAVE: tl.constexpr,
                     DOT_F32: tl.constexpr):
    # Rows are (token, stream) pairs of x viewed as [T*n, C], so every row's epilogue is its own:
    # r, z = r * (x_row . w), tanh, then h_pre[t, i], h_post[t, i] and column i of h_res[t].
    # w is [C, NKP] in x's dtype twice (hi + lo): two tensor-core products with fp32 accumulation
    # give the projections to ~16 bits of w, and x goes to the tensor cores as loaded.
    row = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = row < R
    r64 = row.to(tl.int64)
    kk = tl.arange(0, BK)
    kcol = tl.arange(0, NKP)
    acc = tl.zeros([BM, NKP], dtype=tl.float32)
    ss = tl.zeros([BM], dtype=tl.float32)
    for k0 in tl.range(0, C, BK, num_stages=STAGES):
        c = k0 + kk
        cm = c < C
        xt = tl.load(x_ptr + r64[:, None] * C + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        xf = xt.to(tl.float32)
        ss += tl.sum(xf * xf, axis=1)
        woff = c[:, None] * NKP + kcol[None, :]
        whi = tl.load(whi_ptr + woff, mask=cm[:, None], other=0.0)
        wlo = tl.load(wlo_ptr + woff, mask=cm[:, None], other=0.0)
        if DOT_F32:
            # the interpreter multiplies 16-bit float tiles as their bit patterns: same values in fp32
            acc = tl.dot(xf, whi.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(xf, wlo.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, whi, acc)
            acc = tl.dot(xt, wlo, acc)
    r = 1.0 / tl.sqrt(ss / C + EPS)
    z = acc * r[:, None]
    t = r64 // N
    i = r64 % N
    kc = kcol[None, :]
    zm = rmask[:, None] & (kc < NK)
    if SAVE:
        tl.store(z_ptr + r64[:, None] * NK + kc, z, mask=zm)
        tl.store(r_ptr + r64, r, mask=rmask)
    p = tanh(z)
    sa = tl.load(s_ptr)
    sb = tl.load(s_ptr + 1)
    p0 = tl.sum(tl.where(kc == 0, p, 0.0), axis=1)
    p1 = tl.sum(tl.where(kc == 1, p, 0.0), axis=1)
    tl.store(hpre_ptr + r64, sa * p0 + tl.load(b_ptr + i, mask=rmask, other=0.0), mask=rmask)
    tl.store(hpost_ptr + r64, sb * p1 + tl.load(b_ptr + N + i, mask=rmask, other=0.0), mask=rmask)
    # column k = 2 + j of this row is h_res[t, j, i] (destination j, source i)
    j = kc - 2
    hm = rmask[:, None] & (kc >= 2) & (kc < NK)
    bres = tl.load(b_ptr + 2 * N + j * N + i[:, None], mask=hm, other=0.0)
    tl.store(hres_ptr + t[:, None] * (N * N) + j * N + i[:, None], sa * p + bres, mask=hm)
