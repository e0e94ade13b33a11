"""The HC pre backward kernels (kernels/triton/hc_pre.py's docstring says how they work): the
per-token coefficient backward over int32 pairs of x, then dx and dw on tensor cores per column
block, streamed through a software pipeline."""
import triton
import triton.language as tl

from kernels.triton.common import dot_xT_hilo, store_grad
from kernels.triton.hc_pre_fwd import tanh


@triton.jit
def unpack(v, IS_BF16: tl.constexpr):
    """int32 holding two 16-bit floats (little endian) -> (even column, odd column) in fp32."""
    if IS_BF16:
        lo = (v << 16).to(tl.float32, bitcast=True)
        hi = (v & -65536).to(tl.float32, bitcast=True)
    else:
        lo = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def red23(a):
    return tl.sum(tl.sum(a, axis=3), axis=2)


@triton.jit
def bwd_res(zrow, crow, gres_ptr, t2, i2, m2, r, sa, J: tl.constexpr, N: tl.constexpr):
    z = tl.load(zrow + 2 + J, mask=m2, other=0.0)
    p = tanh(z)
    gr = tl.load(gres_ptr + t2 * (N * N) + J * N + i2, mask=m2, other=0.0)
    dz = sa * gr * (1.0 - p * p)
    tl.store(crow + 2 + J, r * dz, mask=m2)
    return dz * z, p * gr


@triton.jit
def bwd_coef_kernel(x_ptr, g_ptr, gpre_ptr, gpost_ptr, gres_ptr, z_ptr, r_ptr, b_ptr, s_ptr,
                     coef_ptr, part_ptr,
                     T, C8, GT,
                     N: tl.constexpr, NP: tl.constexpr, NK: tl.constexpr, NKC: tl.constexpr,
                     PW: tl.constexpr, BT: tl.constexpr, NTH: tl.constexpr, CP: tl.constexpr,
                     IS_BF16: tl.constexpr, HAS_G: tl.constexpr, HAS_GPRE: tl.constexpr,
                     PREFETCH: tl.constexpr):
    # x_ptr: int32 [T, N, C/2]; g_ptr: int32 [T, C/2] (pairs)
    C = C8 * 8
    C2 = C8 * 4
    BP: tl.constexpr = NTH * CP
    pid = tl.program_id(0)
    sa = tl.load(s_ptr)
    sb = tl.load(s_ptr + 1)
    bt = tl.arange(0, BT)[:, None, None, None]
    ii = tl.arange(0, NP)[None, :, None, None]
    pcol = tl.arange(0, NTH)[None, None, :, None] * CP + tl.arange(0, CP)[None, None, None, :]
    i2 = tl.arange(0, NP)[None, :]
    bpre = tl.load(b_ptr + i2, mask=i2 < N, other=0.0)
    acc_sa = tl.zeros([BT, NP], dtype=tl.float32)
    acc_sb = tl.zeros([BT, NP], dtype=tl.float32)
    acc_db = tl.zeros([BT, NP], dtype=tl.float32)
    for tb in range(0, GT, BT):
        t0 = pid * GT + tb
        t2 = t0 + tl.arange(0, BT)[:, None]
        m2 = (t2 < T) & (i2 < N)
        if HAS_G:
            tok = t0 + bt
            tmask = tok < T
            rmask = tmask & (ii < N)
            xrow = x_ptr + tok.to(tl.int64) * (N * C2) + ii * C2
            grow = g_ptr + tok.to(tl.int64) * C2
            acc = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
            if PREFETCH:
                vnext = tl.load(xrow + pcol, mask=rmask & (pcol < C2), other=0)
                gnext = tl.load(grow + pcol, mask=tmask & (pcol < C2), other=0)
            for p0 in range(0, C2, BP):
                pc = p0 + pcol
                if PREFETCH:
                    v = vnext
                    gv = gnext
                    nm = pc + BP < C2
                    vnext = tl.load(xrow + pc + BP, mask=rmask & nm, other=0)
                    gnext = tl.load(grow + pc + BP, mask=tmask & nm, other=0)
                else:
                    v = tl.load(xrow + pc, mask=rmask & (pc < C2), other=0)
                    gv = tl.load(grow + pc, mask=tmask & (pc < C2), other=0)
                lo, hi = unpack(v, IS_BF16)
                glo, ghi = unpack(gv, IS_BF16)
                acc += lo * glo
                acc += hi * ghi
            dh = red23(acc)
        else:
            dh = tl.zeros([BT, NP], dtype=tl.float32)
        if HAS_GPRE:
            dh += tl.load(gpre_ptr + t2 * N + i2, mask=m2, other=0.0)
        dh = tl.where(m2, dh, 0.0)
        r = tl.load(r_ptr + t2 * N + i2, mask=m2, other=0.0)
        zrow = z_ptr + (t2 * N + i2) * NK
        crow = coef_ptr + (t2 * N + i2) * NKC
        # k = 0: h_pre
        z = tl.load(zrow, mask=m2, other=0.0)
        p = tanh(z)
        dz = sa * dh * (1.0 - p * p)
        mm = dz * z
        tl.store(crow, r * dz, mask=m2)
        tl.store(crow + NK, sa * p + bpre, mask=m2)
        acc_sa += p * dh
        acc_db += dh
        # k = 1: h_post
        z = tl.load(zrow + 1, mask=m2, other=0.0)
        p = tanh(z)
        gp = tl.load(gpost_ptr + t2 * N + i2, mask=m2, other=0.0)
        dz = sb * gp * (1.0 - p * p)
        mm += dz * z
        tl.store(crow + 1, r * dz, mask=m2)
        acc_sb += p * gp
        # k = 2 + j: column i of h_res (row j)
        for j in tl.static_range(N):
            dm, ds = bwd_res(zrow, crow, gres_ptr, t2, i2, m2, r, sa, j, N)
            mm += dm
            acc_sa += ds
        tl.store(crow + NK + 1, r * r * mm / C, mask=m2)
    prow = part_ptr + pid * PW
    tl.store(prow, tl.sum(acc_sa))
    tl.store(prow + 1, tl.sum(acc_sb))
    i1 = tl.arange(0, NP)
    tl.store(prow + 2 + i1, tl.sum(acc_db, axis=0), mask=i1 < N)


