"""The residual connection (n = 1): layer_input = x[:, 0], x_next = x + f.

residual_pre is a view (no kernel). residual_post runs one elementwise Triton kernel at copy rate
(read 2C, write C per token): x [T, 1, C] and f [T, C] have the same flat layout, so the kernel
is a flat add over T*C elements, BLOCK elements per program, 16-byte vectors, the per-program
base offset in int64 (T*C may exceed 2^31). Its backward is identity / view in plain torch:
dx = g, df = g[:, 0].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.common import check_state, check_tensor

BLOCK = 4096
NUM_WARPS = 8


def _check_x(op: str, x: torch.Tensor):
    T, n, C = check_state(op, x, "x")
    if n != 1:
        raise ValueError(f"{op}: residual expects x of shape [T, 1, C], got {list(x.shape)}")
    return T, n, C


def residual_pre(x: torch.Tensor):
    """x [T, 1, C] -> (x[:, 0] (a view), None, None)."""
    _check_x("residual_pre", x)
    return x[:, 0], None, None


@triton.jit
def _add_kernel(x_ptr, f_ptr, out_ptr, numel8, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    # numel is passed divided by 8 (C is a multiple of 8) so the compiler knows the tail mask is
    # constant over 8-element vectors and keeps 16-byte accesses.
    numel = numel8.to(tl.int64) * 8                     # T*C may exceed 2^31
    base = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    if EVEN:
        x = tl.load(x_ptr + base + offs)
        f = tl.load(f_ptr + base + offs)
        tl.store(out_ptr + base + offs, (x.to(tl.float32) + f.to(tl.float32)).to(x.dtype))
    else:
        mask = offs < numel - base
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
        f = tl.load(f_ptr + base + offs, mask=mask, other=0.0)
        tl.store(out_ptr + base + offs, (x.to(tl.float32) + f.to(tl.float32)).to(x.dtype), mask=mask)


def add_forward(x: torch.Tensor, f: torch.Tensor, block: int = BLOCK, num_warps: int = NUM_WARPS):
    """Kernel only, on validated contiguous inputs of the same number of elements."""
    out = torch.empty_like(x)
    numel = x.numel()
    if numel:
        assert numel % 8 == 0
        _add_kernel[(triton.cdiv(numel, block),)](x, f, out, numel // 8, BLOCK=block,
                                                  EVEN=(numel % block == 0), num_warps=num_warps)
    return out


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
    T, _, C = _check_x("residual_post", x)
    x = x.contiguous()
    f = check_tensor("residual_post", f, "f", (T, C), x.dtype, x.device)
    return _ResidualPost.apply(x, f)
