"""The fused boundary's backward kernel (kernels/triton/post_coeffs.py's docstring says how it
works): the gradient reaching x_next (next post's, layer_input's, and through the next site's
coefficients) formed on chip and fed straight into F_post,res's backward, with the next site's
dphi on the same tiles."""
import triton
import triton.language as tl

from kernels.triton.common import dot_xT_hilo


@triton.jit
def post_coeffs_bwd_kernel(gx_ptr, x1_ptr, x0_ptr, f_ptr, hpost_ptr, hres_ptr, phi_ptr,
                           du_ptr, coef_ptr, hpn_ptr, gli_ptr,
                           dx_ptr, df_ptr, dhp_ptr, dhr_ptr, dphi_ptr,
                           T, C, NCB, TPS, TS,
                           N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                           BT: tl.constexpr, BR: tl.constexpr, STAGES: tl.constexpr,
                           HAS_GX: tl.constexpr, HAS_LI: tl.constexpr, NEED_DX: tl.constexpr,
                           NEED_DF: tl.constexpr, NEED_DH: tl.constexpr, DPHI: tl.constexpr,
                           PREC: tl.constexpr, DPHI_BF16: tl.constexpr, ATOMIC: tl.constexpr,
                           DOT_F32: tl.constexpr):
    # Program (column block cb: BR columns of every stream, token range ts). x1 = x_next, x0 = x.
    # The GEMM operands are "wide" tiles [BT, W], W = NP * BR (column w is stream w // BR, column
    # cb * BR + w % BR), so each of du @ phi^T and x1^T @ du is one product; the mixing works on
    # the same tile viewed as [BT, NP, BR].
    W: tl.constexpr = NP * BR
    pid = tl.program_id(0)
    cb = pid % NCB
    # the last token range first, each from its end: the first reads hit what the coefficient
    # kernel (tokens in increasing order) left in L2
    ts = TS - 1 - pid // NCB
    nC = N * C
    w = tl.arange(0, W)
    wi = w // BR
    wc = cb * BR + w % BR
    wmask = (wi < N) & (wc < C)
    woff = wi * C + wc                                       # [W]: offset in a token's [n, C] row
    kk = tl.arange(0, KP)
    kmask = kk < K
    phi_T = tl.load(phi_ptr + woff[None, :].to(tl.int64) * K + kk[:, None],
                    mask=kmask[:, None] & wmask[None, :], other=0.0)              # [KP, W]
    c = cb * BR + tl.arange(0, BR)
    cmask = c < C
    jn = tl.arange(0, NP)
    jv = jn < N
    j3 = jn[None, None, :]
    rows = tl.arange(0, BT)
    acc = tl.zeros([W, KP], dtype=tl.float32)
    t_lo = ts * TPS
    t_hi = tl.minimum(t_lo + TPS, T)
    nb = tl.cdiv(t_hi - t_lo, BT)
    for kb in tl.range(0, nb, num_stages=STAGES):
        # one 64-bit base per token block, 32-bit offsets inside it
        t0 = t_lo + (nb - 1 - kb) * BT
        tmask = rows < t_hi - t0
        t064 = t0.to(tl.int64)
        m2 = tmask[:, None] & jv[None, :]
        wm = tmask[:, None] & wmask[None, :]
        cm = tmask[:, None] & cmask[None, :]
        xo = rows[:, None] * nC + woff[None, :]              # [BT, W] offsets in x-shaped rows
        du = tl.load(du_ptr + t064 * K + rows[:, None] * K + kk[None, :],
                     mask=tmask[:, None] & kmask[None, :], other=0.0)
        cf = tl.load(coef_ptr + t0 + rows, mask=tmask, other=0.0)
        x1 = tl.load(x1_ptr + t064 * nC + xo, mask=wm, other=0.0)
        # ---- the gradient of x_next: through the next site's coefficients (du @ phi^T + coef
        # x_next), from the next post (gx) and from layer_input (h_pre g_li, below)
        if DOT_F32:
            G = tl.dot(du, phi_T, input_precision="ieee")
        else:
            G = tl.dot(du, phi_T, input_precision=PREC)
        G += cf[:, None] * x1.to(tl.float32)
        if HAS_GX:
            G += tl.load(gx_ptr + t064 * nC + xo, mask=wm, other=0.0).to(tl.float32)
        if DPHI:
            if DPHI_BF16:
                acc = dot_xT_hilo(x1, du, acc, DOT_F32)
            elif DOT_F32:
                acc = tl.dot(tl.trans(x1.to(tl.float32)), du, acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(x1.to(tl.float32)), du, acc, input_precision=PREC)
        G3 = tl.reshape(G, [BT, NP, BR])                     # [token, stream i (dst), column]
        co = rows[:, None] * C + c[None, :]                  # [BT, BR] offsets in f-shaped rows
        no = rows[:, None] * N + jn[None, :]                 # [BT, NP] offsets in [T, n] rows
        if HAS_LI:
            hpn = tl.load(hpn_ptr + t064 * N + no, mask=m2, other=0.0)
            gli = tl.load(gli_ptr + t064 * C + co, mask=cm, other=0.0)
            G3 += hpn[:, :, None] * gli.to(tl.float32)[:, None, :]
        # ---- F_post,res backward with G as the gradient of its output
        if NEED_DF:
            hq = tl.load(hpost_ptr + t064 * N + no, mask=m2, other=0.0)
            df = tl.sum(hq[:, :, None] * G3, axis=1)
            tl.store(df_ptr + t064 * C + co, df.to(df_ptr.dtype.element_ty), mask=cm)
        if NEED_DH:
            f = tl.load(f_ptr + t064 * C + co, mask=cm, other=0.0).to(tl.float32)
            if ATOMIC:                                       # one [T, ...] that every block adds to
                pb = t064
                tl.atomic_add(dhp_ptr + pb * N + no, tl.sum(G3 * f[:, None, :], axis=2), mask=m2,
                              sem="relaxed")
            else:                                            # first row of this block's partials
                pb = cb.to(tl.int64) * T + t064
                tl.store(dhp_ptr + pb * N + no, tl.sum(G3 * f[:, None, :], axis=2), mask=m2)
            dhr = tl.zeros([BT, NP, NP], dtype=tl.float32)   # [token, dst i, src j]
        # sources in a loop, not unrolled (registers, as in the forward kernel)
        for j in range(N):
            xjo = rows[:, None] * nC + j * C + c[None, :]
            if NEED_DX:
                # column j of h_res: what source j gave each destination
                hcol = tl.load(hres_ptr + t064 * (N * N) + rows[:, None] * (N * N) + jn[None, :] * N + j,
                               mask=m2, other=0.0)
                dxj = tl.sum(hcol[:, :, None] * G3, axis=1)
                tl.store(dx_ptr + t064 * nC + xjo, dxj.to(dx_ptr.dtype.element_ty), mask=cm)
            if NEED_DH:
                x0j = tl.load(x0_ptr + t064 * nC + xjo, mask=cm, other=0.0)
                part = tl.sum(G3 * x0j.to(tl.float32)[:, None, :], axis=2)
                dhr += tl.where(j3 == j, part[:, :, None], 0.0)
        if NEED_DH:
            dhr_at = dhr_ptr + pb * (N * N) + rows[:, None, None] * (N * N) + jn[None, :, None] * N + j3
            if ATOMIC:
                tl.atomic_add(dhr_at, dhr, mask=m2[:, :, None] & (j3 < N), sem="relaxed")
            else:
                tl.store(dhr_at, dhr, mask=m2[:, :, None] & (j3 < N))
    if DPHI:
        dphi_at = woff[:, None].to(tl.int64) * K + kk[None, :]
        if ATOMIC:      # every token range adds into one zeroed [nC, K]
            tl.atomic_add(dphi_ptr + dphi_at, acc, mask=wmask[:, None] & kmask[None, :], sem="relaxed")
        else:           # row block ts of [token ranges, nC, K], one writer
            tl.store(dphi_ptr + ts.to(tl.int64) * nC * K + dphi_at, acc, mask=wmask[:, None] & kmask[None, :])
