"""Input checks every fused backend shares: wrong input fails loudly, never silently wrong.

A backend passes its own `supports(n, C, dtype) -> reason | None` and `check_device(op, t, name)`,
since which shapes and devices it takes differ (Triton's interpreter runs on the CPU, TileLang's
"c" target takes no bf16); the messages and the order of the checks are the same for all.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def check_state(op: str, x: torch.Tensor, name: str, supports: Callable,
                check_device: Callable) -> tuple[int, int, int]:
    """Validates the residual state [T, n, C]; returns (T, n, C)."""
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be [T, n, C], got shape {list(x.shape)}")
    T, n, C = x.shape
    reason = supports(n, C, x.dtype)
    if reason:
        raise ValueError(f"{op}: {reason} ({name} shape {list(x.shape)}, dtype {x.dtype})")
    check_device(op, x, name)
    return T, n, C


def check_tensor(op: str, t: torch.Tensor, name: str, shape: tuple, dtype, device) -> torch.Tensor:
    """Checks shape, dtype and device; returns a contiguous tensor (copying if it has to)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, x is on {device}")
    return t.contiguous()


def any_device(op, t, name):
    """A peer runs where its library puts it; the inputs only have to agree with x's device."""


def check_mhc_inputs(op: str, x: torch.Tensor, phi, b, alpha, sinkhorn_iters: int,
                     supports: Callable) -> tuple[int, int, int]:
    """A peer's mhc inputs (x [T, n, C]; phi [nC, n*n + 2n], b [n*n + 2n], alpha [3], fp32, on
    x's device; at least one Sinkhorn iteration); returns (T, n, C)."""
    T, n, C = check_state(op, x, "x", supports, any_device)
    k = n * n + 2 * n
    for name, t, shape in (("phi", phi, (n * C, k)), ("b", b, (k,)), ("alpha", alpha, (3,))):
        check_tensor(op, t, name, shape, torch.float32, x.device)
    if int(sinkhorn_iters) < 1:
        raise ValueError(f"{op}: sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
    return T, n, C


def check_post_inputs(op: str, x: torch.Tensor, f, h_post, h_res,
                      supports: Callable) -> tuple[int, int, int]:
    """A peer's post inputs (x [T, n, C]; f [T, C] in x's dtype; h_post [T, n] and h_res
    [T, n, n] fp32; all on x's device); returns (T, n, C)."""
    T, n, C = check_state(op, x, "x", supports, any_device)
    for name, t, shape, dtype in (("f", f, (T, C), x.dtype), ("h_post", h_post, (T, n), torch.float32),
                                  ("h_res", h_res, (T, n, n), torch.float32)):
        check_tensor(op, t, name, shape, dtype, x.device)
    return T, n, C


def check_boundary_inputs(op: str, x: torch.Tensor, f, h_post, h_res, phi, b, alpha,
                          sinkhorn_iters, supports: Callable, check_device: Callable) -> tuple:
    """A fused boundary's inputs (post of one site with the next site's mHC coefficients: x
    [T, n, C], f [T, C] in x's dtype; h_post [T, n], h_res [T, n, n], phi [nC, n*n + 2n],
    b [n*n + 2n], alpha [3] fp32; all on x's device; an int number of Sinkhorn iterations >= 1).
    Returns (x, f, h_post, h_res, phi, b, alpha), each contiguous."""
    T, n, C = check_state(op, x, "x", supports, check_device)
    k = n * n + 2 * n
    out = [x.contiguous()]
    for name, t, shape, dtype in (("f", f, (T, C), x.dtype), ("h_post", h_post, (T, n), torch.float32),
                                  ("h_res", h_res, (T, n, n), torch.float32),
                                  ("phi", phi, (n * C, k), torch.float32), ("b", b, (k,), torch.float32),
                                  ("alpha", alpha, (3,), torch.float32)):
        out.append(check_tensor(op, t, name, shape, dtype, x.device))
    if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 1:
        raise ValueError(f"{op}: sinkhorn_iters must be an int >= 1, got {sinkhorn_iters!r}")
    return tuple(out)
