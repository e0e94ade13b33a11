"""What one case computes: its seeded random inputs, and one call of the op (forward, or forward
and backward with random upstream gradients). The check and the timer both call `run`, so what is
timed is exactly what was checked.

Inputs are never zeros: f and upstream gradients ~ N(0, 1) in the case dtype; x ~ N(0, 1) scaled
per token and stream by exp(N(0, 1)), so the RMS norms differ from 1 and a kernel that skipped
them would fail the check; parameters from kernels.reference.random_params (logits of order 1);
for op=post, h_post = 2*sigmoid(N(0,1)) and h_res = Sinkhorn(N(0,1)) in fp32.
op=chain (kernels/chain.py) has one fresh f and one parameter set per site (f0, phi0, b0, ...),
and its outputs are every site's layer_input and the last x_next.
The site op also returns its coefficients h_post and h_res, so the check compares them at the
fp32 tolerance: in bf16 state outputs a truncated Sinkhorn would hide under rounding.
"""
from __future__ import annotations

import torch

import kernels
from kernels import Ops, reference
from kernels.chain import chain
from suite.core.dtypes import TORCH_DTYPES
from suite.core.scenario import Case

PARAM_NAMES = {"mhc": ("phi", "b", "alpha"), "hc": ("w", "b", "s"), "residual": ()}
OUTPUTS = {
    "site": ("layer_input", "h_post", "h_res", "x_next"),
    "pre": ("layer_input", "h_post", "h_res"),
    "coeffs": ("h_pre", "h_post", "h_res"),
    "post": ("x_next",),
}


def make_inputs(case: Case, device: str, seed: int, T: int | None = None) -> dict:
    """Named leaf tensors (requiring grad in fwd+bwd) and, under 'grad_out', upstream gradients."""
    T = T or case.T
    n, C = case.n, case.C
    dtype = TORCH_DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    scale = torch.exp(torch.randn(T, n, 1, generator=gen, device=device, dtype=torch.float32))
    inputs = {"x": (torch.randn(T, n, C, generator=gen, device=device) * scale).to(dtype)}
    layout = _state_layout(case)
    if layout is not None:       # the backend's own memory layout, converted outside any timing
        inputs["x"] = layout(inputs["x"])
    if case.op == "chain":
        for l in range(case.sites):
            inputs[f"f{l}"] = randn(T, C)
            params = reference.random_params(case.method, n, C, cpu_gen, device)
            inputs.update((f"{name}{l}", t) for name, t in zip(PARAM_NAMES[case.method], params))
    elif case.op == "post":
        inputs["f"] = randn(T, C)
        if case.method != "residual":
            inputs["h_post"] = 2 * torch.sigmoid(randn(T, n, dt=torch.float32))
            inputs["h_res"] = reference.sinkhorn(randn(T, n, n, dt=torch.float32))
    else:
        if case.op == "site":
            inputs["f"] = randn(T, C)
        params = reference.random_params(case.method, n, C, cpu_gen, device)
        inputs.update(zip(PARAM_NAMES[case.method], params))
    backward = case.mode == "fwd+bwd"
    for t in inputs.values():
        t.requires_grad_(backward)
    if backward:
        shapes = {"layer_input": (T, C), "x_next": (T, n, C)}
        small = {"h_pre": (T, n), "h_post": (T, n), "h_res": (T, n, n)}
        grad_out = {}
        if case.op == "chain":
            grad_out.update((f"layer_input{l}", randn(T, C)) for l in range(case.sites))
            grad_out["x_next"] = randn(T, n, C)
        for name in OUTPUTS.get(case.op, ()):
            if case.op == "site" and name not in shapes:
                continue            # the site's coefficients are internal: F sees only its outputs
            if name in shapes:
                grad_out[name] = randn(*shapes[name])
            elif case.method != "residual":
                grad_out[name] = randn(*small[name], dt=torch.float32)
        inputs["grad_out"] = grad_out
    return inputs


def _state_layout(case: Case):
    """The case's backend's state layout, where it declares one (a backend that cannot load here
    is skipped before its inputs are made; `auto` and the reference keep [T, n, C])."""
    try:
        return kernels.get(case.method, case.backend).state_layout
    except Exception:   # noqa: BLE001 - any load failure means the plain layout
        return None


def upcast(inputs: dict, dtype=torch.float64) -> dict:
    """Copies of the same inputs in fp64 (the oracle's inputs)."""
    out = {}
    for name, t in inputs.items():
        if name == "grad_out":
            out[name] = {k: g.detach().to(dtype) for k, g in t.items()}
        else:
            out[name] = t.detach().to(dtype).requires_grad_(t.requires_grad)
    return out


def run(ops: Ops, case: Case, inputs: dict, stored_dtype: torch.dtype | None = None) -> dict:
    """One call: the op's outputs, plus d<input> gradients in fwd+bwd mode. stored_dtype: a chain's
    states between sites rounded to it, as a backend stores them (the reference's declared
    rounding, kernels/chain.py)."""
    x = inputs["x"]
    params = [inputs[p] for p in PARAM_NAMES[case.method] if p in inputs]
    opts = {"sinkhorn_iters": case.sinkhorn_iters} if case.method == "mhc" else {}
    if case.op == "chain":
        L = case.sites
        per_site = [tuple(inputs[f"{name}{l}"] for name in PARAM_NAMES[case.method])
                    for l in range(L)]
        layer_inputs, x_last = chain(ops, x, [inputs[f"f{l}"] for l in range(L)], per_site,
                                     stored_dtype=stored_dtype, **opts)
        outs = {f"layer_input{l}": li for l, li in enumerate(layer_inputs)}
        outs["x_next"] = x_last
    elif case.op == "coeffs":
        outs = dict(zip(OUTPUTS["coeffs"], ops.coeffs(x, *params, **opts)))
    elif case.op == "pre":
        outs = dict(zip(OUTPUTS["pre"], ops.pre(x, *params, **opts)))
    elif case.op == "post":
        outs = {"x_next": ops.post(x, inputs["f"], inputs.get("h_post"), inputs.get("h_res"))}
    else:
        layer_input, h_post, h_res = ops.pre(x, *params, **opts)
        outs = {"layer_input": layer_input, "h_post": h_post, "h_res": h_res,
                "x_next": ops.post(x, inputs["f"], h_post, h_res)}
    outs = {k: v for k, v in outs.items() if v is not None}
    if case.mode != "fwd+bwd":
        return outs
    leaves = {k: v for k, v in inputs.items() if k != "grad_out"}
    names = [k for k in outs if k in inputs["grad_out"]]
    grads = torch.autograd.grad([outs[k] for k in names], list(leaves.values()),
                                [inputs["grad_out"][k] for k in names], allow_unused=True)
    for name, g in zip(leaves, grads):
        if g is not None:
            outs["d_" + name] = g
    return outs
