"""F_post,res for HC and mHC in TileLang: x_next[t, i] = sum_j h_res[t, i, j] x[t, j] + h_post[t, i] f[t].

Shapes (MATH.md): x [T, n, C] bf16/fp16, f [T, C] same dtype, h_post [T, n] fp32, h_res [T, n, n]
fp32 indexed [token, dst, src]. fp32 arithmetic; x_next in x's dtype.

Forward (`_build_fwd`): one CTA per token, BLOCK/8 threads (8 elements, one 16-byte vector, of
every row per thread). It keeps h_res and h_post in registers and walks the token's C in BLOCK
chunks: the [n, BLOCK] tile of x and the chunk of f go global -> registers (fp32), each thread
forms acc[i] = h_post[i] f + sum_j h_res[i, j] x[j] for its 8 columns and stores [n, BLOCK].
Per token it reads (n+1)C elements and writes nC, the minimum; no shared memory, no barriers, so
many CTAs per SM keep the loads in flight.

Backward (`_build_bwd`), g = dL/dx_next, one CTA per token, one pass over C:
  dx[j] = sum_i h_res[i, j] g[i],  df = sum_i h_post[i] g[i]          (state dtype, per chunk)
  dh_post[i] = sum_c g[i, c] f[c],  dh_res[i, j] = sum_c g[i, c] x[j, c]   (fp32)
The C-sums are TileLang reducers: per-thread partials across all chunks, one cross-thread
AllReduce per coefficient at the end. Reads (2n+1)C, writes (n+1)C per token (+ n + n^2 fp32).
All four gradients are computed whenever one is asked for (their inputs are read anyway for dx).
Site link (kernels/site_link.py): when h_res comes from a fused pre of this same x object, post
claims the pre's link and its backward hands dx to the pre's backward (site_link.hand_over)
instead of returning it; the pre's dx kernel adds its own gradient into it in place, so autograd
never runs a separate add of the two x gradients (2nC read + nC write per token saved).

BLOCK: the largest of 1024 / 512 / 256 dividing C, else C rounded up to a power of two (capped at
1024) with a predicated last chunk, so any C that is a multiple of 8 works.
"""
import functools

import torch

from kernels import site_link
from kernels.tilelang.common import (
    TL_DTYPES,
    block_c,
    check_state,
    check_tensor,
    compile_kernel,
    on_device,
)

OP = "post"


