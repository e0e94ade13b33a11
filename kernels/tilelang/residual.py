"""The residual connection (n = 1) in TileLang: layer_input = x[:, 0], x_next = x + f.

residual_pre is a view (no kernel). residual_post is one elementwise kernel: grid
(cdiv(C, BLOCK), T), a CTA adds one BLOCK-column chunk of one token (16-byte vectors, 8 elements
a thread), reading 2C and writing C per token. Its backward is identity / view in plain torch:
dx = g, df = g[:, 0].
"""

import functools

import torch

from kernels.tilelang.common import (
    TL_DTYPES,
    block_c,
    check_state,
    check_tensor,
    compile_kernel,
    on_device,
)


@functools.cache
def _build_add(C: int, dtype: str, cpu: bool):
    import tilelang.language as T

    blk = block_c(C)
    Tn = T.dynamic("T")

    @T.prim_func
    def residual_add(x: T.Tensor((Tn, C), dtype), f: T.Tensor((Tn, C), dtype),
                     out: T.Tensor((Tn, C), dtype)):
        with T.Kernel(T.ceildiv(C, blk), Tn, threads=max(32, blk // 8)) as (cb, t):
            xl = T.alloc_fragment((blk,), "float32")
            fl = T.alloc_fragment((blk,), "float32")
            T.copy(x[t, cb * blk], xl)
            T.copy(f[t, cb * blk], fl)
            for c in T.Parallel(blk):
                xl[c] += fl[c]
            T.copy(xl, out[t, cb * blk])

    return compile_kernel(residual_add, cpu)


def add_forward(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Kernel only, on validated contiguous x [T, 1, C] and f [T, C]."""
    T_, _, C = x.shape
    out = torch.empty_like(x)
    if T_:
        kern = _build_add(C, TL_DTYPES[x.dtype], x.device.type == "cpu")
        with on_device(x):
            kern(x.view(T_, C), f, out.view(T_, C))
    return out


def _check_x(op: str, x: torch.Tensor):
    T_, n, C = check_state(op, x, "x")
    if n != 1:
        raise ValueError(f"{op}: residual expects x of shape [T, 1, C], got {list(x.shape)}")
    return T_, n, C


def residual_pre(x: torch.Tensor):
    """x [T, 1, C] -> (x[:, 0] (a view), None, None)."""
    _check_x("residual_pre", x)
    return x[:, 0], None, None


class _ResidualPost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f):
        return add_forward(x, f)

    @staticmethod
    def backward(ctx, g):
        need_x, need_f = ctx.needs_input_grad[:2]
        return (g if need_x else None), (g[:, 0] if need_f else None)


def residual_post(x: torch.Tensor, f: torch.Tensor, h_post=None, h_res=None) -> torch.Tensor:
    """x_next = x + f[:, None] for x [T, 1, C], f [T, C] (h_post, h_res are ignored: None)."""
    T_, _, C = _check_x("residual_post", x)
    x = x.contiguous()
    f = check_tensor("residual_post", f, "f", (T_, C), x.dtype, x.device)
    return _ResidualPost.apply(x, f)
