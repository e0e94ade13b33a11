"""kernels.tilelang.mhc_pre (mHC coefficients + F_pre) against the fp64 reference.

CPU ("c" target, fp16): the per-token Sinkhorn forward and backward kernels, the apply kernel and
the dh_pre kernel, each alone. GPU (`gpu`): mhc_pre / mhc_coeffs end to end, every output and
gradient, on the benchmark widths. With nvcc on the machine (no GPU needed) the two GEMM kernels
are compiled for sm_90a so lowering errors show on the CPU machine.

The GEMMs multiply by phi split into hi + lo in x's dtype (mhc_pre.py docstring); the reference
gets that phi (phi_as_used), with phi's gradient passed straight through, so the check measures the
kernels' own error (for dalpha, a sum over all tokens, the ~2^-16 rounding of phi can otherwise
dominate through cancellation - as tf32's does for the Triton kernel).
"""
import importlib
import os
import shutil

import pytest
import torch

from kernels import reference as ref
from suite.core.tolerance import rel_err, tolerance
from tests.pre_check import assert_pre_matches

HAS_CUDA = torch.cuda.is_available()
FP16, BF16 = torch.float16, torch.bfloat16


def _mod():
    return importlib.import_module("kernels.tilelang.mhc_pre")


def _ref_coeffs(m, b, alpha, n, iters):
    hp = torch.sigmoid(alpha[0] * m[:, :n] + b[:n])
    hq = 2 * torch.sigmoid(alpha[1] * m[:, n:2 * n] + b[n:2 * n])
    hr = ref.sinkhorn((alpha[2] * m[:, 2 * n:] + b[2 * n:]).view(-1, n, n), iters)
    return hp, hq, hr


# ------------------------------------------------------------------ per-kernel, CPU or GPU
@pytest.mark.parametrize("n,iters", [(1, 20), (3, 7), (4, 20), (8, 1)])
def test_sinkhorn_coef_forward_backward(n, iters):
    dev = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(n * 10 + iters)
    T_, C = 37, 40
    K = n * n + 2 * n
    m = torch.randn(T_, K, generator=g, dtype=torch.float64)
    r = torch.rand(T_, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(K, generator=g, dtype=torch.float64)
    alpha = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    ups = [torch.randn(T_, n, generator=g, dtype=torch.float64),
           torch.randn(T_, n, generator=g, dtype=torch.float64),
           torch.randn(T_, n, n, generator=g, dtype=torch.float64)]
    leaves = [t.clone().requires_grad_() for t in (m, b, alpha)]
    outs = _ref_coeffs(*leaves, n, iters)
    torch.autograd.backward(outs, ups)
    mod = _mod()
    f32 = [t.float().to(dev) for t in (m, r, b, alpha)]
    got = mod.coeffs_from_m(f32[0], f32[2], f32[3], n, iters)
    for nm, o, e in zip(("h_pre", "h_post", "h_res"), got, outs):
        assert rel_err(o, e) < 1e-5, nm
    dlogit, du, coef = mod.coeffs_backward(f32[0], f32[1], f32[2], f32[3],
                                           *[u.float().to(dev) for u in ups], C, iters)
    dm_ref = leaves[0].grad
    assert rel_err(du.double().cpu() * r[:, None], dm_ref) < 1e-5
    assert rel_err(dlogit.double().cpu().sum(0), leaves[1].grad) < 1e-5
    coef_ref = -(dm_ref * m).sum(1) / (r * r * n * C)
    assert rel_err(coef.cpu(), coef_ref) < 1e-5
    # dalpha as _backward forms it from dlogit and m
    prod = dlogit.double().cpu() * m
    dalpha = torch.stack([prod[:, :n].sum(), prod[:, n:2 * n].sum(), prod[:, 2 * n:].sum()])
    assert rel_err(dalpha, leaves[2].grad) < 1e-5


@pytest.mark.parametrize("n,C,T_", [(1, 264, 1), (4, 40, 9), (3, 264, 5)])
def test_apply_and_dh_pre(n, C, T_):
    dev = "cuda" if HAS_CUDA else "cpu"
    dtype = BF16 if HAS_CUDA else FP16
    g = torch.Generator().manual_seed(n + C + T_)
    x = torch.randn(T_, n, C, generator=g).to(dtype)
    h_pre = torch.rand(T_, n, generator=g)
    gli = torch.randn(T_, C, generator=g).to(dtype)
    mod = _mod()
    li = mod.apply_pre(x.to(dev), h_pre.to(dev))
    assert li.dtype == dtype
    assert rel_err(li.cpu(), ref.apply_pre(x.double(), h_pre.double())) < tolerance(dtype)
    dh = mod.dh_pre_of(x.to(dev), gli.to(dev))
    dh_ref = (x.double() * gli.double()[:, None, :]).sum(-1)
    assert rel_err(dh.cpu(), dh_ref) < 1e-5


def test_rejects_cpu_and_bad_iters():
    mod = _mod()
    x = torch.zeros(2, 2, 8, dtype=FP16)
    phi, b, alpha = torch.zeros(16, 8), torch.zeros(8), torch.zeros(3)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="CUDA only"):
            mod.mhc_pre(x, phi, b, alpha)
    else:
        with pytest.raises(ValueError, match="sinkhorn_iters"):
            mod.mhc_pre(x.cuda(), phi.cuda(), b.cuda(), alpha.cuda(), sinkhorn_iters=0)


