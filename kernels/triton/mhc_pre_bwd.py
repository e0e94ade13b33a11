"""The mHC pre backward kernels (kernels/triton/mhc_pre.py's docstring says how they work): the
per-token coefficient backward (dh_pre, sigmoid and Sinkhorn backward, norm chain rule), then dx
and dphi per column block, streamed through a software pipeline."""
import triton
import triton.language as tl

from kernels.triton.common import dot_xT_hilo, store_grad
from kernels.triton.sinkhorn import sinkhorn_bwd


# ====================================================================== backward kernels
@triton.jit
def bwd_coef_kernel(x_ptr, gli_ptr, gpre_ptr, gpost_ptr, gres_ptr, m_ptr, r_ptr, b_ptr, alpha_ptr,
                     du_ptr, coef_ptr, dbp_ptr, dap_ptr,
                     T, C, iters, Q,
                     N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr,
                     HAS_LI: tl.constexpr, HAS_GPRE: tl.constexpr, HAS_GPOST: tl.constexpr,
                     HAS_GRES: tl.constexpr, EPS_SK: tl.constexpr):
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
        dres = sinkhorn_bwd(L, Gr, valid, iters, Q, EPS_SK)
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
def bwd_dx_dphi_kernel(x_ptr, phi_ptr, du_ptr, coef_ptr, hpre_ptr, gli_ptr, dx_ptr, dphi_ptr,
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
