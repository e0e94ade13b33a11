"""The Triton fused boundary (kernels/triton/post_coeffs.py: post_coeffs + layer_input) and a
chain of mHC sites on it (kernels/chain.py) against the fp64 reference, forward and every
gradient (tests/chain_check.py says how, and why the stored state enters the reference).

CPU runs go through TRITON_INTERPRET=1 (tests/conftest.py) on small odd shapes; the coefficient
backward runs 64 tokens per program there (FAST), since its Sinkhorn backward costs the
interpreter about 0.4 s per program. The @pytest.mark.gpu tests cover model-sized shapes."""
import ast
import inspect

import pytest
import torch

import kernels
from kernels import boundary_link, site_link
from kernels.triton import post_coeffs_bwd, post_coeffs_fwd
from kernels.triton.post_coeffs import layer_input, post_coeffs
from tests.chain_check import (assert_input_errors, assert_layer_input_alone, assert_mismatched_boundaries_fail,
                               assert_own_gradients_of_x_next_and_h_pre, chain_inputs, check_boundary,
                               check_chain, count_puts, failures, post_inputs)

BF16, FP16 = torch.bfloat16, torch.float16
FAST = {"b1_bt": 64}
# two column slices of two chunks, three column blocks and three token ranges, partial last
# ones (C = 40, T = 37)
SPLITS = {**FAST, "cw": 32, "bc": 16, "min_items": 1, "b2_br": 16, "b2_ts": 3, "fin_bt": 8}
ATOMIC = {**SPLITS, "reduction": "atomic"}
UNROLLED = {**SPLITS, "unroll": 1}
CONFIG_NAMES = (("default", None), ("fast", FAST), ("splits", SPLITS), ("atomic", ATOMIC),
                ("unrolled", UNROLLED))


def _fn(config):
    return (lambda *a, **k: post_coeffs(*a, **k, config=config)), layer_input


# (n, C, T, dtype, config)
BOUNDARY = [
    (1, 24, 37, BF16, FAST),
    (2, 40, 37, FP16, FAST),
    (3, 24, 37, BF16, FAST),
    (4, 40, 37, FP16, None),
    (4, 40, 37, BF16, SPLITS),
    (3, 40, 37, FP16, ATOMIC),
    (4, 40, 37, FP16, UNROLLED),
    (6, 24, 37, FP16, FAST),
    (8, 24, 37, BF16, FAST),
]


@pytest.mark.parametrize("n,C,T,dtype,config", BOUNDARY,
                         ids=[f"n{c[0]}-C{c[1]}-T{c[2]}-{str(c[3])[6:]}-"
                              + next(nm for nm, cfg in CONFIG_NAMES if cfg is c[4]) for c in BOUNDARY])
def test_boundary_matches_reference(kernel_device, monkeypatch, n, C, T, dtype, config):
    puts = count_puts(monkeypatch, boundary_link.BoundaryLink)
    g = torch.Generator().manual_seed(100 * n + C)
    inputs = post_inputs(n, C, T, dtype, kernel_device, g)
    errs = check_boundary(*_fn(config), inputs, g)
    assert not failures(errs, dtype), f"n={n} C={C} T={T} {dtype}: {failures(errs, dtype)} (all {errs})"
    assert puts == [(T, C)], "layer_input's gradient did not go to post_coeffs' backward"


@pytest.mark.parametrize("use", [("x_next", "h_pre", "h_post", "h_res"),           # no layer_input
                                 ("h_pre", "layer_input"),                         # h_pre used twice
                                 ("x_next", "layer_input")])
def test_boundary_gradient_paths(kernel_device, use):
    """h_pre's gradient straight from a consumer, from layer_input and from both at once; h_post
    and h_res without a gradient."""
    g = torch.Generator().manual_seed(7)
    inputs = post_inputs(3, 40, 37, FP16, kernel_device, g)
    errs = check_boundary(*_fn(FAST), inputs, g, use=use)
    assert not failures(errs, FP16), f"{use}: {failures(errs, FP16)}"


@pytest.mark.parametrize("needs", [(True, False, False, False, True, False, False),
                                   (False, True, False, True, False, True, False),
                                   (False, False, True, False, False, False, True)],
                         ids=["x-phi", "f-h_res-b", "h_post-alpha"])
