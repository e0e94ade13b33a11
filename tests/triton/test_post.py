"""kernels.triton.post (F_post,res) against the fp64 reference: forward and all four gradients.

On a machine without a GPU the kernels run in the Triton interpreter (tests/conftest.py) on small
shapes; the `gpu` cases run the compiled kernels on widths the benchmarks use. (The interpreter
truncates fp32 -> bf16 casts where the GPU rounds to nearest, so CPU errors are about twice the
GPU's; both stay well inside the tolerance.)
"""
import importlib

import pytest
import torch

from kernels import reference
from suite.core.tolerance import rel_err, tolerance
from tests.post_inputs import make_inputs, reference_outputs

P = importlib.import_module("kernels.triton.post")   # the package re-exports the function `post`
post = P.post

DTYPES = (torch.bfloat16, torch.float16)


def check(T, n, C, dtype, device, fwd=None, bwd=None, seed=0):
    x, f, h_post, h_res, grad = make_inputs(T, n, C, dtype, device, seed)
    ins = [t.clone().requires_grad_() for t in (x, f, h_post, h_res)]
    out = post(*ins, fwd=fwd, bwd=bwd)
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


# ------------------------------------------------------------------ CPU (interpreter) or GPU, small
# Every (n, C, dtype); T cycles through {1, 7, 33} so each size meets every T and n.
SMALL = [(n, C, dt, (1, 7, 33)[(i + j + k) % 3])
         for i, n in enumerate((1, 2, 3, 4, 8)) for j, C in enumerate((8, 40, 264))
         for k, dt in enumerate(DTYPES)]


@pytest.mark.parametrize("n,C,dtype,T", SMALL, ids=[f"n{n}-C{C}-{str(d)[6:]}-T{T}" for n, C, d, T in SMALL])
def test_post_small(n, C, dtype, T, kernel_device):
    check(T, n, C, dtype, kernel_device)


# Launch variants: several chunks per program with a masked tail, C split over programs
# (partials reduced after), narrower vectors, a forward chunk smaller than C.
CONFIGS = [
    dict(fwd="block_c=64", bwd="block_c=64"),               # 264 = 4 * 64 + 8: five chunks, tail
    dict(fwd="block_c=128", bwd="block_c=64,split=2"),      # split 2 of 5 chunks: uneven
    dict(bwd="block_c=64,split=5,vec=4"),                   # one chunk per program
    dict(bwd="block_c=32,split=3,vec=2,num_warps=2"),
    dict(fwd="bt=4,block_c=64"),                            # 5 tokens in blocks of 4: token tail
    dict(fwd="bt=2,block_c=256"),                           # chunk wider than 264 % 256 = 8
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ";".join(f"{k}:{v}" for k, v in c.items()))
@pytest.mark.parametrize("n", (3, 4))
def test_post_configs(cfg, n, kernel_device):
    check(5, n, 264, torch.bfloat16, kernel_device, **cfg)


def test_post_even_chunks(kernel_device):
    # C a multiple of block_c: the unmasked code path, with several chunks and a split.
    check(3, 4, 256, torch.float16, kernel_device, fwd="block_c=64", bwd="block_c=64,split=2")
    # T a multiple of bt as well: the forward's dense (mask-free) path with several tokens.
    check(4, 4, 256, torch.float16, kernel_device, fwd="bt=2,block_c=64")


# Opt-in forward variant (fwd "loop=1"): one program per token looping over C's chunks, and its
# persistent form (a fixed grid striding over the tokens; 4 "SMs" on the CPU, so T = 5 makes one
# program take two tokens). Forward only: the backward is the same kernel whatever fwd says.
# block_c = 128: C = 264 is two full chunks and a masked tail of 8, C = 512 four full chunks.
# Every (n, C, T); the dtype alternates so that each (n, C) meets both. Persistent with T = 5 only
# (with T = 1 it is the same launch as the plain loop).
LOOP = [(n, C, DTYPES[(i + j + k) % 2], T)
        for i, n in enumerate((1, 3, 4)) for j, C in enumerate((264, 512)) for k, T in enumerate((1, 5))]
LOOP_CASES = [(*case, p) for case in LOOP for p in (0, 1) if p == 0 or case[3] > 1]


