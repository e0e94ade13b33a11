"""The mHC pre forward kernel (kernels/triton/mhc_pre.py's docstring says how it works): work
items of BT tokens x one column slice, partial GEMM and sum of squares into a ring of slots, the
last item of a token block runs the norm, sigmoid and Sinkhorn epilogue, and layer_input for the
block LAG groups back, with bounded waits on cross-CTA counters."""
import triton
import triton.language as tl

from kernels.triton.sinkhorn import sk_init, sk_step


@triton.jit
def flag_min(ptr, mask, other, NT: tl.constexpr):
    """A sync counter read with a plain (volatile) load, made uniform across the CTA.

    Every thread loads the counter itself and warps run at different times, so they may see
    different values; branching on that per thread would split the CTA around barriers. NT = the
    thread count: one element per thread, reduced to one value that every thread gets.
    """
    z = tl.zeros([NT], dtype=tl.int32)
    v = tl.load(ptr + z, mask=(z + mask.to(tl.int32)) != 0, other=other, volatile=True)
    return tl.min(v, axis=0)


# ====================================================================== forward kernel
@triton.jit
def wait_until(cnt_ptr, target, err_ptr, MAXSPIN: tl.constexpr):
    """Polls a group counter until it reaches target. After MAXSPIN polls it gives up and raises
    the error flag (checked by tests and tuning) rather than hang the GPU."""
    cnt = tl.atomic_add(cnt_ptr, 0)
    spins = 0
    while (cnt < target) & (spins < MAXSPIN):
        cnt = tl.atomic_add(cnt_ptr, 0)
        spins += 1
    if cnt < target:
        tl.atomic_add(err_ptr, 1)


