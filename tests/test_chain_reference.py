"""kernels.chain on the reference ops (backend torch): what it computes, how it routes each
boundary, and the oracle of the fused boundary (reference.mhc_post_coeffs)."""
import dataclasses

import pytest
import torch

import kernels
from kernels import reference as ref
from kernels.chain import chain

F64 = torch.float64


def _sites(method, n, C, T, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(T, n, C, generator=g, dtype=F64)
    fs = [torch.randn(T, C, generator=g, dtype=F64) for _ in range(L)]
    params = [tuple(p.double() for p in ref.random_params(method, n, C, g)) for _ in range(L)]
    return x0, fs, params


def _loop(method, x0, fs, params, iters=20):
    """The chain written out site by site from the MATH.md functions (the docstring's loop)."""
    lis, x = [], x0
    for f, p in zip(fs, params):
        if method == "mhc":
            h_pre, h_post, h_res = ref.mhc_coeffs(x, *p, sinkhorn_iters=iters)
        else:
            h_pre, h_post, h_res = ref.hc_coeffs(x, *p)
        lis.append(ref.apply_pre(x, h_pre))
        x = ref.post(x, f, h_post, h_res)
    return lis, x


def _leaves(x0, fs, params):
    x0 = x0.clone().requires_grad_()
    fs = [f.clone().requires_grad_() for f in fs]
    params = [tuple(t.clone().requires_grad_() for t in p) for p in params]
    return x0, fs, params


def _all_grads(outs, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g, dtype=F64) for o in outs]
    return torch.autograd.grad(outs, leaves, ups)


@pytest.mark.parametrize("method,n,iters", [("mhc", 4, 20), ("mhc", 3, 7), ("mhc", 1, 20), ("hc", 3, None)])
def test_chain_is_the_loop_of_sites(method, n, iters):
    """Forward and every gradient of the reference chain equal the site-by-site loop (fp64);
    mhc's boundaries go through the fused op (post_coeffs + apply_pre), hc's through post + pre."""
    L, C, T = 3, 16, 5
    x0, fs, params = _sites(method, n, C, T, L, seed=n)
    a = _leaves(x0, fs, params)
    b = _leaves(x0, fs, params)
    ops = kernels.get(method, "torch")
    lis, xl = chain(ops, *a, **({"sinkhorn_iters": iters} if iters else {}))
    lis_ref, xl_ref = _loop(method, *b, **({"iters": iters} if iters else {}))
    for got, want in zip([*lis, xl], [*lis_ref, xl_ref]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    leaves_a = [a[0], *a[1], *(t for p in a[2] for t in p)]
    leaves_b = [b[0], *b[1], *(t for p in b[2] for t in p)]
    for got, want in zip(_all_grads([*lis, xl], leaves_a, 1), _all_grads([*lis_ref, xl_ref], leaves_b, 1)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fused_and_unfused_boundaries_agree():
    """The reference's fused boundary (post_coeffs, apply_pre) and its post + pre give the same
    chain: the fused op takes the NEXT site's parameters and hands its h_pre to apply_pre."""
    x0, fs, params = _sites("mhc", 2, 8, 4, 4, seed=3)
    fused = kernels.get("mhc", "torch")
    unfused = dataclasses.replace(fused, post_coeffs=None, apply_pre=None)
    a, b = _leaves(x0, fs, params), _leaves(x0, fs, params)
    out_a, out_b = chain(fused, *a), chain(unfused, *b)
    flat_a, flat_b = [*out_a[0], out_a[1]], [*out_b[0], out_b[1]]
    for got, want in zip(flat_a, flat_b):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    la = [a[0], *a[1], *(t for p in a[2] for t in p)]
    lb = [b[0], *b[1], *(t for p in b[2] for t in p)]
    for got, want in zip(_all_grads(flat_a, la, 2), _all_grads(flat_b, lb, 2)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_residual_chain_adds_every_f():
    T, C, L = 5, 8, 3
    x0, fs, _ = _sites("mhc", 1, C, T, L)
    lis, xl = chain(kernels.get("residual", "torch"), x0, fs, [()] * L)
    for l, li in enumerate(lis):
        torch.testing.assert_close(li, x0[:, 0] + sum(fs[:l], torch.zeros_like(fs[0])))
    torch.testing.assert_close(xl, x0 + sum(fs).unsqueeze(1))


def test_boundaries_use_the_fused_ops_when_present():
    calls = []

    def counted(name, fn):
        def wrapper(*args, **kw):
            calls.append(name)
            return fn(*args, **kw)
        return wrapper

    base = kernels.get("mhc", "torch")
    ops = dataclasses.replace(base, **{k: counted(k, getattr(base, k))
                                       for k in ("pre", "post", "post_coeffs", "apply_pre")})
    x0, fs, params = _sites("mhc", 2, 8, 3, 4)
    chain(ops, x0, fs, params)
    assert calls == ["pre"] + ["post_coeffs", "apply_pre"] * 3 + ["post"]
    calls.clear()
    chain(dataclasses.replace(ops, post_coeffs=None), x0, fs, params)   # one half alone: unfused
    assert calls == ["pre"] + ["post", "pre"] * 3 + ["post"]


def test_chain_refuses_mismatched_sites():
    x0, fs, params = _sites("mhc", 2, 8, 3, 2)
    with pytest.raises(ValueError, match="one f and one parameter tuple per site"):
        chain(kernels.get("mhc", "torch"), x0, fs, params[:1])
    with pytest.raises(ValueError, match="one f and one parameter tuple per site"):
        chain(kernels.get("mhc", "torch"), x0, [], [])


def test_mhc_post_coeffs_gradcheck():
    """The oracle of the fused boundary is differentiable in every input (fp64 finite differences)."""
    g = torch.Generator().manual_seed(5)
    n, C, T = 2, 4, 3
    x = torch.randn(T, n, C, generator=g, dtype=F64)
    f = torch.randn(T, C, generator=g, dtype=F64)
    h_post = 2 * torch.sigmoid(torch.randn(T, n, generator=g, dtype=F64))
    h_res = ref.sinkhorn(torch.randn(T, n, n, generator=g, dtype=F64))
    phi, b, alpha = (p.double() for p in ref.random_params("mhc", n, C, g))
    ins = [t.requires_grad_() for t in (x, f, h_post, h_res, phi, b, alpha)]
    assert torch.autograd.gradcheck(lambda *a: ref.mhc_post_coeffs(*a, sinkhorn_iters=5), ins)


def test_mixed_backends_have_no_fused_boundary():
    mixed = kernels.compose("mhc", "torch", "compile")
    assert mixed.post_coeffs is None and mixed.apply_pre is None
    assert kernels.get("mhc", "torch").post_coeffs is ref.mhc_post_coeffs