def check_fwd(T, n, C, dtype, device, fwd):
    x, f, h_post, h_res, _ = make_inputs(T, n, C, dtype, device)
    out = post(x, f, h_post, h_res, fwd=fwd)
    assert out.shape == (T, n, C) and out.dtype == dtype
    err = rel_err(out, reference.post(x.double(), f.double(), h_post.double(), h_res.double()))
    assert err <= tolerance(dtype), f"T={T} n={n} C={C} {dtype} fwd={fwd}: error {err}"


@pytest.mark.parametrize("n,C,dtype,T,persistent", LOOP_CASES,
                         ids=[f"n{n}-C{C}-{str(d)[6:]}-T{T}" + ("-persistent" if p else "")
                              for n, C, d, T, p in LOOP_CASES])
def test_post_fwd_loop(n, C, dtype, T, persistent, kernel_device):
    check_fwd(T, n, C, dtype, kernel_device, f"loop=1,block_c=128,persistent={persistent}")


@pytest.mark.parametrize("fwd", ["loop=1",                                   # defaults: one tail chunk
                                 "loop=1,block_c=64,num_stages=1",            # unpipelined loop
                                 "loop=1,block_c=64,num_stages=4,num_warps=2,vec=4",
                                 "loop=1,block_c=64,persistent=2"])           # grid capped at T
def test_post_fwd_loop_configs(fwd, kernel_device):
    check_fwd(3, 3, 264, torch.bfloat16, kernel_device, fwd)


def test_post_fwd_loop_env(monkeypatch, kernel_device):
    monkeypatch.setenv("HCBENCH_POST_FWD", "loop=1,block_c=16,num_stages=2")
    assert P.fwd_config(4, 40)["loop"] == 1
    check_fwd(3, 4, 40, torch.float16, kernel_device, None)      # two chunks and a tail of 8


def test_post_fwd_config_defaults(monkeypatch):
    monkeypatch.delenv("HCBENCH_POST_FWD", raising=False)
    assert P.fwd_config(4, 4096) == {"block_c": 256, "vec": 8, "bt": 1, "num_warps": 1,
                                     "loop": 0, "persistent": 0, "num_stages": None}
    assert P.fwd_config(4, 4096, T=P.LOOP_MIN_TOKENS - 1)["loop"] == 0
    assert P.fwd_config(4, 4096, T=16384) == {"block_c": 512, "vec": 8, "bt": 1, "num_warps": 2,
                                              "loop": 1, "persistent": 0, "num_stages": 3}
    assert P.fwd_config(4, 4096, "loop=0", T=16384)["loop"] == 0
    assert P.fwd_config(4, 2560, "loop=1") == {"block_c": 512, "vec": 8, "bt": 1, "num_warps": 2,
                                               "loop": 1, "persistent": 0, "num_stages": 3}
    assert P.fwd_config(4, 7168, "loop=1,persistent=2,num_stages=1")["block_c"] == 512
    assert P.fwd_config(4, 264, "loop=1")["block_c"] == 512      # one chunk and a masked tail
    # num_stages is a backward key too: without the loop the forward ignores it
    assert P.fwd_config(4, 4096, "num_stages=2")["num_stages"] is None


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 3)])
def test_post_partial_grads(which, kernel_device):
    """Only the inputs that require grad get one (ctx.needs_input_grad), and they are right."""
    T, n, C, dtype = 7, 4, 40, torch.bfloat16
    x, f, h_post, h_res, grad = make_inputs(T, n, C, dtype, kernel_device, seed=3)
    ins = [t.clone().requires_grad_(k in which) for k, t in enumerate((x, f, h_post, h_res))]
    out = post(*ins)
    out.backward(grad)
    _, ref_grads = reference_outputs(x, f, h_post, h_res, grad)
    for k, (t, want) in enumerate(zip(ins, ref_grads)):
        if k in which:
            assert rel_err(t.grad, want) <= tolerance(dtype), k
        else:
            assert t.grad is None


