"""The correctness check of a fused boundary (post_coeffs + apply_pre) and of a chain of sites
(kernels/chain.py) against the fp64 reference: every output and every gradient.

The reference runs on the upcast inputs, with one declared rounding: the state x_{l+1} that a
boundary stores in x's dtype (bf16 / fp16) enters the next site's coefficients with the value
stored, the gradient passing straight through (as kernels/triton/mhc_pre.phi_as_used does for the
rounding of phi). Without it the check would judge the state dtype rather than the kernel:
computed exactly in fp64, the function with x_{l+1} rounded to nearest in bf16 (what a perfect
kernel computes) differs from the unrounded fp64 chain in dalpha or db by more than the bf16
tolerance in 3 of 30 seeded draws at n = 1, 2, 3 or 4, T = 37, C = 24 (fp16: up to 1 of 30),
and still 3 of 8 at n = 4, C = 256, T = 1024: those sums over tokens cancel and amplify the
state's rounding. So each stored state is checked on its own, against the reference's post of
the state before it as stored; a fused boundary's outputs also against the unrounded fp64 oracle
(`plain`, one rounding deep: far inside the tolerance).

That declared rounding is not the whole dtype effect. An unfused backend also stores each state's
gradient in x's dtype, and the stored state moves the next site's coefficients by amounts the
sums over tokens amplify. At n = 4, C = 64, bf16, 3 sites, the eager reference itself (fp32 on
bf16 inputs) missed the bf16 tolerance on dalpha[0] in 2 of 7 seeded draws at T = 37 (1.4e-2,
1.6e-2) and 1 of 7 at T = 2048 (1.7e-1), and Triton's fused chain in 1 of 2 at T = 37 (1.1e-2).
So a chain's outputs and gradients are held, as by the suite's gate (suite/run/check.py), to the
larger of the dtype's tolerance and DTYPE_EFFECT_FACTOR times what storing the states and their
gradients in the dtype alone does to the fp64 reference (kernels/chain.py stored_dtype); the
stored states x[1] .. x[L-1] keep the dtype's tolerance. That widening measures one rounding of
the states, and a backend's own rounding can land further: in those 21 draws the eager reference
still missed it twice (1.64e-2 against 1.57e-2 at T = 37; 1.68e-1 against 1.44e-1 at T = 2048).
"""
from __future__ import annotations

import dataclasses

import torch

import kernels
from kernels import reference as ref
from kernels.chain import chain
from suite.core.tolerance import rel_err, tolerance
from suite.run.check import DTYPE_EFFECT_FACTOR

F64 = torch.float64


