"""L consecutive sites of one method with F absent: what a model's residual stream goes through
between its sublayers, for timing and checking the boundaries between sites.

    chain(ops, x0, fs, params, sinkhorn_iters=20, stored_dtype=None) -> (layer_inputs, x_L)

computes, for l = 0 .. L-1 (MATH.md; x0 [T, n, C], fs[l] [T, C], params[l] site l's parameters):

    layer_inputs[l]        = sum_i h_pre_l[i] x_l[i]                          (F_pre of site l)
    x_{l+1}[i]             = sum_j h_res_l[i, j] x_l[j] + h_post_l[i] fs[l]  (F_post,res of site l)

with (h_pre_l, h_post_l, h_res_l) the coefficients of site l computed from x_l and params[l].
F is absent: fs[l] is a fresh input, not F(layer_inputs[l]), so layer_inputs and x_L are
separate outputs and every gradient (x0, each fs[l], each site's parameters) flows through the
coefficients and the mixing alone. Returns (layer_inputs: list of L [T, C], x_L [T, n, C]).

How each backend runs it, with its own ops (so that backends compare fairly):
  - site 0: ops.pre(x0, *params[0]) gives layer_inputs[0] and the post coefficients;
  - each boundary l -> l+1: ops.post_coeffs (F_post,res of site l fused with the coefficients
    of site l+1) and ops.apply_pre (layer_input of site l+1) when the backend has both, else
    ops.post then ops.pre;
  - site L-1 ends with ops.post.
mhc passes sinkhorn_iters to its ops; hc and residual take no options. Differentiable whenever
the ops are.

stored_dtype (for the fp64 reference only): each state x_{l+1} between sites, and its gradient
in the backward, take the values they have once stored in that dtype (rounded to nearest), as in
a model that keeps its residual stream and its gradient in bf16. The correctness gate runs the
reference both ways to measure what the state dtype alone does to each output (suite/run/check.py).
"""
from __future__ import annotations

from typing import Sequence

import torch


class _Stored(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).to(grad.dtype), None


def as_stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to `dtype` and back, its gradient rounded the same way in the backward."""
    return _Stored.apply(x, dtype)


def chain(ops, x0: torch.Tensor, fs: Sequence[torch.Tensor], params: Sequence[tuple],
          sinkhorn_iters: int = 20, stored_dtype: torch.dtype | None = None):
    L = len(fs)
    if L < 1 or len(params) != L:
        raise ValueError(f"chain: needs one f and one parameter tuple per site, got {L} fs and "
                         f"{len(params)} parameter tuples")
    opts = {"sinkhorn_iters": sinkhorn_iters} if ops.method == "mhc" else {}
    # the rounding sits between post and pre, so a reference that rounds runs them apart (the
    # same function as its fused boundary)
    fused = ops.post_coeffs is not None and ops.apply_pre is not None and stored_dtype is None
    li, h_post, h_res = ops.pre(x0, *params[0], **opts)
    layer_inputs = [li]
    x = x0
    for l in range(L - 1):
        if fused:
            x, h_pre, h_post, h_res = ops.post_coeffs(x, fs[l], h_post, h_res, *params[l + 1], **opts)
            li = ops.apply_pre(x, h_pre)
        else:
            x = ops.post(x, fs[l], h_post, h_res)
            if stored_dtype is not None:
                x = as_stored(x, stored_dtype)
            li, h_post, h_res = ops.pre(x, *params[l + 1], **opts)
        layer_inputs.append(li)
    return layer_inputs, ops.post(x, fs[L - 1], h_post, h_res)
