"""The post forward kernels (kernels/triton/post.py's docstring says how they work): one program
per token block and column chunk, or a loop over tokens for long inputs."""
import triton
import triton.language as tl


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def post_fwd_kernel(x_ptr, f_ptr, hp_ptr, hr_ptr, out_ptr, T,
                     N: tl.constexpr, NP: tl.constexpr, C: tl.constexpr,
                     BLOCK_C: tl.constexpr, VEC: tl.constexpr, NCB: tl.constexpr, EVEN_C: tl.constexpr,
                     BT: tl.constexpr, EVEN_T: tl.constexpr):
    # The program's x is one [BT, NP, BV, VEC] tile load (BT tokens, one C-chunk); a thread holds
    # one VEC-vector of every row, so picking row j is in-thread (no shuffles, barriers or shared
    # memory). BT > 1 gives each program more bytes in flight for the same launch overhead.
    BV: tl.constexpr = BLOCK_C // VEC
    pid = tl.program_id(0)
    c0 = (pid % NCB) * BLOCK_C
    toks = (pid // NCB).to(tl.int64) * BT + tl.arange(0, BT)                      # [BT]
    rows = tl.arange(0, NP)
    t2 = toks[:, None]
    r2 = rows[None, :]
    r4 = rows[None, :, None, None]
    cols = c0 + tl.arange(0, BV)[:, None] * VEC + tl.arange(0, VEC)[None, :]    # [BV, VEC]
    cmask = cols < C
    tok_mask = toks < T
    m2 = tok_mask[:, None] & (r2 < N)                                            # [BT, NP]
    fmask = tok_mask[:, None, None] & cmask[None, :, :]                          # [BT, BV, VEC]
    tmask = m2[:, :, None, None] & cmask[None, None, :, :]
    tile = toks[:, None, None, None] * (N * C) + r4 * C + cols[None, None, :, :]
    f_offs = toks[:, None, None] * C + cols[None, :, :]
    DENSE: tl.constexpr = EVEN_C and EVEN_T and NP == N

    if DENSE:
        xt = tl.load(x_ptr + tile)
        f = tl.load(f_ptr + f_offs)
    else:
        xt = tl.load(x_ptr + tile, mask=tmask, other=0.0)
        f = tl.load(f_ptr + f_offs, mask=fmask, other=0.0)
    hp = tl.load(hp_ptr + t2 * N + r2, mask=m2, other=0.0)                      # [BT, NP]
    xt = xt.to(tl.float32)
    acc = hp[:, :, None, None] * f.to(tl.float32)[:, None, :, :]
    for j in tl.static_range(N):
        # column j of h_res[t] (dst i = rows): how much source j feeds each destination
        hcol = tl.load(hr_ptr + t2 * (N * N) + r2 * N + j, mask=m2, other=0.0)   # [BT, NP]
        x_j = tl.sum(tl.where(r4 == j, xt, 0.0), axis=1)                        # [BT, BV, VEC]
        acc += hcol[:, :, None, None] * x_j[:, None, :, :]

    out = acc.to(out_ptr.dtype.element_ty)
    if DENSE:
        tl.store(out_ptr + tile, out)
    else:
        tl.store(out_ptr + tile, out, mask=tmask)


@triton.jit
def post_fwd_chunk(x_base, f_base, out_base, c0, hp, hcols, rows, off2,
                    N: tl.constexpr, NP: tl.constexpr, C: tl.constexpr, MASK_C: tl.constexpr):
    # One [NP, BV, VEC] chunk of one token; the row and column masks are compile-time optional so
    # that full chunks of an n = 2^k state carry no predicates at all.
    BV: tl.constexpr = off2.shape[0]
    VEC: tl.constexpr = off2.shape[1]
    r3 = rows[:, None, None]
    cols = c0 + off2                                                             # [BV, VEC]
    tile = r3 * C + cols[None, :, :]
    if MASK_C:
        cmask = cols < C
        tmask = (r3 < N) & cmask[None, :, :]
        xt = tl.load(x_base + tile, mask=tmask, other=0.0)
        f = tl.load(f_base + cols, mask=cmask, other=0.0)
    elif NP != N:
        tmask = tl.broadcast_to(r3 < N, [NP, BV, VEC])                           # padded rows only
        xt = tl.load(x_base + tile, mask=tmask, other=0.0)
        f = tl.load(f_base + cols)
    else:
        xt = tl.load(x_base + tile)
        f = tl.load(f_base + cols)
    xt = xt.to(tl.float32)
    acc = hp[:, None, None] * f.to(tl.float32)[None, :, :]
    for j in tl.static_range(N):
        x_j = tl.sum(tl.where(r3 == j, xt, 0.0), axis=0)                         # row j, in-thread
        acc += hcols[j][:, None, None] * x_j[None, :, :]
    out = acc.to(out_base.dtype.element_ty)
    if MASK_C or NP != N:
        tl.store(out_base + tile, out, mask=tmask)
    else:
        tl.store(out_base + tile, out)


@triton.jit
def post_fwd_token(x_ptr, f_ptr, hp_ptr, hr_ptr, out_ptr, t,
                    N: tl.constexpr, NP: tl.constexpr, C: tl.constexpr,
                    BLOCK_C: tl.constexpr, VEC: tl.constexpr, NUM_STAGES: tl.constexpr):
    BV: tl.constexpr = BLOCK_C // VEC
    NFULL: tl.constexpr = C // BLOCK_C
    rows = tl.arange(0, NP)
    rmask = rows < N
    off2 = tl.arange(0, BV)[:, None] * VEC + tl.arange(0, VEC)[None, :]         # [BV, VEC]
    x_base = x_ptr + t * (N * C)
    f_base = f_ptr + t * C
    out_base = out_ptr + t * (N * C)
    # The token's coefficients are loaded once, before the chunk loop, and live in registers
    # across it: h_post[t] and the n columns of h_res[t] (column j: what source j adds to each
    # destination), so a chunk issues only its n + 1 16-byte loads per thread.
    hp = tl.load(hp_ptr + t * N + rows, mask=rmask, other=0.0)
    hcols = ()
    for j in tl.static_range(N):
        hcols = hcols + (tl.load(hr_ptr + t * (N * N) + rows * N + j, mask=rmask, other=0.0),)
    for k in tl.range(0, NFULL, num_stages=NUM_STAGES):
        post_fwd_chunk(x_base, f_base, out_base, k * BLOCK_C, hp, hcols, rows, off2,
                        N, NP, C, False)
    if C % BLOCK_C != 0:
        # The tail is peeled off so that only it pays for column masks.
        post_fwd_chunk(x_base, f_base, out_base, NFULL * BLOCK_C, hp, hcols, rows, off2,
                        N, NP, C, True)


@triton.jit
def post_fwd_loop_kernel(x_ptr, f_ptr, hp_ptr, hr_ptr, out_ptr, T,
                          N: tl.constexpr, NP: tl.constexpr, C: tl.constexpr,
                          BLOCK_C: tl.constexpr, VEC: tl.constexpr, NUM_STAGES: tl.constexpr,
                          PERSISTENT: tl.constexpr):
    # One token per program, all of C in a loop (what the TileLang kernel does): the token's
    # coefficients are read once rather than once per chunk, and the loop can be software
    # pipelined. PERSISTENT: a fixed grid (a multiple of the SM count) strides over the tokens,
    # so CTAs are launched and retired once per program rather than once per token.
    pid = tl.program_id(0)
    if PERSISTENT:
        for t in tl.range(pid, T, tl.num_programs(0)):
            post_fwd_token(x_ptr, f_ptr, hp_ptr, hr_ptr, out_ptr, tl.cast(t, tl.int64),
                            N, NP, C, BLOCK_C, VEC, NUM_STAGES)
    else:
        post_fwd_token(x_ptr, f_ptr, hp_ptr, hr_ptr, out_ptr, pid.to(tl.int64),
                        N, NP, C, BLOCK_C, VEC, NUM_STAGES)
