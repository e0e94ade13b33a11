"""The post backward kernel (kernels/triton/post.py's docstring says how it works): dx, df,
dh_post and dh_res in one pass over C per token."""
import triton
import triton.language as tl


@triton.jit
def post_bwd_kernel(g_ptr, x_ptr, f_ptr, hp_ptr, hr_ptr,
                     dx_ptr, df_ptr, dhp_ptr, dhr_ptr,
                     N: tl.constexpr, NP: tl.constexpr, C: tl.constexpr,
                     BLOCK_C: tl.constexpr, VEC: tl.constexpr, SPLIT: tl.constexpr, CPS: tl.constexpr,
                     EVEN_C: tl.constexpr, NUM_STAGES: tl.constexpr,
                     NEED_DX: tl.constexpr, NEED_DF: tl.constexpr,
                     NEED_DHP: tl.constexpr, NEED_DHR: tl.constexpr):
    # Chunks are [NP, BV, VEC] tiles (BV = BLOCK_C / VEC): a thread owns VEC contiguous elements
    # (one vector) of every row, so sums over rows and over VEC stay inside the thread. The
    # C-reductions (dh_post, dh_res) keep per-thread partials [.., BV] across the chunk loop and
    # cross threads once, after it: no shuffles or barriers inside the loop.
    BV: tl.constexpr = BLOCK_C // VEC
    pid = tl.program_id(0)
    t = (pid // SPLIT).to(tl.int64)
    s = pid % SPLIT
    rows = tl.arange(0, NP)
    rmask = rows < N
    r3 = rows[:, None, None]
    rmask3 = r3 < N
    off2 = tl.arange(0, BV)[:, None] * VEC + tl.arange(0, VEC)[None, :]      # [BV, VEC]

    g_base = g_ptr + t * (N * C)
    x_base = x_ptr + t * (N * C)
    dx_base = dx_ptr + t * (N * C)
    hr_base = hr_ptr + t * (N * N)
    if NEED_DF:
        hp = tl.load(hp_ptr + t * N + rows, mask=rmask, other=0.0)
    acc_hp = tl.zeros([NP, BV], dtype=tl.float32)
    acc_hr = tl.zeros([NP, NP, BV], dtype=tl.float32)                        # [dst i, src j, BV]

    for k in tl.range(0, CPS, num_stages=NUM_STAGES):
        cols = (s * CPS + k) * BLOCK_C + off2                                 # [BV, VEC]
        cmask = cols < C
        tile = r3 * C + cols[None, :, :]
        tmask = rmask3 & cmask[None, :, :]
        # Every load of the chunk is issued before any store (stores would order later loads).
        if EVEN_C and NP == N:
            g = tl.load(g_base + tile).to(tl.float32)
        else:
            g = tl.load(g_base + tile, mask=tmask, other=0.0).to(tl.float32)
        if NEED_DHR:
            if EVEN_C and NP == N:
                xt = tl.load(x_base + tile).to(tl.float32)
            else:
                xt = tl.load(x_base + tile, mask=tmask, other=0.0).to(tl.float32)
        if NEED_DHP:
            if EVEN_C:
                f = tl.load(f_ptr + t * C + cols).to(tl.float32)
            else:
                f = tl.load(f_ptr + t * C + cols, mask=cmask, other=0.0).to(tl.float32)
            acc_hp += tl.sum(g * f[None, :, :], axis=2)

        if NEED_DX or NEED_DHR:
            dxt = tl.zeros([NP, BV, VEC], dtype=tl.float32)
            for i in tl.static_range(N):
                g_i = tl.sum(tl.where(r3 == i, g, 0.0), axis=0)                # row i of g: [BV, VEC]
                if NEED_DX:
                    hrow = tl.load(hr_base + i * N + rows, mask=rmask, other=0.0)   # h_res[i, :]
                    dxt += hrow[:, None, None] * g_i[None, :, :]
                if NEED_DHR:
                    part = tl.sum(xt * g_i[None, :, :], axis=2)                # dh_res[i, :] partials
                    acc_hr += tl.where(r3 == i, part[None, :, :], 0.0)
            if NEED_DX:
                dxt = dxt.to(dx_ptr.dtype.element_ty)
                if EVEN_C and NP == N:
                    tl.store(dx_base + tile, dxt)
                else:
                    tl.store(dx_base + tile, dxt, mask=tmask)
        if NEED_DF:
            df = tl.sum(g * hp[:, None, None], axis=0).to(df_ptr.dtype.element_ty)
            if EVEN_C:
                tl.store(df_ptr + t * C + cols, df)
            else:
                tl.store(df_ptr + t * C + cols, df, mask=cmask)

    p = t * SPLIT + s                                                # row of the (partial) output
    if NEED_DHP:
        tl.store(dhp_ptr + p * N + rows, tl.sum(acc_hp, axis=1), mask=rmask)
    if NEED_DHR:
        tl.store(dhr_ptr + p * (N * N) + rows[:, None] * N + rows[None, :], tl.sum(acc_hr, axis=2),
                 mask=rmask[:, None] & rmask[None, :])
