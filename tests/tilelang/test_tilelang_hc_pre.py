"""kernels.tilelang.hc_pre (dynamic HC coefficients + F_pre) against the fp64 reference.

CPU ("c" target): the per-token coefficient forward and backward kernels alone. GPU (`gpu`):
hc_pre / hc_coeffs end to end, every output and gradient. The reference multiplies by the w the
GEMM uses (hi + lo in x's dtype, mhc_pre.phi_as_used), w's gradient passed straight through.
With nvcc and no GPU the row GEMM kernels in their HC form are compiled for sm_90a.
"""
import importlib
import os
import shutil

import pytest
import torch

from kernels import reference as ref
from suite.core.tolerance import rel_err
from tests.pre_check import assert_pre_matches

HAS_CUDA = torch.cuda.is_available()
FP16, BF16 = torch.float16, torch.bfloat16


def _mod():
    return importlib.import_module("kernels.tilelang.hc_pre")


def _ref_coeffs(z, b, s, n):
    p = torch.tanh(z)
    h_pre = s[0] * p[..., 0] + b[:n]
    h_post = s[1] * p[..., 1] + b[n:2 * n]
    h_res = s[0] * p[..., 2:].transpose(-1, -2) + b[2 * n:].view(n, n)
    return h_pre, h_post, h_res


@pytest.mark.parametrize("n", [1, 3, 4, 8])
def test_coef_forward_backward(n):
    dev = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(n)
    T_, C = 37, 40
    d64 = torch.float64
    z = torch.randn(T_, n, n + 2, generator=g, dtype=d64)
    r = torch.rand(T_, n, generator=g, dtype=d64) + 0.5
    b = torch.randn(n * n + 2 * n, generator=g, dtype=d64)
    s = torch.rand(2, generator=g, dtype=d64) + 0.2
    ups = [torch.randn(T_, n, generator=g, dtype=d64), torch.randn(T_, n, generator=g, dtype=d64),
           torch.randn(T_, n, n, generator=g, dtype=d64)]
    leaves = [t.clone().requires_grad_() for t in (z, b, s)]
    outs = _ref_coeffs(*leaves, n)
    torch.autograd.backward(outs, ups)
    mod = _mod()
    f = [t.float().to(dev) for t in (z, r, b, s)]
    got = mod.coeffs_from_z(f[0], f[2], f[3])
    for nm, o, e in zip(("h_pre", "h_post", "h_res"), got, outs):
        assert rel_err(o, e) < 1e-5, nm
    du, coef, ds = mod.coeffs_backward(f[0], f[1], f[3], *[u.float().to(dev) for u in ups], C)
    dz = leaves[0].grad
    assert rel_err(du.double().cpu() * r[..., None], dz) < 1e-5
    assert rel_err(coef.cpu(), -(dz * z).sum(-1) / (r * r * C)) < 1e-5
    assert rel_err(ds.cpu().sum(0), leaves[2].grad) < 1e-5


@pytest.mark.skipif(HAS_CUDA or not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")),
                    reason="sm_90a compile check: needs nvcc and no GPU (the GPU tests cover it there)")
def test_hc_gemm_kernels_compile_for_sm90a(monkeypatch):
    monkeypatch.setenv("HCBENCH_TILELANG_TARGET", '{"kind": "cuda", "arch": "sm_90a"}')
    m = importlib.import_module("kernels.tilelang.mhc_pre")
    assert "wgmma" in m.build_gemm_norm.__wrapped__(4, 264, "bfloat16", True).get_kernel_source()
    assert "wgmma" in m.build_dx_dphi.__wrapped__(4, 264, "bfloat16", 2, True, True).get_kernel_source()
    # n = 3 does not divide the 64-row block: the row kernel, here adding into the x gradient
    assert "wgmma" in m.build_dx_dphi.__wrapped__(3, 264, "bfloat16", 2, True, True,
                                                   True).get_kernel_source()


def _compare(fn, ref_fn, n, C, T_, dtype, seed, needs=(True, True, True, True), use=(True, True, True)):
    m = importlib.import_module("kernels.tilelang.mhc_pre")
    g = torch.Generator().manual_seed(seed)
    w, b, s = ref.random_params("hc", n, C, g)
    x = torch.randn(T_, n, C, generator=g).to(dtype)
    inputs = [t.cuda() for t in (x, w, b, s)]
    assert_pre_matches(fn, ref_fn, inputs, dtype, g, ("dx", "dw", "db", "ds"), m.phi_as_used,
                       f"n={n} C={C} T={T_}", needs=needs, use=use)


GPU_CASES = [(n, C, T_) for n in (1, 2, 3, 4, 8) for C, T_ in ((264, 1), (2560, 37), (4096, 129),
                                                               (7168, 67))]


@pytest.mark.gpu
@pytest.mark.parametrize("n,C,T_", GPU_CASES, ids=[f"n{c[0]}-C{c[1]}-T{c[2]}" for c in GPU_CASES])
def test_gpu_hc_pre(n, C, T_):
    _compare(_mod().hc_pre, ref.hc_pre, n, C, T_, BF16, seed=n * 100 + T_)


@pytest.mark.gpu
def test_gpu_hc_coeffs_and_partial_grads():
    mod = _mod()
    _compare(mod.hc_coeffs, ref.hc_coeffs, 3, 264, 7, FP16, seed=1)
    _compare(mod.hc_coeffs, ref.hc_coeffs, 4, 4096, 33, BF16, seed=2)
    _compare(mod.hc_pre, ref.hc_pre, 4, 2560, 37, BF16, seed=3, needs=(True, False, False, False),
             use=(True, False, False))
    _compare(mod.hc_coeffs, ref.hc_coeffs, 2, 4096, 9, FP16, seed=4, needs=(False, True, False, True),
             use=(False, False, True))
