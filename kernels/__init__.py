"""The one registry of backends: `kernels.get(method, backend)` returns an `Ops`.

Every backend implements, per method (see reference.py for shapes and parameters):
    ops.coeffs(x, *params, **opts) -> (h_pre [T,n], h_post [T,n], h_res [T,n,n])   (not for residual)
    ops.pre(x, *params, **opts)    -> (layer_input [T,C], h_post, h_res)
    ops.post(x, f, h_post, h_res)  -> x_next [T,n,C]
and optionally, for a chain of sites (kernels/chain.py), the two halves of a fused boundary:
    ops.post_coeffs(x, f, h_post, h_res, *next_params, **opts)
                                   -> (x_next, h_pre, h_post, h_res) of the NEXT site
    ops.apply_pre(x, h_pre)        -> layer_input [T,C]
A backend without them runs a chain as post, then pre.
mhc takes opts sinkhorn_iters; hc and residual take none. All are differentiable.

Backends are loaded lazily so that a missing library (triton, tilelang, a peer) only skips its
own cases: `unavailable_reason` says why a backend cannot run on a device, or None.

Backend name `auto` (whole-model scopes only) is not a backend of its own: it stands for the
fastest of `candidates(...)` per op at a case's shapes, chosen by measurement in the suite
(suite.workloads.fastest) and put together with `compose`.
"""
from __future__ import annotations

import dataclasses

import importlib
import importlib.util
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

METHODS = ("residual", "hc", "mhc")
AUTO = "auto"


@dataclass(frozen=True)
class Ops:
    method: str
    backend: str
    pre: Callable
    post: Callable
    coeffs: Optional[Callable] = None
    # post of one site fused with the coefficients of the next (params of the next site), and
    # layer_input from x and h_pre: together they replace post + pre at a boundary of a chain
    post_coeffs: Optional[Callable] = None
    apply_pre: Optional[Callable] = None
    # Returns None when (n, C, dtype) is supported, else the reason it is not.
    supports: Callable = field(default=lambda n, C, dtype: None)
    # A peer that computes a documented variant of MATH.md (e.g. another Sinkhorn order) names it
    # here and gives the variant's reference; the gate then checks it against that, exactly as
    # strictly, and every record says which reference it was checked against.
    deviation: str = ""
    reference: Optional["Ops"] = None
    # x [T, n, C] -> the same values in the memory layout the backend keeps its state in (e.g.
    # streams innermost). Applied when a case's inputs are made, before the check and the timing,
    # so a layout conversion is never inside a timed call.
    state_layout: Optional[Callable] = None


@dataclass(frozen=True)
class Backend:
    name: str
    module: str                       # exposes OPS: {method: Ops}
    devices: tuple = ("cpu", "cuda")
    requires: tuple = ()              # importable modules it needs
    pip_name: str = ""                # what to install when a requirement is missing
    description: str = ""
    # "module:function" called with the device type after loading; returns why the backend
    # cannot run here (e.g. its compiler cannot build for this GPU), or None
    probe: str = ""
    # compiles again for each token count (suite.run.prewarm also compiles the correctness check's)
    compiles_per_T: bool = False


BACKENDS: dict[str, Backend] = {
    b.name: b for b in (
        Backend("torch", "kernels.eager", description="the reference in eager PyTorch"),
        Backend("compile", "kernels.compiled", description="torch.compile of the reference",
                compiles_per_T=True),
        Backend("triton", "kernels.triton", devices=("cuda",), requires=("triton",),
                pip_name="triton", description="this suite's fused Triton kernels"),
        Backend("liger", "kernels.liger", devices=("cuda",), requires=("liger_kernel", "triton"),
                pip_name="liger-kernel", description="Liger-Kernel's Triton mHC (peer, mhc only)",
                compiles_per_T=True),
        Backend("te", "kernels.te", devices=("cuda",), requires=("transformer_engine", "triton"),
                pip_name="transformer-engine==2.20.2",
                description="Transformer Engine's Triton mHC (peer, mhc n = 4 only)"),
        Backend("tilelang", "kernels.tilelang", devices=("cuda",), requires=("tilelang",),
                pip_name="tilelang==0.1.15", description="this suite's TileLang kernels",
                probe="kernels.tilelang.probe:unavailable"),
        Backend("unfused", "kernels.unfused",
                description="plain bf16 PyTorch, one op per step (the paper's Table 2 design)"),
    )
}


