"""layer_input's gradient goes to the fused boundary's backward instead of becoming an x gradient.

At a fused boundary of a chain (kernels/chain.py) `post_coeffs` makes x_next and the next site's
h_pre, and `apply_pre` makes layer_input = sum_i h_pre[i] x_next[i] from them. Left to autograd,
apply_pre's backward would read x_next for dh_pre and write an x gradient h_pre * g_li (nC per
token) that autograd then adds to the next post's x gradient in a pass of its own (2nC read, nC
written). post_coeffs' backward reads x_next anyway, so it takes g_li itself: dh_pre inside its
coefficient kernel, h_pre * g_li on chip inside its dx kernel; nothing of apply_pre's backward
reaches memory.
  - post_coeffs tags its x_next output with a link to (x_next, h_pre) (`attach`);
  - apply_pre given exactly that x_next and that h_pre claims it (`claim`; once per link);
  - apply_pre's backward stores g_li in the link and returns no gradients (`hand_over`), but only
    when autograd will run post_coeffs' backward in the same call; else it computes its own;
  - post_coeffs' backward takes it (`take`) on every path;
  - a caller that walks the backward itself may put g_li in the link (`link_of`) instead of
    differentiating layer_input, and must then run post_coeffs' backward in its next call
    (suite.workloads.recompute's mhc backward: there every input of the boundary is a leaf under
    torch.autograd.grad, where apply_pre's own hand-over stays off).
apply_pre's backward always runs first: post_coeffs' node consumes the gradients of x_next and h_pre
that apply_pre's node returns (None included). Anything that breaks the chain (another x or h_pre,
a second apply_pre, a backend without links) leaves both sides on the ordinary path, so a missing
link costs speed, never correctness.

The share of layer_input's gradient that reaches x_next and h_pre is added inside post_coeffs'
backward, after the point where autograd would hand x_next's or h_pre's own gradient to a caller.
So the link stays off when that gradient is asked for: x_next or h_pre retaining its gradient or
carrying a hook, or a torch.autograd.grad call that only captures post_coeffs' outputs (its
backward would not run; under torch.autograd.grad a boundary whose inputs are all leaves counts as
that, since autograd cannot say which leaves it was asked for). Not detected, and then wrong: torch.autograd.grad with x_next or h_pre
among its `inputs` together with an input upstream of them (autograd gives no way to see which
outputs of a node it captures); ask for those in two calls.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Optional

import torch

from kernels import site_link
from kernels.checks import check_boundary_inputs

_ATTR = "_hcbench_boundary_link"


class BoundaryLink:
    __slots__ = ("_x", "_h_pre", "_g", "_claimed", "__weakref__")

    def __init__(self, x: torch.Tensor, h_pre: torch.Tensor):
        self._x = weakref.ref(x)
        self._h_pre = weakref.ref(h_pre)
        self._g: Optional[torch.Tensor] = None
        self._claimed = False

    def put(self, g: torch.Tensor) -> None:
        self._g = g

    def take(self) -> Optional[torch.Tensor]:
        g, self._g = self._g, None
        return g


def attach(x_next: torch.Tensor, h_pre: torch.Tensor) -> BoundaryLink:
    """A new link for post_coeffs' outputs, carried by x_next."""
    link = BoundaryLink(x_next, h_pre)
    setattr(x_next, _ATTR, link)
    return link


def link_of(x_next: torch.Tensor) -> Optional[BoundaryLink]:
    """The link post_coeffs tagged x_next with, claimed or not (None when there is none): for a
    caller that hands layer_input's gradient over itself (suite.workloads.recompute's backprop)."""
    return getattr(x_next, _ATTR, None)


def claim(x: torch.Tensor, h_pre: torch.Tensor) -> Optional[BoundaryLink]:
    """The link of the post_coeffs that made this very x and h_pre, if no apply_pre has claimed it."""
    link = getattr(x, _ATTR, None)
    if link is None or link._claimed or link._x() is not x or link._h_pre() is not h_pre:
        return None
    if not (torch.is_grad_enabled() and x.requires_grad and h_pre.requires_grad):
        return None
    link._claimed = True
    return link


def _gradient_watched(t: Optional[torch.Tensor]) -> bool:
    return t is not None and (t.retains_grad or bool(getattr(t, "_backward_hooks", None)))