@functools.cache
def _build_fwd(n: int, C: int, dtype: str, cpu: bool):
    import tilelang.language as T

    blk = block_c(C)
    nch = -(-C // blk)
    Tn = T.dynamic("T")
    f32 = "float32"

    @T.prim_func
    def post_fwd(x: T.Tensor((Tn, n, C), dtype), f: T.Tensor((Tn, C), dtype),
                 h_post: T.Tensor((Tn, n), f32), h_res: T.Tensor((Tn, n, n), f32),
                 out: T.Tensor((Tn, n, C), dtype)):
        with T.Kernel(Tn, threads=max(32, blk // 8)) as t:
            xl = T.alloc_fragment((n, blk), f32)
            fl = T.alloc_fragment((blk,), f32)
            ol = T.alloc_fragment((n, blk), f32)
            hr = T.alloc_fragment((n, n), f32)
            hp = T.alloc_fragment((n,), f32)
            T.copy(h_res[t, 0, 0], hr)
            T.copy(h_post[t, 0], hp)
            for c0 in T.serial(nch):
                T.copy(x[t, 0, c0 * blk], xl)
                T.copy(f[t, c0 * blk], fl)
                for i, c in T.Parallel(n, blk):
                    ol[i, c] = hp[i] * fl[c]
                    for j in T.unroll(n):
                        ol[i, c] += hr[i, j] * xl[j, c]
                T.copy(ol, out[t, 0, c0 * blk])

    return compile_kernel(post_fwd, cpu)


@functools.cache
def _build_bwd(n: int, C: int, dtype: str, cpu: bool):
    import tilelang.language as T

    blk = block_c(C)
    nch = -(-C // blk)
    Tn = T.dynamic("T")
    f32 = "float32"

    # n > 4: three [n, 8] fp32 tiles per thread would spill; 4 columns a thread instead
    threads = max(32, blk // (8 if n <= 4 else 4))

    @T.prim_func
    def post_bwd(g: T.Tensor((Tn, n, C), dtype), x: T.Tensor((Tn, n, C), dtype),
                 f: T.Tensor((Tn, C), dtype), h_post: T.Tensor((Tn, n), f32),
                 h_res: T.Tensor((Tn, n, n), f32),
                 dx: T.Tensor((Tn, n, C), dtype), df: T.Tensor((Tn, C), dtype),
                 dh_post: T.Tensor((Tn, n), f32), dh_res: T.Tensor((Tn, n, n), f32)):
        with T.Kernel(Tn, threads=threads) as t:
            gl = T.alloc_fragment((n, blk), f32)
            xl = T.alloc_fragment((n, blk), f32)
            fl = T.alloc_fragment((blk,), f32)
            dxl = T.alloc_fragment((n, blk), f32)
            dfl = T.alloc_fragment((blk,), f32)
            hr = T.alloc_fragment((n, n), f32)
            hp = T.alloc_fragment((n,), f32)
            if cpu:
                # the c target has no cross-thread reducer; its one "thread" sums in place
                acc_r = T.alloc_local((n, n), f32)
                acc_p = T.alloc_local((n,), f32)
                for i, j in T.grid(n, n):
                    acc_r[i, j] = 0.0
                for i in T.serial(n):
                    acc_p[i] = 0.0
            else:
                acc_r = T.alloc_reducer((n, n), f32, op="sum")
                acc_p = T.alloc_reducer((n,), f32, op="sum")
                T.reducer_init(acc_r)
                T.reducer_init(acc_p)
            T.copy(h_res[t, 0, 0], hr)
            T.copy(h_post[t, 0], hp)
            for c0 in T.serial(nch):
                T.copy(g[t, 0, c0 * blk], gl)
                T.copy(x[t, 0, c0 * blk], xl)
                T.copy(f[t, c0 * blk], fl)
                for j, c in T.Parallel(n, blk):
                    dxl[j, c] = 0.0
                for c in T.Parallel(blk):
                    dfl[c] = 0.0
                for i in T.unroll(n):
                    for j in T.unroll(n):
                        for c in T.Parallel(blk):
                            dxl[j, c] += hr[i, j] * gl[i, c]
                            if cpu:
                                acc_r[i, j] += gl[i, c] * xl[j, c]
                            else:
                                T.reducer_update(acc_r[i, j], gl[i, c] * xl[j, c])
                    for c in T.Parallel(blk):
                        dfl[c] += hp[i] * gl[i, c]
                        if cpu:
                            acc_p[i] += gl[i, c] * fl[c]
                        else:
                            T.reducer_update(acc_p[i], gl[i, c] * fl[c])
                T.copy(dxl, dx[t, 0, c0 * blk])
                T.copy(dfl, df[t, c0 * blk])
            if cpu:
                for i, j in T.grid(n, n):
                    dh_res[t, i, j] = acc_r[i, j]
                for i in T.serial(n):
                    dh_post[t, i] = acc_p[i]
            else:
                sum_r = T.alloc_fragment((n, n), f32)
                sum_p = T.alloc_fragment((n,), f32)
                T.finalize_reducer(acc_r, sum_r)
                T.finalize_reducer(acc_p, sum_p)
                for i, j in T.Parallel(n, n):
                    dh_res[t, i, j] = sum_r[i, j]
                for i in T.Parallel(n):
                    dh_post[t, i] = sum_p[i]

    return compile_kernel(post_bwd, cpu)


def post_forward(x, f, h_post, h_res):
    """Forward kernel only, on validated contiguous inputs."""
    T_, n, C = x.shape
    out = torch.empty_like(x)
    if T_:
        kern = _build_fwd(n, C, TL_DTYPES[x.dtype], x.device.type == "cpu")
        with on_device(x):
            kern(x, f, h_post, h_res, out)
    return out


def post_backward(g, x, f, h_post, h_res):
    """Backward kernel only: (dx, df, dh_post, dh_res) on validated contiguous inputs."""
    T_, n, C = x.shape
    dx = torch.empty_like(x)
    df = torch.empty_like(f)
    dhp = torch.empty_like(h_post)
    dhr = torch.empty_like(h_res)
    if T_:
        kern = _build_bwd(n, C, TL_DTYPES[x.dtype], x.device.type == "cpu")
        with on_device(x):
            kern(g, x, f, h_post, h_res, dx, df, dhp, dhr)
    return dx, df, dhp, dhr


class _Post(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, h_post, h_res, link):
        ctx.save_for_backward(x, f, h_post, h_res)
        ctx.link = link
        return post_forward(x, f, h_post, h_res)

    @staticmethod
    def backward(ctx, g):
        need = ctx.needs_input_grad[:4]
        if not any(need):
            return None, None, None, None, None
        x, f, h_post, h_res = ctx.saved_tensors
        grads = post_backward(g.to(x.dtype).contiguous(), x, f, h_post, h_res)
        dx, df, dhp, dhr = (d if k else None for d, k in zip(grads, need))
        dx = site_link.hand_over(ctx, ctx.link, dx, 3)   # to the linked pre's backward, if any
        return dx, df, dhp, dhr, None


def post(x: torch.Tensor, f: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> torch.Tensor:
    """x_next = h_res @ x + h_post * f per token (F_post,res, MATH.md), differentiable.

    x [T, n, C] bf16/fp16 (n in 1..8, C a multiple of 8), f [T, C] x's dtype,
    h_post [T, n] fp32, h_res [T, n, n] fp32 [token, dst, src]. Returns [T, n, C] in x's dtype.
    When h_res comes from a fused pre of this same x (kernels/site_link.py), the x gradient goes
    to that pre's backward, which adds its own into it in place (no separate add of the two).
    """
    T_, n, C = check_state(OP, x, "x")
    link = site_link.claim(h_res, x)
    x = x.contiguous()
    f = check_tensor(OP, f, "f", (T_, C), x.dtype, x.device)
    h_post = check_tensor(OP, h_post, "h_post", (T_, n), torch.float32, x.device)
    h_res = check_tensor(OP, h_res, "h_res", (T_, n, n), torch.float32, x.device)
    return _Post.apply(x, f, h_post, h_res, link)