def test_post_noncontiguous(kernel_device):
    T, n, C, dtype = 6, 3, 40, torch.float16
    x, f, h_post, h_res, grad = make_inputs(T, n, C, dtype, kernel_device, seed=4)
    xs = x.transpose(0, 1).contiguous().transpose(0, 1)          # [T, n, C] with strides of [n, T, C]
    fs = torch.stack([f, f], dim=-1)[..., 0]                      # [T, C] with stride 2
    hp = h_post.t().contiguous().t()
    hr = h_res.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (xs, fs, hp, hr))
    ins = [t.requires_grad_() for t in (xs, fs, hp, hr)]
    out = post(*ins)
    grads = torch.autograd.grad(out, ins, grad.transpose(0, 1).contiguous().transpose(0, 1))
    ref_out, ref_grads = reference_outputs(x, f, h_post, h_res, grad)
    assert rel_err(out, ref_out) <= tolerance(dtype)
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= tolerance(dtype)


def test_post_empty(kernel_device):
    x, f, h_post, h_res, _ = make_inputs(1, 2, 8, torch.bfloat16, kernel_device)
    out = post(x[:0], f[:0], h_post[:0], h_res[:0])
    assert out.shape == (0, 2, 8)


# ------------------------------------------------------------------ input errors
def _good(device, T=3, n=2, C=16, dtype=torch.bfloat16):
    x, f, h_post, h_res, _ = make_inputs(T, n, C, dtype, device)
    return dict(x=x, f=f, h_post=h_post, h_res=h_res)


@pytest.mark.parametrize("name,bad,match", [
    ("x", lambda a: a["x"][0], "x must be"),                                   # 2-D
    ("x", lambda a: a["x"].float(), r"bf16 or fp16.*\(x shape"),               # fp32 state
    ("x", lambda a: a["x"][..., :12], r"multiple of 8.*\(x shape"),                      # C = 12
    ("f", lambda a: a["f"][:, :8], "f must have shape"),
    ("f", lambda a: a["f"].half(), "f must be"),                               # dtype != x's
    ("h_post", lambda a: a["h_post"][:, :1], "h_post must have shape"),
    ("h_post", lambda a: a["h_post"].bfloat16(), "h_post must be"),
    ("h_res", lambda a: a["h_res"][:, :, :1], "h_res must have shape"),
    ("h_res", lambda a: a["h_res"].double(), "h_res must be"),
    ("h_res", lambda a: a["h_res"][:2], "h_res must have shape"),              # T mismatch
    ("f", lambda a: torch.empty(a["f"].shape, dtype=a["f"].dtype, device="meta"), "f is on meta"),
])
def test_post_bad_inputs(name, bad, match, kernel_device):
    args = _good(kernel_device)
    args[name] = bad(args)
    with pytest.raises(ValueError, match=match):
        post(**args)


def test_post_n_too_large(kernel_device):
    args = _good(kernel_device)
    args["x"] = torch.zeros(3, 9, 16, dtype=torch.bfloat16, device=kernel_device)
    with pytest.raises(ValueError, match="n in 1..8"):
        post(**args)


def test_post_wrong_device(kernel_device):
    args = _good(kernel_device)
    args["x"] = torch.empty(args["x"].shape, dtype=args["x"].dtype, device="meta")
    with pytest.raises(ValueError, match="x must be on a CUDA device"):
        post(**args)


def test_post_bad_config(kernel_device):
    with pytest.raises(ValueError, match="block_c"):
        post(**_good(kernel_device), fwd="block_c=48")
    with pytest.raises(ValueError, match="bad config item"):
        post(**_good(kernel_device), fwd="blocks=64")


@pytest.mark.parametrize("fwd,match", [
    ("loop=2", "loop must be 0 or 1, got 2"),
    ("persistent=1", "persistent=1 needs loop=1"),
    ("loop=1,persistent=-1", "persistent must be 0 .* got -1"),
    ("loop=1,num_stages=0", "num_stages must be >= 1 .* got 0"),
    ("loop=1,bt=2", "bt must be 1 with loop=1"),
    ("loop=yes", "bad config item 'loop=yes' .values are integers"),
    ("loops=1", "bad config item 'loops=1'"),
])
def test_post_bad_loop_config(fwd, match, kernel_device):
    with pytest.raises(ValueError, match=match) as exc:
        post(**_good(kernel_device), fwd=fwd)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------ GPU, the benchmark widths