def hand_over(ctx, link: Optional[BoundaryLink], g_li: torch.Tensor) -> bool:
    """In apply_pre's backward (x its first input): gives g_li to the linked post_coeffs and
    returns True, or returns False when there is no link, autograd will not run post_coeffs'
    backward in this call, or x_next's or h_pre's own gradient is watched (then apply_pre must
    return its own gradients)."""
    if link is None or _gradient_watched(link._x()) or _gradient_watched(link._h_pre()):
        return False
    node = ctx.next_functions[0][0]
    # A node whose outputs are only captured (torch.autograd.grad(..., inputs=[x_next])) counts
    # as executed too; its backward runs only if some input of it needs a gradient.
    if node is None or not _will_run(node) or not any(
            child is not None and _will_run(child) for child, _ in node.next_functions):
        return False
    link.put(g_li)
    return True


def _will_run(node) -> bool:
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:
        # a leaf's accumulator inside torch.autograd.grad, where autograd cannot tell whether the
        # leaf is among the inputs: not counted (a boundary whose inputs are all leaves then keeps
        # layer_input's own backward under autograd.grad; .backward() and a boundary fed by
        # another op link as usual)
        return False


def boundary_function(op: str, forward: Callable, backward: Callable, supports: Callable,
                      check_device: Callable,
                      on_device: Callable = lambda device: contextlib.nullcontext()) -> Callable:
    """A backend's fused boundary as one differentiable call
        run(x, f, h_post, h_res, phi, b, alpha, iters, cfg) -> (x_next, h_pre, h_post, h_res),
    its inputs checked (kernels.checks.check_boundary_inputs with the backend's `supports` and
    `check_device`), with this module's link and the site link wired in the same way for every
    backend:
      forward(x, f, h_post, h_res, phi, b, alpha, iters, save, cfg)
          -> (x_next, h_pre, h_post_n, h_res_n, m, r)   (m, r: what the backward needs of the norm)
      backward(saved, g_x, g_hpre, g_hpost, g_hres, g_li, needs, iters, cfg)
          -> the gradients of x, f, h_post, h_res, phi, b, alpha (None where not needed),
          called with at least one token and g_li in x's dtype
    on_device(device): the context the backend's kernels launch in."""

    class PostCoeffsFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, f, h_post, h_res, phi, b, alpha, iters, cfg, grad_mode, site, holder):
            # (forward runs with grad mode off: the caller's grad mode comes in as an argument)
            save = grad_mode and any(ctx.needs_input_grad[:7])
            with on_device(x.device):
                x_next, h_pre, h_post_n, h_res_n, m, r = forward(x, f, h_post, h_res, phi, b, alpha,
                                                                 iters, save, cfg)
            ctx.set_materialize_grads(False)
            ctx.iters, ctx.cfg, ctx.site, ctx.holder = iters, cfg, site, holder
            if save:
                ctx.save_for_backward(x, f, h_post, h_res, phi, b, alpha, x_next, m, r, h_pre)
            return x_next, h_pre, h_post_n, h_res_n

        @staticmethod
        def backward(ctx, g_x, g_hpre, g_hpost, g_hres):
            # layer_input's gradient, when the linked layer_input handed it over
            link = ctx.holder[0]
            g_li = link.take() if link is not None else None
            needs = tuple(ctx.needs_input_grad[:7])
            if g_x is None and g_hpre is None and g_hpost is None and g_hres is None and g_li is None:
                return (None,) * 12
            saved = ctx.saved_tensors
            x = saved[0]
            if x.shape[0] == 0:     # no tokens: zero gradients, no launch
                dx, df, dhp, dhr, dphi, db, dalpha = (torch.zeros_like(t) if nd else None
                                                      for t, nd in zip(saved[:7], needs))
            else:
                g_li = g_li.to(x.dtype).contiguous() if g_li is not None else None
                with on_device(g_x.device if g_x is not None else x.device):
                    dx, df, dhp, dhr, dphi, db, dalpha = backward(
                        saved, g_x, g_hpre, g_hpost, g_hres, g_li, needs, ctx.iters, ctx.cfg)
            dx = site_link.hand_over(ctx, ctx.site, dx, 3)   # to a linked mhc_pre's backward, if any
            return dx, df, dhp, dhr, dphi, db, dalpha, None, None, None, None, None

    def run(x, f, h_post, h_res, phi, b, alpha, iters, cfg):
        site = site_link.claim(h_res, x)
        x, f, h_post, h_res, phi, b, alpha = check_boundary_inputs(
            op, x, f, h_post, h_res, phi, b, alpha, iters, supports, check_device)
        holder = [None]     # filled with the link once x_next exists
        out = PostCoeffsFn.apply(x, f, h_post, h_res, phi, b, alpha, iters, cfg,
                                 torch.is_grad_enabled(), site, holder)
        if torch.is_grad_enabled() and out[0].requires_grad:
            holder[0] = attach(out[0], out[1])
        return out

    return run