@pytest.mark.skipif(HAS_CUDA or not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")),
                    reason="sm_90a compile check: needs nvcc and no GPU (the GPU tests cover it there)")
def test_gemm_kernels_compile_for_sm90a(monkeypatch):
    monkeypatch.setenv("HCBENCH_TILELANG_TARGET", '{"kind": "cuda", "arch": "sm_90a"}')
    mod = _mod()
    # __wrapped__: not memoised, so nothing compiled for another target stays in the cache
    src = mod.build_gemm_norm.__wrapped__(4, 264, "bfloat16").get_kernel_source()
    assert "wgmma" in src
    src = mod.build_dx_dphi.__wrapped__(3, 264, "bfloat16", 2, True).get_kernel_source()
    assert "wgmma" in src       # C = 264: the row kernel
    # C = 256: the tile kernel, adding into a linked site's x gradient (acc), TMA store of dx
    src = mod.build_dx_dphi.__wrapped__(4, 256, "bfloat16", 0, True, False, True).get_kernel_source()
    assert "wgmma" in src and "tma_store" in src


# ------------------------------------------------------------------ end to end on a GPU
def _compare(fn, ref_fn, n, C, T_, dtype, iters, seed, needs=(True, True, True, True),
             use=(True, True, True)):
    g = torch.Generator().manual_seed(seed)
    phi, b, alpha = ref.random_params("mhc", n, C, g)
    x = torch.randn(T_, n, C, generator=g).to(dtype)
    inputs = [t.cuda() for t in (x, phi, b, alpha)]
    assert_pre_matches(fn, ref_fn, inputs, dtype, g, ("dx", "dphi", "db", "dalpha"),
                       _mod().phi_as_used, f"n={n} C={C} T={T_}",
                       opts={"sinkhorn_iters": iters}, needs=needs, use=use)


GPU_CASES = [(n, C, T_) for n in (1, 2, 3, 4, 8) for C, T_ in ((264, 1), (2560, 37), (4096, 129),
                                                               (7168, 67))]


@pytest.mark.gpu
@pytest.mark.parametrize("n,C,T_", GPU_CASES, ids=[f"n{c[0]}-C{c[1]}-T{c[2]}" for c in GPU_CASES])
def test_gpu_mhc_pre(n, C, T_):
    mod = _mod()
    _compare(mod.mhc_pre, ref.mhc_pre, n, C, T_, BF16, 20, seed=n * 100 + T_)


@pytest.mark.gpu
@pytest.mark.parametrize("n,C,T_,dtype,iters", [(4, 4096, 33, BF16, 20), (3, 264, 7, FP16, 20),
                                                  (8, 2560, 300, BF16, 1), (2, 7168, 1, FP16, 5)])
def test_gpu_mhc_coeffs(n, C, T_, dtype, iters):
    mod = _mod()
    _compare(mod.mhc_coeffs, ref.mhc_coeffs, n, C, T_, dtype, iters, seed=7 * n + T_)


@pytest.mark.gpu
def test_gpu_partial_grads_and_sums():
    mod = _mod()
    _compare(mod.mhc_pre, ref.mhc_pre, 4, 2560, 37, BF16, 20, seed=5,
             needs=(True, False, False, False), use=(True, False, False))
    _compare(mod.mhc_coeffs, ref.mhc_coeffs, 2, 4096, 9, FP16, 20, seed=6,
             needs=(False, True, False, True), use=(False, False, True))
    g = torch.Generator().manual_seed(3)
    phi, b, alpha = [t.cuda() for t in ref.random_params("mhc", 4, 2560, g)]
    x = torch.randn(65, 4, 2560, generator=g).to(BF16).cuda()
    h_res = mod.mhc_pre(x, phi, b, alpha)[-1]
    assert (h_res >= 0).all() and (h_res.sum(-1) - 1).abs().max().item() <= 1e-5
