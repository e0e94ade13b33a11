"""kernels.tilelang.residual against the reference; the registry's view of backend tilelang."""
import importlib

import pytest
import torch

import kernels
from kernels import reference
from suite.core.tolerance import rel_err, tolerance

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def check(T, C, dtype):
    res = importlib.import_module("kernels.tilelang.residual")
    g = torch.Generator().manual_seed(T * 10 + C)
    x = torch.randn(T, 1, C, generator=g).to(dtype).to(DEVICE).requires_grad_()
    f = torch.randn(T, C, generator=g).to(dtype).to(DEVICE).requires_grad_()
    grad = torch.randn(T, 1, C, generator=g).to(dtype).to(DEVICE)
    layer_input, h_post, h_res = res.residual_pre(x)
    assert h_post is None and h_res is None and torch.equal(layer_input, x[:, 0])
    out = res.residual_post(x, f)
    dx, df = torch.autograd.grad(out, (x, f), grad)
    want = reference.residual_post(x.detach().double(), f.detach().double())
    assert rel_err(out, want) <= tolerance(dtype)
    assert torch.equal(dx, grad) and torch.equal(df, grad[:, 0])


@pytest.mark.parametrize("T,C", [(1, 8), (5, 264)])
def test_residual_small(T, C):
    check(T, C, torch.float16)


def test_residual_rejects_n_above_1():
    res = importlib.import_module("kernels.tilelang.residual")
    x = torch.zeros(2, 2, 8, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[T, 1, C\]"):
        res.residual_post(x, torch.zeros(2, 8, dtype=torch.float16, device=DEVICE))


def test_registry():
    """On a CPU machine every tilelang case skips with a reason; the ops the backend has are wired."""
    reason = kernels.unavailable_reason("mhc", "tilelang", "cpu")
    assert reason and "cuda" in reason
    if not HAS_CUDA:
        assert kernels.unavailable_reason("mhc", "tilelang", "cuda") == "no CUDA GPU on this machine"
    ops = kernels.get("mhc", "tilelang")
    assert ops.post is importlib.import_module("kernels.tilelang.post").post
    assert ops.pre is importlib.import_module("kernels.tilelang.mhc_pre").mhc_pre
    assert ops.coeffs is importlib.import_module("kernels.tilelang.mhc_pre").mhc_coeffs
    hc = kernels.get("hc", "tilelang")
    assert hc.pre is importlib.import_module("kernels.tilelang.hc_pre").hc_pre and hc.coeffs is not None
    assert kernels.get("residual", "tilelang").pre is not None


@pytest.mark.gpu
@pytest.mark.parametrize("C", (264, 2560, 4096, 7168))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_residual_gpu(C, dtype):
    assert kernels.unavailable_reason("residual", "tilelang", "cuda") is None
    for T in (1, 17, 4097):
        check(T, C, dtype)