def as_stored(exact: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """exact (fp64, differentiable) with the value a kernel stored, the gradient straight through."""
    return exact + (stored.detach().to(exact.dtype) - exact).detach()


def post_inputs(n, C, T, dtype, device, g):
    """x, f, h_post, h_res of a site's post and the next site's phi, b, alpha (never zeros)."""
    x = torch.randn(T, n, C, generator=g).to(dtype)
    f = torch.randn(T, C, generator=g).to(dtype)
    h_post = 2 * torch.sigmoid(torch.randn(T, n, generator=g))
    h_res = ref.sinkhorn(torch.randn(T, n, n, generator=g))
    return [t.to(device) for t in (x, f, h_post, h_res, *ref.random_params("mhc", n, C, g))]


def _upstream(outs, g):
    return [torch.randn(o.shape, generator=g).to(o.dtype).to(o.device) for o in outs]


def _errors(names, got, want):
    return {nm: rel_err(a, b) for nm, a, b in zip(names, got, want)}


def failures(errs: dict, dtype, tols: dict | None = None) -> dict:
    """The errors past their tolerance: tols[name] where given (check_chain's), else the dtype's."""
    tols = tols or {}
    return {k: f"{v:.2e}" for k, v in errs.items() if not v <= tols.get(k, tolerance(dtype))}


def check_boundary(post_coeffs, apply_pre, inputs, g, iters=20, use=("x_next", "h_post", "h_res",
                                                                       "layer_input"),
                   needs=(True,) * 7):
    """Runs post_coeffs (+ apply_pre for layer_input) and the fp64 reference on the same inputs
    with the same upstream gradients on the outputs named in `use` (of x_next, h_pre, h_post,
    h_res, layer_input); returns {name: rel_err} for every output and the gradient of every input
    that `needs` one (the others must get none)."""
    names_in = ("dx", "df", "dh_post", "dh_res", "dphi", "db", "dalpha")
    leaves = [t.clone().requires_grad_(nd) for t, nd in zip(inputs, needs)]
    out = list(post_coeffs(*leaves, sinkhorn_iters=iters))
    out.append(apply_pre(out[0], out[1]))
    leaves64 = [t.detach().to(F64).requires_grad_() for t in inputs]
    x_next = as_stored(ref.post(*leaves64[:4]), out[0])
    out64 = [x_next, *ref.mhc_coeffs(x_next, *leaves64[4:], sinkhorn_iters=iters)]
    out64.append(ref.apply_pre(out64[0], out64[1]))
    plain = list(ref.mhc_post_coeffs(*(t.detach().to(F64) for t in inputs), sinkhorn_iters=iters))
    plain.append(ref.apply_pre(plain[0], plain[1]))
    names_out = ("x_next", "h_pre", "h_post", "h_res", "layer_input")
    errs = _errors(names_out, out, out64)
    errs.update(_errors([f"{nm} (plain)" for nm in names_out], out, plain))
    ups = _upstream(out, g)
    sel = [names_out.index(u) for u in use]
    torch.autograd.backward([out[i] for i in sel], [ups[i] for i in sel])
    torch.autograd.backward([out64[i] for i in sel], [ups[i].to(F64) for i in sel])
    for nm, a, b, nd in zip(names_in, leaves, leaves64, needs):
        if nd:
            assert a.grad is not None, nm
            errs[nm] = rel_err(a.grad, b.grad)
        else:
            assert a.grad is None, nm
    return errs


def chain_inputs(n, C, T, L, dtype, device, g):
    x0 = torch.randn(T, n, C, generator=g).to(dtype).to(device)
    fs = [torch.randn(T, C, generator=g).to(dtype).to(device) for _ in range(L)]
    params = [tuple(p.to(device) for p in ref.random_params("mhc", n, C, g)) for _ in range(L)]
    return x0, fs, params


def _recording(ops, states):
    """ops whose boundaries append the state they store to `states` (post_coeffs' x_next, or
    post's output where the backend runs its boundaries as post then pre)."""
    def rec(fn, first):
        def wrapper(*a, **k):
            out = fn(*a, **k)
            states.append((out[0] if first else out).detach())
            return out
        return wrapper
    kw = {"post": rec(ops.post, False)}
    if ops.post_coeffs is not None:
        kw["post_coeffs"] = rec(ops.post_coeffs, True)
    return dataclasses.replace(ops, **kw)


def _reference_ops(states, exact):
    """The fp64 reference ops whose boundaries take the stored states in order (as_stored);
    each boundary's own x_next, before it takes the stored value, is appended to `exact`."""
    it = iter(states)

    def post_coeffs(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters=20):
        x_next = ref.post(x, f, h_post, h_res)
        exact.append(x_next.detach())
        x_next = as_stored(x_next, next(it))
        return (x_next, *ref.mhc_coeffs(x_next, phi, b, alpha, sinkhorn_iters))

    return dataclasses.replace(kernels.get("mhc", "torch"), post_coeffs=post_coeffs)


def check_chain(ops, x0, fs, params, g, iters=20):
    """Runs chain(ops) and the fp64 reference chain on the same inputs and upstream gradients;
    returns ({name: rel_err}, {name: tolerance}) for every layer input, every state x_1 .. x_L
    (each against the reference's post of the state before it as stored) and every gradient (x0,
    each f, each site's phi, b, alpha); the tolerances as the module docstring says."""
    states, exact = [], []
    L = len(fs)
    leaves = [x0.clone().requires_grad_(), *(f.clone().requires_grad_() for f in fs),
              *(t.clone().requires_grad_() for p in params for t in p)]
    lis, xl = chain(_recording(ops, states), leaves[0], leaves[1:L + 1],
                    [tuple(leaves[L + 1 + 3 * l:L + 4 + 3 * l]) for l in range(L)], iters)
    leaves64 = [t.detach().to(F64).requires_grad_() for t in leaves]
    lis64, xl64 = chain(_reference_ops(states, exact), leaves64[0], leaves64[1:L + 1],
                        [tuple(leaves64[L + 1 + 3 * l:L + 4 + 3 * l]) for l in range(L)], iters)
    out, out64 = [*lis, xl], [*lis64, xl64]
    errs = _errors([f"layer_input[{l}]" for l in range(L)] + [f"x[{L}]"], out, out64)
    errs.update(_errors([f"x[{l + 1}]" for l in range(L - 1)], states, exact))
    ups = _upstream(out, g)
    # (a gradient the chain under test never produced counts as zero: it fails the check)
    grads = [gr if gr is not None else torch.zeros_like(t) for gr, t in
             zip(torch.autograd.grad(out, leaves, ups, allow_unused=True), leaves)]
    grads64 = torch.autograd.grad(out64, leaves64, [u.to(F64) for u in ups])
    gnames = ["dx0", *(f"df[{l}]" for l in range(L)),
              *(f"d{p}[{l}]" for l in range(L) for p in ("phi", "b", "alpha"))]
    errs.update(_errors(gnames, grads, grads64))
    names = [f"layer_input[{l}]" for l in range(L)] + [f"x[{L}]"] + gnames
    effect = _dtype_effect(ops.method, leaves64, L, ups, x0.dtype, iters)
    tols = {nm: max(tolerance(x0.dtype), DTYPE_EFFECT_FACTOR * e) for nm, e in zip(names, effect)}
    return errs, tols


def _dtype_effect(method, leaves64, L, ups, dtype, iters) -> list:
    """rel_err between the fp64 reference chain with its states and their gradients stored in
    `dtype` and the one without, for every output then every gradient (check_chain's order)."""
    runs = []
    for stored in (None, dtype):
        leaves = [t.detach().clone().requires_grad_() for t in leaves64]
        lis, xl = chain(kernels.get(method, "torch"), leaves[0], leaves[1:L + 1],
                        [tuple(leaves[L + 1 + 3 * l:L + 4 + 3 * l]) for l in range(L)], iters,
                        stored_dtype=stored)
        out = [*lis, xl]
        runs.append([*out, *torch.autograd.grad(out, leaves, [u.to(F64) for u in ups])])
    return [rel_err(a, b) for a, b in zip(runs[1], runs[0])]


def mismatched_boundaries(ops) -> dict:
    """Two wrong variants of a backend's chain ops, by name: boundaries fed the parameters of the
    site before (site l's phi, b, alpha at l -> l+1), and boundaries fed h_res transposed."""
    last = {}

    def pre(x, *site_params, **kw):
        last["params"] = site_params
        return ops.pre(x, *site_params, **kw)

    def stale_params(x, f, h_post, h_res, *next_params, **kw):
        site_params, last["params"] = last["params"], next_params
        return ops.post_coeffs(x, f, h_post, h_res, *site_params, **kw)

    def transposed(x, f, h_post, h_res, *next_params, **kw):
        return ops.post_coeffs(x, f, h_post, h_res.transpose(1, 2), *next_params, **kw)

    return {"stale params": dataclasses.replace(ops, pre=pre, post_coeffs=stale_params),
            "h_res transposed": dataclasses.replace(ops, post_coeffs=transposed)}


def assert_input_errors(post_coeffs, layer_input, dtype, device):
    """A fused boundary refuses each wrong input with one line naming it."""
    import pytest
    x, f, h_post, h_res, phi, b, alpha = post_inputs(2, 24, 3, dtype, device,
                                                     torch.Generator().manual_seed(1))
    cases = [
        ("x", (x.float(), f, h_post, h_res, phi, b, alpha)),
        ("f", (x, f.float(), h_post, h_res, phi, b, alpha)),
        ("h_post", (x, f, h_post[:, :1], h_res, phi, b, alpha)),
        ("h_res", (x, f, h_post, h_res.double(), phi, b, alpha)),
        ("phi", (x, f, h_post, h_res, phi[:24], b, alpha)),
        ("b", (x, f, h_post, h_res, phi, b[:3], alpha)),
        ("alpha", (x, f, h_post, h_res, phi, b, alpha[:2])),
    ]
    for name, args in cases:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            post_coeffs(*args)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        post_coeffs(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters=0)
    with pytest.raises(ValueError, match="h_pre"):
        layer_input(x, h_post[:, :1])
    return x, f, h_post, h_res, phi, b, alpha


def count_puts(monkeypatch, cls) -> list:
    """The shapes of the gradients handed over through a link class (BoundaryLink, SiteLink)."""
    puts = []
    real = cls.put
    monkeypatch.setattr(cls, "put", lambda self, g: (puts.append(tuple(g.shape)), real(self, g)))
    return puts


def assert_layer_input_alone(layer_input, n, C, T, dtype, device):
    """layer_input on a tensor no post_coeffs made: its own backward, against fp64."""
    g = torch.Generator().manual_seed(3)
    x, _, h_post, *_ = post_inputs(n, C, T, dtype, device, g)
    xs, hs = x.clone().requires_grad_(), h_post.clone().requires_grad_()
    gl = torch.randn(T, C, generator=g).to(dtype).to(device)
    got = torch.autograd.grad(layer_input(xs, hs), (xs, hs), gl)
    want = [t.detach().double().requires_grad_() for t in (x, h_post)]
    for a, b in zip(got, torch.autograd.grad(ref.apply_pre(*want), want, gl.double())):
        assert rel_err(a, b) <= tolerance(dtype)


def assert_own_gradients_of_x_next_and_h_pre(post_coeffs, layer_input, config, n, C, T, dtype, device):
    """Where x_next's or h_pre's own gradient is asked for, layer_input keeps its share of it:
    torch.autograd.grad that stops at them (post_coeffs' backward does not run), and
    retain_grad with a backward that runs through post_coeffs."""
    g = torch.Generator().manual_seed(4)
    leaves = [t.clone().requires_grad_() for t in post_inputs(n, C, T, dtype, device, g)]
    gl = torch.randn(T, C, generator=g).to(dtype).to(device)
    gx = torch.randn(T, n, C, generator=g).to(dtype).to(device)
    for retain in (False, True):
        x_next, h_pre, _, _ = post_coeffs(*leaves, config=config)
        li = layer_input(x_next, h_pre)
        if retain:
            x_next.retain_grad()
            h_pre.retain_grad()
            torch.autograd.backward((li, x_next), (gl, gx))
            got = (x_next.grad, h_pre.grad)
        else:
            got = torch.autograd.grad((li, x_next), (x_next, h_pre), (gl, gx))
        want = [t.detach().double().requires_grad_() for t in (x_next, h_pre)]
        out64 = ref.apply_pre(*want)
        w = torch.autograd.grad((out64, want[0]), want, (gl.double(), gx.double()))
        for a, b in zip(got, w):
            assert rel_err(a, b) <= tolerance(dtype), f"retain_grad={retain}"


def assert_mismatched_boundaries_fail(ops, n, C, T, dtype, device):
    """The check can fail: boundaries fed the parameters of the site before (site l's phi, b,
    alpha at l -> l+1), or h_res transposed, fail it already in the forward outputs."""
    g = torch.Generator().manual_seed(11)
    x0, fs, params = chain_inputs(n, C, T, 3, dtype, device, g)
    for name, wrong in mismatched_boundaries(ops).items():
        errs, tols = check_chain(wrong, x0, fs, params, g)
        bad = failures(errs, dtype, tols)
        assert any(k.startswith(("layer_input", "x[")) for k in bad), f"{name}: {bad}"