def test_boundary_partial_gradients(kernel_device, needs):
    """Only the inputs that require a gradient get one, and it is right (the backward kernel
    without dx, df, the dh partials or dphi)."""
    g = torch.Generator().manual_seed(9)
    inputs = post_inputs(2, 24, 37, BF16, kernel_device, g)
    errs = check_boundary(*_fn(FAST), inputs, g, needs=needs)
    assert not failures(errs, BF16), f"{needs}: {failures(errs, BF16)}"


def test_layer_input_alone(kernel_device):
    """layer_input on a tensor no post_coeffs made: its own backward."""
    assert_layer_input_alone(layer_input, 3, 24, 37, BF16, kernel_device)


def test_gradients_of_x_next_and_h_pre_themselves(kernel_device):
    assert_own_gradients_of_x_next_and_h_pre(post_coeffs, layer_input, FAST, 3, 24, 37, BF16, kernel_device)


# ------------------------------------------------------------------ the chain
CHAIN = [(4, 40, 37, BF16), (3, 24, 37, FP16)]


@pytest.fixture
def fast_coef_backward(monkeypatch):
    monkeypatch.setenv("HCBENCH_MHC_PRE_B1_BT", "64")
    monkeypatch.setenv("HCBENCH_POST_COEFFS_B1_BT", "64")


@pytest.mark.parametrize("n,C,T,dtype", CHAIN, ids=[f"n{c[0]}-C{c[1]}-T{c[2]}-{str(c[3])[6:]}"
                                                    for c in CHAIN])
def test_chain_matches_reference(kernel_device, monkeypatch, fast_coef_backward, n, C, T, dtype):
    """Three sites: mhc_pre, two fused boundaries, post. Every layer input, x_L and every
    gradient; both links engaged (site 0's dx into mhc_pre, each layer_input's gradient into its
    boundary)."""
    boundary_puts = count_puts(monkeypatch, boundary_link.BoundaryLink)
    site_puts = count_puts(monkeypatch, site_link.SiteLink)
    g = torch.Generator().manual_seed(n + C)
    ops = kernels.get("mhc", "triton")
    errs, tols = check_chain(ops, *chain_inputs(n, C, T, 3, dtype, kernel_device, g), g)
    assert not failures(errs, dtype, tols), f"{failures(errs, dtype, tols)} (all {errs})"
    assert boundary_puts == [(T, C)] * 2 and site_puts == [(T, n, C)]


@pytest.mark.parametrize("pre,post", [("torch", "torch"), ("triton", "torch"), ("torch", "triton")])
def test_chain_with_the_boundary_of_another_backend(kernel_device, fast_coef_backward, pre, post):
    """Backend auto may run Triton's fused boundary between another backend's pre and post
    (kernels.compose "fused:triton"): the chain still matches the reference, every gradient."""
    g = torch.Generator().manual_seed(13)
    ops = kernels.compose("mhc", pre, post, "fused:triton")
    errs, tols = check_chain(ops, *chain_inputs(3, 24, 37, 3, FP16, kernel_device, g), g)
    assert not failures(errs, FP16, tols), f"{failures(errs, FP16, tols)} (all {errs})"


def test_mismatched_boundary_fails_the_check(kernel_device, fast_coef_backward):
    ops = kernels.get("mhc", "triton")
    assert_mismatched_boundaries_fail(ops, 3, 24, 37, FP16, kernel_device)


# ------------------------------------------------------------------ determinism, config, inputs
def _atomics_outside_atomic_branches(source: str) -> list[int]:
    """Lines of tl.atomic_* calls that are not inside an `if ATOMIC:` block."""
    bad = []

    def walk(node, guarded):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "ATOMIC":
            for child in node.body:
                walk(child, True)
            for child in node.orelse:
                walk(child, guarded)
            return
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr.startswith("atomic") and not guarded):
            bad.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            walk(child, guarded)
    walk(ast.parse(source), False)
    return bad


def test_the_default_reductions_have_no_atomics():
    """Deterministic by default: every partial sum has one writer and is summed in a fixed order;
    atomics are only in the `reduction="atomic"` branches (the GPU test below runs the default
    twice and compares bits)."""
    for mod in (post_coeffs_fwd, post_coeffs_bwd):
        src = inspect.getsource(mod)
        assert "atomic_add" in src and not _atomics_outside_atomic_branches(src), mod.__name__
    assert _atomics_outside_atomic_branches("import triton.language as tl\ntl.atomic_add(p, 1)\n") == [2]


