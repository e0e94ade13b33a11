"""kernels.tilelang.post (F_post,res) against the fp64 reference: forward and all four gradients.

Without a GPU the same kernels are compiled for TileLang's "c" target on small fp16 shapes
(tests/tilelang/conftest.py); the `gpu` cases run the CUDA kernels on the benchmark widths.
"""
import importlib

import pytest
import torch

from kernels import reference
from suite.core.tolerance import rel_err, tolerance
from tests.post_inputs import make_inputs, reference_outputs

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _post():
    return importlib.import_module("kernels.tilelang.post").post


def check(T, n, C, dtype, device=DEVICE, seed=0):
    x, f, h_post, h_res, grad = make_inputs(T, n, C, dtype, device, seed)
    ins = [t.clone().requires_grad_() for t in (x, f, h_post, h_res)]
    out = _post()(*ins)
    assert out.shape == (T, n, C) and out.dtype == dtype and out.device == x.device
    grads = torch.autograd.grad(out, ins, grad)
    ref_out, ref_grads = reference_outputs(x, f, h_post, h_res, grad)
    tol = tolerance(dtype)
    errs = {"x_next": rel_err(out, ref_out)}
    for name, got, want, dt in zip(("dx", "df", "dh_post", "dh_res"), grads, ref_grads,
                                   (dtype, dtype, torch.float32, torch.float32)):
        assert got.dtype == dt and got.shape == want.shape, name
        errs[name] = rel_err(got, want)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"T={T} n={n} C={C} {dtype}: errors {errs} over tolerance {tol}"


# ------------------------------------------------------------------ CPU ("c" target) or GPU, small
# C = 40 and 264 leave a predicated tail chunk (blocks of 64 and 512); C = 512 has none.
SMALL = [(1, 8, 1), (2, 264, 3), (3, 40, 7), (4, 264, 5), (4, 512, 2), (8, 40, 3)]


@pytest.mark.parametrize("n,C,T", SMALL, ids=[f"n{n}-C{C}-T{T}" for n, C, T in SMALL])
def test_post_small(n, C, T):
    check(T, n, C, torch.float16)


def test_post_partial_grads():
    """Gradients only for inputs that require them, and those right."""
    T, n, C, dtype = 3, 4, 264, torch.float16
    x, f, h_post, h_res, grad = make_inputs(T, n, C, dtype, DEVICE, seed=3)
    ins = [t.clone().requires_grad_(k in (1, 3)) for k, t in enumerate((x, f, h_post, h_res))]
    _post()(*ins).backward(grad)
    _, ref_grads = reference_outputs(x, f, h_post, h_res, grad)
    assert ins[0].grad is None and ins[2].grad is None
    assert rel_err(ins[1].grad, ref_grads[1]) <= tolerance(dtype)
    assert rel_err(ins[3].grad, ref_grads[3]) <= tolerance(dtype)


def test_post_empty():
    x, f, h_post, h_res, _ = make_inputs(1, 2, 8, torch.float16, DEVICE)
    assert _post()(x[:0], f[:0], h_post[:0], h_res[:0]).shape == (0, 2, 8)


# ------------------------------------------------------------------ input errors (no compilation)
def _good(T=3, n=2, C=16, dtype=torch.float16):
    x, f, h_post, h_res, _ = make_inputs(T, n, C, dtype, DEVICE)
    return {"x": x, "f": f, "h_post": h_post, "h_res": h_res}


@pytest.mark.parametrize("name,bad,match", [
    ("x", lambda a: a["x"][0], "x must be"),
    ("x", lambda a: a["x"].float(), r"bf16 or fp16.*\(x shape"),
    ("x", lambda a: a["x"][..., :12], r"multiple of 8.*\(x shape"),
    ("x", lambda a: torch.zeros(3, 9, 16, dtype=a["x"].dtype, device=a["x"].device), "n in 1..8"),
    ("f", lambda a: a["f"][:, :8], "f must have shape"),
    ("f", lambda a: a["f"].bfloat16(), "f must be"),
    ("h_post", lambda a: a["h_post"].half(), "h_post must be"),
    ("h_res", lambda a: a["h_res"][:2], "h_res must have shape"),
    ("x", lambda a: torch.empty(a["x"].shape, dtype=a["x"].dtype, device="meta"),
     "x must be on a CUDA device"),
])
def test_post_bad_inputs(name, bad, match):
    args = _good()
    args[name] = bad(args)
    with pytest.raises(ValueError, match=match):
        _post()(**args)


@pytest.mark.skipif(HAS_CUDA, reason="the c target's bf16 limit applies to CPU tensors only")
def test_post_cpu_bf16_is_a_clear_error():
    with pytest.raises(ValueError, match="no bf16"):
        _post()(**_good(dtype=torch.bfloat16))


# ------------------------------------------------------------------ GPU, the benchmark widths
GPU_CASES = [(n, C, T) for n in (1, 2, 3, 4, 8) for C in (264, 2560, 4096, 7168) for T in (1, 17, 4097)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,C,T", GPU_CASES, ids=[f"n{n}-C{C}-T{T}" for n, C, T in GPU_CASES])
def test_post_gpu_bf16(n, C, T):
    check(T, n, C, torch.bfloat16)


# fp16 on every n at two widths (each width is one more compilation)
FP16_CASES = [(n, C, T) for n in (1, 2, 3, 4, 8) for C in (264, 4096) for T in (1, 4097)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,C,T", FP16_CASES, ids=[f"n{n}-C{C}-T{T}" for n, C, T in FP16_CASES])
def test_post_gpu_fp16(n, C, T):
    check(T, n, C, torch.float16)


@pytest.mark.gpu
def test_post_gpu_int64_offsets():
    """T*n*C > 2^31 elements: the offsets of the last tokens must not wrap."""
    T, n, C, dtype = 70000, 4, 7680, torch.bfloat16
    free, _ = torch.cuda.mem_get_info()
    if free < 26 * 2 ** 30:
        pytest.skip("needs about 26 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(T, n, C, generator=g, device="cuda", dtype=dtype)
    f = torch.randn(T, C, generator=g, device="cuda", dtype=dtype)
    h_post = 2 * torch.sigmoid(torch.randn(T, n, generator=g, device="cuda"))
    h_res = reference.sinkhorn(torch.randn(T, n, n, generator=g, device="cuda"))
    out = _post()(x, f, h_post, h_res)
    for sl in (slice(0, 16), slice(T - 64, T)):
        want = reference.post(x[sl].double(), f[sl].double(), h_post[sl].double(), h_res[sl].double())
        assert rel_err(out[sl], want) <= tolerance(dtype), sl