GPU_CASES = [(n, C, T) for n in (1, 2, 3, 4, 8) for C in (264, 2560, 4096, 7168) for T in (1, 17, 4097)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,C,T", GPU_CASES, ids=[f"n{n}-C{C}-T{T}" for n, C, T in GPU_CASES])
def test_post_gpu(n, C, T, dtype, kernel_device):
    check(T, n, C, dtype, kernel_device)


@pytest.mark.gpu
def test_post_gpu_split(kernel_device):
    # few tokens: the backward splits C over programs by default; force other splits too
    for bwd in (None, "split=1", "split=3", "block_c=512,split=14"):
        check(2, 4, 7168, torch.bfloat16, kernel_device, bwd=bwd)


@pytest.mark.gpu
def test_post_gpu_int64_offsets(kernel_device):
    """T*n*C > 2^31 elements: offsets past 2^31 must not wrap (checked on the last tokens)."""
    T, n, C, dtype = 70000, 4, 7680, torch.bfloat16
    assert T * n * C > 2 ** 31
    free, _ = torch.cuda.mem_get_info()
    if free < 26 * 2 ** 30:
        pytest.skip("needs about 26 GiB of free GPU memory")
    g = torch.Generator(device=kernel_device).manual_seed(7)
    x = torch.randn(T, n, C, generator=g, device=kernel_device, dtype=dtype).requires_grad_()
    f = torch.randn(T, C, generator=g, device=kernel_device, dtype=dtype).requires_grad_()
    h_post = (2 * torch.sigmoid(torch.randn(T, n, generator=g, device=kernel_device))).requires_grad_()
    h_res = reference.sinkhorn(torch.randn(T, n, n, generator=g, device=kernel_device)).requires_grad_()
    out = post(x, f, h_post, h_res)
    grad = torch.randn(T, n, C, generator=g, device=kernel_device, dtype=dtype)
    dx, df, dhp, dhr = torch.autograd.grad(out, (x, f, h_post, h_res), grad)
    tol = tolerance(dtype)
    for sl in (slice(0, 16), slice(T // 2 - 8, T // 2 + 8), slice(T - 64, T)):
        ref_out, ref_grads = reference_outputs(x[sl], f[sl], h_post[sl], h_res[sl], grad[sl])
        assert rel_err(out[sl], ref_out) <= tol, sl
        for got, want in zip((dx[sl], df[sl], dhp[sl], dhr[sl]), ref_grads):
            assert rel_err(got, want) <= tol, sl


LOOP_GPU = [(n, C, T) for n in (1, 3, 4, 8) for C in (264, 2560, 7168) for T in (1, 4097)]


@pytest.mark.gpu
@pytest.mark.parametrize("fwd", ["loop=1", "loop=1,num_stages=1", "loop=1,block_c=2048,num_stages=4",
                                 "loop=1,persistent=4"])
@pytest.mark.parametrize("n,C,T", LOOP_GPU, ids=[f"n{n}-C{C}-T{T}" for n, C, T in LOOP_GPU])
def test_post_gpu_loop(n, C, T, fwd, kernel_device):
    check_fwd(T, n, C, torch.bfloat16, kernel_device, fwd)


@pytest.mark.gpu
def test_post_gpu_loop_int64_offsets(kernel_device):
    """The loop forward (plain and persistent) past 2^31 elements, checked on the last tokens."""
    T, n, C, dtype = 70000, 4, 7680, torch.bfloat16
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2 ** 30:
        pytest.skip("needs about 12 GiB of free GPU memory")
    g = torch.Generator(device=kernel_device).manual_seed(8)
    x = torch.randn(T, n, C, generator=g, device=kernel_device, dtype=dtype)
    f = torch.randn(T, C, generator=g, device=kernel_device, dtype=dtype)
    h_post = 2 * torch.sigmoid(torch.randn(T, n, generator=g, device=kernel_device))
    h_res = reference.sinkhorn(torch.randn(T, n, n, generator=g, device=kernel_device))
    for fwd in ("loop=1", "loop=1,persistent=4"):
        out = post(x, f, h_post, h_res, fwd=fwd)
        for sl in (slice(0, 16), slice(T - 64, T)):
            want = reference.post(x[sl].double(), f[sl].double(), h_post[sl].double(), h_res[sl].double())
            assert rel_err(out[sl], want) <= tolerance(dtype), (fwd, sl)
        del out
