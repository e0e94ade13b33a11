"""F_pre's apply, shared by the mHC and HC forward paths that compute the coefficients first and
read x again for the layer input: layer_input[t] = sum_i h_pre[t, i] x[t, i] (fp32 accumulation,
output in x's dtype). Reads nC, writes C per token: a pure streaming kernel, so it runs near the
copy rate (TileLang's equivalent measured at the copy rate on an H100)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def apply_pre_kernel(x_ptr, hpre_ptr, li_ptr, T, C,
                     N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    tmask = tok < T
    t64 = tok.to(tl.int64)
    lm = tmask[:, None] & (c < C)[None, :]
    li = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(N):
        h_i = tl.load(hpre_ptr + t64 * N + i, mask=tmask, other=0.0)
        xt = tl.load(x_ptr + t64[:, None] * (N * C) + i * C + c[None, :], mask=lm, other=0.0)
        li += h_i[:, None] * xt.to(tl.float32)
    tl.store(li_ptr + t64[:, None] * C + c[None, :], li.to(li_ptr.dtype.element_ty), mask=lm)


def apply_pre(x: torch.Tensor, h_pre: torch.Tensor, li: torch.Tensor, bt: int, bc: int) -> None:
    """x [T, n, C] contiguous, h_pre [T, n] fp32 -> li [T, C] (written in place)."""
    T, n, C = x.shape
    apply_pre_kernel[(triton.cdiv(T, bt), triton.cdiv(C, bc))](
        x, h_pre, li, T, C, N=n, BT=bt, BC=bc, num_warps=4)