def test_an_unknown_reduction_is_refused(kernel_device, monkeypatch):
    ins = post_inputs(2, 24, 3, BF16, kernel_device, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="reduction must be one of ordered, atomic"):
        post_coeffs(*ins, config={"reduction": "tree"})
    monkeypatch.setenv("HCBENCH_POST_COEFFS_REDUCTION", "tree")
    with pytest.raises(ValueError, match="HCBENCH_POST_COEFFS_REDUCTION"):
        post_coeffs(*ins)


def test_an_unknown_environment_setting_is_refused(monkeypatch, kernel_device):
    monkeypatch.setenv("HCBENCH_POST_COEFFS_SPLIT", "2")
    with pytest.raises(ValueError, match="unknown setting HCBENCH_POST_COEFFS_SPLIT"):
        post_coeffs(*post_inputs(2, 24, 3, BF16, kernel_device, torch.Generator().manual_seed(1)))


def test_input_errors(kernel_device):
    assert_input_errors(post_coeffs, layer_input, BF16, kernel_device)


def test_empty_tokens(kernel_device):
    ins = post_inputs(3, 24, 0, BF16, kernel_device, torch.Generator().manual_seed(2))
    leaves = [t.clone().requires_grad_() for t in ins]
    x_next, h_pre, h_post, h_res = post_coeffs(*leaves)
    li = layer_input(x_next, h_pre)
    assert x_next.shape == (0, 3, 24) and li.shape == (0, 24) and h_res.shape == (0, 3, 3)
    (li.float().sum() + x_next.float().sum() + h_res.sum()).backward()
    assert leaves[0].grad.shape == (0, 3, 24) and leaves[4].grad.abs().sum().item() == 0


# ------------------------------------------------------------------ GPU, model-sized
GPU_BOUNDARY = [(n, C, T, dt) for n in (1, 2, 3, 4, 8) for C in (2560, 7168)
                for T, dt in ((4097, BF16), (17, FP16))] + [(4, 4096, 16384, BF16), (6, 264, 1, FP16)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,C,T,dtype", GPU_BOUNDARY,
                         ids=[f"n{c[0]}-C{c[1]}-T{c[2]}-{str(c[3])[6:]}" for c in GPU_BOUNDARY])
def test_gpu_boundary(n, C, T, dtype):
    g = torch.Generator().manual_seed(n + C + T)
    errs = check_boundary(*_fn(None), post_inputs(n, C, T, dtype, "cuda", g), g)
    assert not failures(errs, dtype), f"{failures(errs, dtype)} (all {errs})"


@pytest.mark.gpu
@pytest.mark.parametrize("n,C,T,dtype", [(4, 4096, 16384, BF16), (8, 2560, 4097, FP16), (3, 7168, 17, BF16)])
def test_gpu_boundary_atomic(n, C, T, dtype):
    """The atomic reduction passes the same gate at model sizes."""
    g = torch.Generator().manual_seed(n + C + T + 1)
    errs = check_boundary(*_fn({"reduction": "atomic"}), post_inputs(n, C, T, dtype, "cuda", g), g)
    assert not failures(errs, dtype), f"{failures(errs, dtype)} (all {errs})"


@pytest.mark.gpu
@pytest.mark.parametrize("n,C", [(4, 2560), (8, 1024), (1, 4096)])
def test_gpu_chain(n, C):
    g = torch.Generator().manual_seed(n + C)
    errs, tols = check_chain(kernels.get("mhc", "triton"), *chain_inputs(n, C, 4097, 4, BF16, "cuda", g), g)
    assert not failures(errs, BF16, tols), f"{failures(errs, BF16, tols)} (all {errs})"


@pytest.mark.gpu
def test_gpu_two_runs_are_bitwise_identical():
    g = torch.Generator().manual_seed(5)
    ins = post_inputs(4, 4096, 16384, BF16, "cuda", g)
    ups = None
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in ins]
        out = list(post_coeffs(*leaves))
        out.append(layer_input(out[0], out[1]))
        if ups is None:
            ups = [torch.randn(o.shape, generator=g).to(o.dtype).cuda() for o in out]
        grads = torch.autograd.grad([out[i] for i in (0, 2, 3, 4)], leaves, [ups[i] for i in (0, 2, 3, 4)])
        runs.append([o.detach() for o in out] + list(grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