def unavailable_reason(method: str, backend: str, device: str) -> Optional[str]:
    """Why `backend` cannot run `method` on `device` on this machine, or None if it can."""
    spec = BACKENDS[backend]
    if device not in spec.devices:
        return f"backend {backend} needs a {' or '.join(spec.devices)} device, case asks for {device}"
    for mod in spec.requires:
        if importlib.util.find_spec(mod) is None:
            return f"backend {backend} needs {spec.pip_name or mod}, which is not installed"
    if backend == "compile" and device == "cpu" and not (shutil.which("cc") or shutil.which("gcc")):
        return "torch.compile on the CPU needs a C compiler (cc), none found"
    try:
        ops = _load(backend)
    except Exception as exc:  # a broken optional install must not stop the sweep
        return f"backend {backend} failed to load: {type(exc).__name__}: {exc}"
    if method not in ops:
        return f"backend {backend} does not implement method {method}"
    if spec.probe:
        mod, _, fn = spec.probe.partition(":")
        try:
            return getattr(importlib.import_module(mod), fn)(device)
        except Exception as exc:  # a broken probe skips its backend, never the sweep
            return f"backend {backend} probe failed: {type(exc).__name__}: {exc}"
    return None


def get(method: str, backend: str) -> Ops:
    if backend not in BACKENDS:
        raise KeyError(f"unknown backend {backend!r}; registered: {', '.join(BACKENDS)}")
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    ops = _load(backend)
    if method not in ops:
        raise KeyError(f"backend {backend} does not implement method {method}")
    return ops[method]


_LOADED: dict[str, dict] = {}


def _load(backend: str) -> dict:
    if backend not in _LOADED:
        _LOADED[backend] = importlib.import_module(BACKENDS[backend].module).OPS
    return _LOADED[backend]


def candidates(method: str, device: str) -> list[str]:
    """Backends `auto` chooses among: those that compute MATH.md itself (no documented
    deviation), compile once per shape rather than per token count, and can run here."""
    out = []
    for name, spec in BACKENDS.items():
        if spec.compiles_per_T or unavailable_reason(method, name, device):
            continue
        ops = get(method, name)
        if ops.deviation or ops.pre is None:
            continue
        out.append(name)
    return out


def compose(method: str, pre_backend: str, post_backend: str, boundary: str = "fused") -> Ops:
    """One Ops whose pre comes from one backend and post from another (same tensor contract), and
    whose boundaries between adjacent sites (post_coeffs, apply_pre) are:
      "fused"            the fused kernels of pre's backend when post's is the same one (a mixed
                         pair has none: they belong to neither alone);
      "fused:<backend>"  that backend's fused kernels, whatever pre and post are (backend auto
                         times them against the pair's post and pre apart);
      "unfused"          none: post, then pre."""
    kind, _, source = boundary.partition(":")
    if kind not in ("fused", "unfused") or (kind == "unfused" and source) or (":" in boundary and not source):
        raise ValueError(f"compose: boundary is 'fused', 'fused:<backend>' or 'unfused', not {boundary!r}")
    pre, post = get(method, pre_backend), get(method, post_backend)
    if pre_backend == post_backend:
        ops = pre
    else:
        ops = Ops(method, f"{pre_backend}+{post_backend}", pre=pre.pre, post=post.post,
                  coeffs=pre.coeffs,
                  supports=lambda n, C, dtype: pre.supports(n, C, dtype) or post.supports(n, C, dtype))
    if kind == "unfused" or (not source and pre_backend != post_backend):
        if ops.post_coeffs is None:
            return ops
        return dataclasses.replace(ops, post_coeffs=None, apply_pre=None)
    if not source or source == pre_backend == post_backend:
        return ops
    src = get(method, source)
    if src.post_coeffs is None or src.apply_pre is None:
        raise ValueError(f"compose: backend {source} has no fused boundary for {method}")
    inner = ops.supports
    return dataclasses.replace(
        ops, backend=f"{ops.backend}, boundary {source}", post_coeffs=src.post_coeffs,
        apply_pre=src.apply_pre,
        supports=lambda n, C, dtype: inner(n, C, dtype) or src.supports(n, C, dtype))
