"""One x gradient per site: F_post,res hands its dx to F_pre's backward instead of to autograd.

In a site, x feeds both F_pre (through `pre`) and F_post,res (through `post`), so autograd adds
their two x gradients in a separate kernel: it reads 2nC and writes nC elements per token, about
as long as the post forward itself. Every backend's pre backward already writes dx in one pass
over x, so it can add the post's dx there for nC more bytes read.

How, without changing the kernel API (pre and post stay separate, differentiable calls):
  - a fused `pre` creates a SiteLink for its x and tags its h_res output with it (`attach`);
  - a fused `post` given that h_res and the same x object claims the link (`claim`; once per
    link, so a second post on the same h_res falls back to autograd's add);
  - post's backward stores dx in the link (`put`) and returns no x gradient;
  - pre's backward takes it (`take`) and adds its own dx into it in place.
Post's backward always runs first: pre's backward needs the h_post / h_res gradients that post's
backward produces. Post hands dx over only when the autograd engine will run pre's backward in the
same backward call (`hand_over`): a call that differentiates for f alone runs post's backward but
not pre's, and must neither lose dx nor leave it for a later call. A pre that attaches links must call `take` on every backward path that
returns a gradient for x, or post's share of dx would be lost. Anything that breaks the chain
(a detached or converted h_res, another x, a backend without links) leaves both sides on the
ordinary path, so a missing link costs speed, never correctness.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

_ATTR = "_hcbench_site_link"


class SiteLink:
    __slots__ = ("_x", "_dx", "_claimed", "__weakref__")

    def __init__(self, x: torch.Tensor):
        self._x = weakref.ref(x)
        self._dx: Optional[torch.Tensor] = None
        self._claimed = False

    def put(self, dx: torch.Tensor) -> None:
        self._dx = dx

    def take(self) -> Optional[torch.Tensor]:
        dx, self._dx = self._dx, None
        return dx


def attach(h_res: torch.Tensor, x: torch.Tensor) -> SiteLink:
    """A new link for pre's input x, carried by pre's h_res output."""
    link = SiteLink(x)
    setattr(h_res, _ATTR, link)
    return link


def link_of(h_res: torch.Tensor) -> Optional[SiteLink]:
    """The link a fused pre tagged its h_res with, claimed or not (None when there is none):
    for a caller that hands post's dx over itself (suite.workloads.recompute's replay)."""
    return getattr(h_res, _ATTR, None)


def claim(h_res: torch.Tensor, x: torch.Tensor) -> Optional[SiteLink]:
    """The link of the pre that made h_res from this very x, if no post has claimed it yet."""
    link = getattr(h_res, _ATTR, None)
    if link is None or link._claimed or link._x() is not x:
        return None
    if not (x.requires_grad and h_res.requires_grad and torch.is_grad_enabled()):
        return None
    link._claimed = True
    return link


def accumulator(link: Optional[SiteLink], x: torch.Tensor) -> Optional[torch.Tensor]:
    """Post's dx from the link, checked to be what an in-place accumulating kernel can use."""
    dx = link.take() if link is not None else None
    if dx is None:
        return None
    if dx.shape != x.shape or dx.dtype != x.dtype or dx.device != x.device or not dx.is_contiguous():
        dx = dx.to(dtype=x.dtype).contiguous()   # (never the case for this suite's posts)
    return dx


def hand_over(ctx, link: Optional[SiteLink], dx: Optional[torch.Tensor],
              h_res_input: int) -> Optional[torch.Tensor]:
    """In post's backward: gives dx to the linked pre and returns None, or returns dx unchanged
    when there is no link or pre's backward will not run in this backward call. h_res_input: the
    position of h_res among the Function's inputs (its producer is pre's autograd node)."""
    if link is None or dx is None:
        return dx
    node = ctx.next_functions[h_res_input][0]
    if node is None or not torch._C._will_engine_execute_node(node):
        return dx
    link.put(dx)
    return None