@triton.jit
def bwd_dx_mma_kernel(x_ptr, g_ptr, w_ptr, coef_ptr, dx_ptr, dwp_ptr,
                       R, C8, GR, NCB, NG,
                       N: tl.constexpr, NK: tl.constexpr, NKC: tl.constexpr, KP: tl.constexpr,
                       BM: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr,
                       HAS_G: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DW: tl.constexpr,
                       ACC: tl.constexpr, DW_BF16: tl.constexpr, DOT_F32: tl.constexpr,
                       EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    # Rows are (token, stream) pairs of x viewed as [R = T*n, C]; coef [R, NKC] = (u_0..u_{NK-1},
    # h_pre, e, pad); g [T, C] (row r uses g[r // n]); w [C, NK] fp32; dx [R, C]; dwp [NG, C, NK].
    # Program (column block cb, row group pg), column block fastest; groups last-first and rows
    # from their end (the first reads hit what bwd_coef_kernel left in L2). C = 8 * C8 (rows
    # 16-byte aligned for the compiler). Per BM rows:
    #   dx = u @ w^T (tensor cores, tf32) - e x + h_pre g   [+ dx already there: ACC]
    #   dw_partial += x^T @ u (tensor cores: bf16 x as loaded with u = hi + lo in bf16, or tf32)
    C = C8 * 8
    pid = tl.program_id(0)
    cb = pid % NCB
    pg = NG - 1 - pid // NCB
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    kk = tl.arange(0, KP)
    km = kk < NK
    if WRITE_DX:
        wt = tl.load(w_ptr + c[:, None] * NK + kk[None, :], mask=cm[:, None] & km[None, :], other=0.0)
        wT = tl.trans(wt)
    dw = tl.zeros([BC, KP], dtype=tl.float32)
    r_lo = pg * GR
    r_hi = tl.minimum(R, r_lo + GR)
    nb = tl.cdiv(r_hi - r_lo, BM)
    # 64-bit scalar base per row block + loop-invariant 32-bit offsets inside the block (few
    # address registers, nothing 64-bit per element)
    jj = tl.arange(0, BM)
    xo = jj[:, None] * C + c[None, :]
    co = jj[:, None] * NKC + kk[None, :]
    POW2: tl.constexpr = (N & (N - 1)) == 0
    if POW2:
        go = (jj // N)[:, None] * C + c[None, :]      # blocks start at a multiple of N
    for kb in tl.range(0, nb, num_stages=STAGES):
        row0 = r_lo + (nb - 1 - kb) * BM
        base = row0.to(tl.int64) * C
        # EVEN_R / EVEN_C: whole row blocks / column blocks, no masks (none to carry through the
        # software pipeline)
        if EVEN_R:
            rm = jj >= 0
        else:
            rm = jj < r_hi - row0
        if EVEN_C:
            lm = rm[:, None]
        else:
            lm = rm[:, None] & cm[None, :]
        if EVEN_R and EVEN_C:
            xt = tl.load(x_ptr + base + xo)
        else:
            xt = tl.load(x_ptr + base + xo, mask=lm, other=0.0)
        cptr = coef_ptr + row0.to(tl.int64) * NKC + co
        if EVEN_R:
            ct = tl.load(cptr, mask=(kk < NKC)[None, :], other=0.0)
        else:
            ct = tl.load(cptr, mask=rm[:, None] & (kk < NKC)[None, :], other=0.0)
        u = tl.where(km[None, :], ct, 0.0)
        if WRITE_DW:
            if DW_BF16:
                dw = dot_xT_hilo(xt, u, dw, DOT_F32)
            elif DOT_F32:
                dw = tl.dot(tl.trans(xt.to(tl.float32)), u, dw, input_precision="ieee")
            else:
                dw = tl.dot(tl.trans(xt.to(tl.float32)), u, dw, input_precision="tf32")
        if WRITE_DX:
            if DOT_F32:
                d = tl.dot(u, wT, input_precision="ieee")
            else:
                d = tl.dot(u, wT, input_precision="tf32")
            e = tl.sum(tl.where(kk[None, :] == NK + 1, ct, 0.0), axis=1)
            d -= e[:, None] * xt.to(tl.float32)
            if HAS_G:
                a = tl.sum(tl.where(kk[None, :] == NK, ct, 0.0), axis=1)
                gptr = g_ptr + (row0 // N).to(tl.int64) * C
                if POW2:
                    gptr += go
                else:
                    gptr += ((row0 % N + jj) // N)[:, None] * C + c[None, :]
                if EVEN_R and EVEN_C:
                    gt = tl.load(gptr)
                else:
                    gt = tl.load(gptr, mask=lm, other=0.0)
                d += a[:, None] * gt.to(tl.float32)
            optr = dx_ptr + base + xo
            store_grad(optr, d, lm, EVEN_R and EVEN_C, ACC)
    if WRITE_DW:
        tl.store(dwp_ptr + pg.to(tl.int64) * C * NK + c[:, None] * NK + kk[None, :], dw,
                 mask=cm[:, None] & km[None, :])