@triton.jit
def dot_hilo(xt, hi_ptr, lo_ptr, off, mask, acc, DOT_F32: tl.constexpr):
    """acc + xt @ (hi + lo): xt [BT, BK] in x's dtype as loaded, hi / lo [BK, W] tiles of a
    weight split in x's dtype (kernels/hilo.py). DOT_F32: the same products in fp32 (the
    interpreter multiplies 16-bit float tiles as their bit patterns)."""
    hi = tl.load(hi_ptr + off, mask=mask, other=0.0)
    lo = tl.load(lo_ptr + off, mask=mask, other=0.0)
    if DOT_F32:
        xf = xt.to(tl.float32)
        acc = tl.dot(xf, hi.to(tl.float32), acc, input_precision="ieee")
        acc = tl.dot(xf, lo.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(xt, hi, acc)
        acc = tl.dot(xt, lo, acc)
    return acc


@triton.jit
def fwd_kernel(x_ptr, phi_ptr, plo_ptr, b_ptr, alpha_ptr,
                ws_ptr, wss_ptr, sync_ptr,
                hpre_ptr, hpost_ptr, hres_ptr, m_ptr, r_ptr, li_ptr,
                T, C, G, S, CHUNKS, LAG, TOTAL, RING, iters,
                N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr,
                APPLY: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr,
                HILO: tl.constexpr, DOT_F32: tl.constexpr,
                MAXSPIN: tl.constexpr, NT: tl.constexpr, EARLY: tl.constexpr,
                EU: tl.constexpr, EU2: tl.constexpr,
                EPS_RMS: tl.constexpr, EPS_SK: tl.constexpr):
    nC = N * C
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BK)
    kk = tl.arange(0, KP)
    kmask = kk < K
    jn = tl.arange(0, NP)
    jv = jn < N
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    valid = (i3 < N) & (j3 < N)
    cw = CHUNKS * BK

    vid = tl.atomic_add(sync_ptr, 1)
    while vid < TOTAL:
        g = vid // S
        s = vid - g * S
        c_lo = s * cw
        gp = g - LAG
        if APPLY:
            # Is group g - LAG ready? EARLY: read now with a plain load, used after phase 1 (the
            # latency hides behind the GEMM; the counter only grows, so S + 1 seen here stays
            # true) and only a group not yet ready costs atomics. Else: always one atomic (blocking
            # ~1 L2 round trip, but flag_min's reduction costs ~45 registers).
            gpc = tl.minimum(tl.maximum(gp, 0), G - 1)
            if EARLY:
                ready = flag_min(sync_ptr + 2 + gpc, (gp >= 0) & (gp < G), S + 1, NT)
            else:
                ready = S
        if g < G:
            # ---------------- phase 1: partial GEMM + sum of squares over slice s of block g
            tok = g * BT + rows
            tmask = tok < T
            xrow = tok.to(tl.int64) * nC
            # The partials of group g go to ring slot g % RING, last used by group g - RING: that
            # group's epilogue must be done (its counter at S + 2). Read early, checked after the loop.
            slot = g % RING
            gw = tl.maximum(g - RING, 0)
            if EARLY:
                early = flag_min(sync_ptr + 2 + gw, g >= RING, S + 2, NT)
            else:
                early = tl.where(g >= RING, S, S + 2)
            acc = tl.zeros([BT, KP], dtype=tl.float32)
            ss = tl.zeros([BT], dtype=tl.float32)
            for j in range(N * CHUNKS):
                i = j // CHUNKS
                c = c_lo + (j - i * CHUNKS) * BK + cols
                cmask = c < C
                xt = tl.load(x_ptr + xrow[:, None] + (i * C + c)[None, :],
                             mask=tmask[:, None] & cmask[None, :], other=0.0)
                xf = xt.to(tl.float32)
                if HILO:
                    # phi hi / lo: [nC, KP] in x's dtype, zero padded past K
                    prow = (i * C + c).to(tl.int64) * KP
                    acc = dot_hilo(xt, phi_ptr, plo_ptr, prow[:, None] + kk[None, :],
                                    cmask[:, None], acc, DOT_F32)
                else:
                    prow = (i * C + c).to(tl.int64) * K
                    pt = tl.load(phi_ptr + prow[:, None] + kk[None, :],
                                 mask=cmask[:, None] & kmask[None, :], other=0.0)
                    acc = tl.dot(xf, pt, acc, input_precision=PREC)
                ss += tl.sum(xf * xf, axis=1)     # (a [BT, BK] accumulator costs 26 registers)
            if early < S + 2:
                wait_until(sync_ptr + 2 + gw, S + 2, sync_ptr + 1, MAXSPIN)
            tl.debug_barrier()
            wrow = (slot * S + s).to(tl.int64) * BT + rows
            tl.store(ws_ptr + wrow[:, None] * K + kk[None, :], acc, mask=kmask[None, :])
            tl.store(wss_ptr + wrow, ss)
            tl.debug_barrier()
            old = tl.atomic_add(sync_ptr + 2 + g, 1)
            if old == S - 1:
                # ---------------- epilogue, by the last item of group g to arrive. First only
                # what phase 2 needs (h_pre: the pre partials and the sums of squares), published
                # as counter S + 1; then h_post and the Sinkhorn iterations, counter S + 2.
                # The partial loads are unrolled by EU so that EU slices' loads are in flight.
                pre = tl.zeros([BT, NP], dtype=tl.float32)
                sq = tl.zeros([BT], dtype=tl.float32)
                for s0 in range(0, S, EU):
                    for u in tl.static_range(EU):
                        ok = (rows * 0 + s0 + u) < S
                        wr = (slot * S + s0 + u).to(tl.int64) * BT + rows
                        pre += tl.load(ws_ptr + wr[:, None] * K + jn[None, :],
                                       mask=ok[:, None] & jv[None, :], other=0.0, cache_modifier=".cg")
                        sq += tl.load(wss_ptr + wr, mask=ok, other=0.0, cache_modifier=".cg")
                r = tl.sqrt(sq / nC + EPS_RMS)
                pre = pre / r[:, None]
                t64 = tok.to(tl.int64)
                m2 = tmask[:, None] & jv[None, :]
                m3 = tmask[:, None, None] & valid
                hp = tl.sigmoid(tl.load(alpha_ptr) * pre
                                + tl.load(b_ptr + jn, mask=jv, other=0.0)[None, :])
                tl.store(hpre_ptr + t64[:, None] * N + jn[None, :], hp, mask=m2)
                if SAVE:
                    tl.store(m_ptr + t64[:, None] * K + jn[None, :], pre, mask=m2)
                    tl.store(r_ptr + t64, r, mask=tmask)
                tl.debug_barrier()
                tl.atomic_add(sync_ptr + 2 + g, 1)   # == S + 1: h_pre of group g is ready
                post = tl.zeros([BT, NP], dtype=tl.float32)
                res = tl.zeros([BT, NP, NP], dtype=tl.float32)
                for s0 in range(0, S, EU2):
                    for u in tl.static_range(EU2):
                        ok = (rows * 0 + s0 + u) < S
                        wr = (slot * S + s0 + u).to(tl.int64) * BT + rows
                        post += tl.load(ws_ptr + wr[:, None] * K + N + jn[None, :],
                                        mask=ok[:, None] & jv[None, :], other=0.0,
                                        cache_modifier=".cg")
                        res += tl.load(ws_ptr + wr[:, None, None] * K + 2 * N + i3 * N + j3,
                                       mask=ok[:, None, None] & valid, other=0.0,
                                       cache_modifier=".cg")
                post = post / r[:, None]
                res = res / r[:, None, None]
                if SAVE:
                    tl.store(m_ptr + t64[:, None] * K + N + jn[None, :], post, mask=m2)
                    tl.store(m_ptr + t64[:, None, None] * K + 2 * N + i3 * N + j3, res, mask=m3)
                hq = 2.0 * tl.sigmoid(tl.load(alpha_ptr + 1) * post
                                      + tl.load(b_ptr + N + jn, mask=jv, other=0.0)[None, :])
                L = tl.load(alpha_ptr + 2) * res + tl.load(b_ptr + 2 * N + i3 * N + j3, mask=valid,
                                                           other=0.0)
                M, _mx = sk_init(L, valid)
                for _it in range(iters):
                    M = sk_step(M, EPS_SK)
                tl.store(hpost_ptr + t64[:, None] * N + jn[None, :], hq, mask=m2)
                tl.store(hres_ptr + t64[:, None, None] * (N * N) + i3 * N + j3, M, mask=m3)
                tl.debug_barrier()
                tl.atomic_add(sync_ptr + 2 + g, 1)   # == S + 2: group g done, its slot is free
        if APPLY:
            # ---------------- phase 2: layer_input for slice s of block g - LAG
            if (gp >= 0) & (gp < G):
                if ready < S + 1:
                    wait_until(sync_ptr + 2 + gp, S + 1, sync_ptr + 1, MAXSPIN)
                tl.debug_barrier()
                tok = gp * BT + rows
                tmask = tok < T
                t64 = tok.to(tl.int64)
                xrow = t64 * nC
                for cc in range(CHUNKS):
                    # reverse chunk order: the most recently read lines first
                    c = c_lo + (CHUNKS - 1 - cc) * BK + cols
                    cmask = c < C
                    lm = tmask[:, None] & cmask[None, :]
                    li = tl.zeros([BT, BK], dtype=tl.float32)
                    for i in tl.static_range(N):
                        # .cg: straight from L2, written by another CTA (never a stale L1 line)
                        h_i = tl.load(hpre_ptr + t64 * N + i, mask=tmask, other=0.0,
                                      cache_modifier=".cg")
                        xt = tl.load(x_ptr + xrow[:, None] + (i * C + c)[None, :], mask=lm, other=0.0)
                        li += h_i[:, None] * xt.to(tl.float32)
                    tl.store(li_ptr + t64[:, None] * C + c[None, :],
                             li.to(li_ptr.dtype.element_ty), mask=lm)
        vid = tl.atomic_add(sync_ptr, 1)
