"""kernels.triton.residual against the fp64 reference: x + f forward, identity backward."""
import pytest
import torch

from kernels import reference
from kernels.triton.residual import add_forward, residual_post, residual_pre
from suite.core.tolerance import rel_err, tolerance

DTYPES = (torch.bfloat16, torch.float16)


def make_inputs(T, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + T * 10 + C)
    x = torch.randn(T, 1, C, generator=g).to(dtype)
    f = torch.randn(T, C, generator=g).to(dtype)
    grad = torch.randn(T, 1, C, generator=g).to(dtype)
    return [t.to(device) for t in (x, f, grad)]


def check(T, C, dtype, device):
    x, f, grad = make_inputs(T, C, dtype, device)
    xi, fi = x.clone().requires_grad_(), f.clone().requires_grad_()
    out = residual_post(xi, fi)
    assert out.shape == (T, 1, C) and out.dtype == dtype
    dx, df = torch.autograd.grad(out, (xi, fi), grad)
    xr, fr = x.double().requires_grad_(), f.double().requires_grad_()
    ref = reference.residual_post(xr, fr)
    rdx, rdf = torch.autograd.grad(ref, (xr, fr), grad.double())
    tol = tolerance(dtype)
    assert rel_err(out, ref) <= tol
    assert rel_err(dx, rdx) <= tol and rel_err(df, rdf) <= tol
    assert dx.shape == x.shape and df.shape == f.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("T", (1, 7, 33))
@pytest.mark.parametrize("C", (8, 40, 264))
def test_residual_post_small(T, C, dtype, kernel_device):
    check(T, C, dtype, kernel_device)


def test_residual_post_tail_and_even(kernel_device):
    # flat sizes a multiple of the block (no mask) and not (masked tail), small blocks
    x, f, _ = make_inputs(6, 64, torch.bfloat16, kernel_device)
    for block in (128, 256):           # 384 elements: 3 full blocks / 1.5 blocks
        out = add_forward(x, f, block=block, num_warps=1)
        assert rel_err(out, x.double() + f[:, None].double()) <= tolerance(torch.bfloat16)


def test_residual_pre_is_view(kernel_device):
    x, _, _ = make_inputs(5, 16, torch.bfloat16, kernel_device)
    li, hp, hr = residual_pre(x)
    assert hp is None and hr is None
    assert li.shape == (5, 16) and li.data_ptr() == x.data_ptr()
    assert torch.equal(li, x[:, 0])


def test_residual_ignores_coefficients(kernel_device):
    x, f, _ = make_inputs(3, 8, torch.float16, kernel_device)
    assert torch.equal(residual_post(x, f, None, None), residual_post(x, f))


def test_residual_noncontiguous(kernel_device):
    x, f, _ = make_inputs(4, 40, torch.bfloat16, kernel_device)
    fs = torch.stack([f, f], dim=-1)[..., 1]
    xs = torch.stack([x, x], dim=-1)[..., 0]
    assert not fs.is_contiguous() and not xs.is_contiguous()
    ref = reference.residual_post(x.double(), f.double())
    assert rel_err(residual_post(xs, fs), ref) <= tolerance(torch.bfloat16)


@pytest.mark.parametrize("fn", ["pre", "post"])
def test_residual_n_not_1(fn, kernel_device):
    x = torch.zeros(3, 2, 8, dtype=torch.bfloat16, device=kernel_device)
    with pytest.raises(ValueError, match=r"\[T, 1, C\]"):
        residual_pre(x) if fn == "pre" else residual_post(x, x[:, 0])


@pytest.mark.parametrize("what,match", [
    ("x2d", "x must be"), ("fp32", "bf16 or fp16"), ("c12", "multiple of 8"),
    ("fshape", "f must have shape"), ("fdtype", "f must be"), ("fdevice", "f is on meta"),
    ("xdevice", "x must be on a CUDA device"),
])
def test_residual_post_bad_inputs(what, match, kernel_device):
    x, f, _ = make_inputs(3, 16, torch.bfloat16, kernel_device)
    if what == "x2d":
        x = x[:, 0]
    elif what == "fp32":
        x, f = x.float(), f.float()
    elif what == "c12":
        x, f = x[..., :12], f[:, :12]
    elif what == "fshape":
        f = f[:2]
    elif what == "fdtype":
        f = f.half()
    elif what == "fdevice":
        f = torch.empty(f.shape, dtype=f.dtype, device="meta")
    elif what == "xdevice":
        x = torch.empty(x.shape, dtype=x.dtype, device="meta")
    with pytest.raises(ValueError, match=match):
        residual_post(x, f)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("C", (264, 2560, 4096, 7168))
@pytest.mark.parametrize("T", (1, 17, 4097))
def test_residual_post_gpu(T, C, dtype, kernel_device):
    check(T, C, dtype, kernel_device)


@pytest.mark.gpu
def test_residual_post_gpu_int64_offsets(kernel_device):
    T, C, dtype = 530001, 4104, torch.bfloat16           # T*C > 2^31, and not a whole number of blocks
    assert T * C > 2 ** 31 and (T * C) % 4096
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2 ** 30:
        pytest.skip("needs about 16 GiB of free GPU memory")
    g = torch.Generator(device=kernel_device).manual_seed(1)
    x = torch.randn(T, 1, C, generator=g, device=kernel_device, dtype=dtype)
    f = torch.randn(T, C, generator=g, device=kernel_device, dtype=dtype)
    out = residual_post(x, f)
    for sl in (slice(0, 8), slice(T - 8, T)):
        ref = reference.residual_post(x[sl].double(), f[sl].double())
        assert rel_err(out[sl], ref) <= tolerance(dtype)
