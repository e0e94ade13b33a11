"""The TileLang fused boundary (kernels/tilelang/post_coeffs.py: post_coeffs + layer_input) and a
chain of mHC sites on it (kernels/chain.py) against the fp64 reference, forward and every
gradient (tests/chain_check.py says how, and why the stored state enters the reference).

Without a GPU the kernels run on TileLang's "c" target (fp16 only: it has no bf16) on small odd
shapes, each of which compiles its own kernels (a few seconds each), so the shapes are few.
TileLang's mhc_pre is GPU only (wgmma, TMA): on the CPU the chain's first site takes the
reference's pre, and every boundary and the last post are TileLang's. The @pytest.mark.gpu tests
cover bf16 and model-sized shapes with the backend's own Ops throughout."""
import dataclasses
import inspect
import os
import shutil

import pytest
import torch

import kernels
from kernels import boundary_link, site_link
from kernels.tilelang import post_coeffs_kernels
from kernels.tilelang.post_coeffs import layer_input, post_coeffs
from suite.core.scenario import Case, normalise
from suite.run import check as checking
from tests.chain_check import (assert_input_errors, assert_layer_input_alone, assert_mismatched_boundaries_fail,
                               assert_own_gradients_of_x_next_and_h_pre, chain_inputs, check_boundary,
                               check_chain, count_puts, failures, post_inputs)

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
BF16, FP16 = torch.bfloat16, torch.float16
# two token blocks and three column slices (the last partial), partials summed over slices
SPLITS = {"bt": 16, "cw": 16, "min_cw": 16, "nt": 32, "bwd_min_tps": 16, "bwd_items": 64}


def _fn(config):
    return (lambda *a, **k: post_coeffs(*a, **k, config=config)), layer_input


# (n, C, T, config): n from 1 to 8, C a multiple of 8 that no slice width divides
BOUNDARY = [(1, 24, 37, None), (3, 40, 37, SPLITS), (4, 24, 37, None), (8, 16, 19, None)]


@pytest.mark.parametrize("n,C,T,config", BOUNDARY,
                         ids=[f"n{c[0]}-C{c[1]}-T{c[2]}-{'splits' if c[3] else 'default'}"
                              for c in BOUNDARY])
def test_boundary_matches_reference(monkeypatch, n, C, T, config):
    puts = count_puts(monkeypatch, boundary_link.BoundaryLink)
    g = torch.Generator().manual_seed(100 * n + C)
    inputs = post_inputs(n, C, T, FP16, DEV, g)
    errs = check_boundary(*_fn(config), inputs, g)
    assert not failures(errs, FP16), f"n={n} C={C} T={T}: {failures(errs, FP16)} (all {errs})"
    assert puts == [(T, C)], "layer_input's gradient did not go to post_coeffs' backward"


@pytest.mark.parametrize("use", [("x_next", "h_pre", "h_post", "h_res"),           # no layer_input
                                 ("h_pre", "layer_input"),                         # h_pre used twice
                                 ("x_next", "layer_input")])
def test_boundary_gradient_paths(use):
    """h_pre's gradient straight from a consumer, from layer_input and from both at once; h_post
    and h_res without a gradient."""
    g = torch.Generator().manual_seed(7)
    inputs = post_inputs(3, 40, 37, FP16, DEV, g)
    errs = check_boundary(*_fn(SPLITS), inputs, g, use=use)
    assert not failures(errs, FP16), f"{use}: {failures(errs, FP16)}"


@pytest.mark.parametrize("needs", [(True, False, False, False, True, False, False),
                                   (False, True, False, True, False, True, False),
                                   (False, False, True, False, False, False, True),
                                   (False, False, False, False, True, True, False)],
                         ids=["x-phi", "f-h_res-b", "h_post-alpha", "phi-b"])
def test_boundary_partial_gradients(needs):
    """Only the inputs that require a gradient get one, and it is right (without dphi, without
    the post backward's gradients, without x_next's gradient: dphi alone)."""
    g = torch.Generator().manual_seed(9)
    inputs = post_inputs(3, 40, 37, FP16, DEV, g)
    errs = check_boundary(*_fn(SPLITS), inputs, g, needs=needs)
    assert not failures(errs, FP16), f"{needs}: {failures(errs, FP16)}"


def test_layer_input_alone():
    """layer_input on a tensor no post_coeffs made: its own backward."""
    assert_layer_input_alone(layer_input, 3, 40, 37, FP16, DEV)


def test_gradients_of_x_next_and_h_pre_themselves():
    assert_own_gradients_of_x_next_and_h_pre(post_coeffs, layer_input, SPLITS, 3, 40, 37, FP16, DEV)


# ------------------------------------------------------------------ the chain
def _chain_ops():
    ops = kernels.get("mhc", "tilelang")
    if HAS_CUDA:
        return ops
    return dataclasses.replace(ops, pre=kernels.get("mhc", "torch").pre)


def test_chain_matches_reference(monkeypatch):
    """Three sites: pre, two fused boundaries, post. Every layer input, x_L and every gradient;
    each layer_input's gradient handed to its boundary (and, on a GPU, site 0's dx to mhc_pre)."""
    n, C, T = 3, 40, 37
    boundary_puts = count_puts(monkeypatch, boundary_link.BoundaryLink)
    site_puts = count_puts(monkeypatch, site_link.SiteLink)
    dtype = BF16 if HAS_CUDA else FP16
    g = torch.Generator().manual_seed(n + C)
    errs, tols = check_chain(_chain_ops(), *chain_inputs(n, C, T, 3, dtype, DEV, g), g)
    assert not failures(errs, dtype, tols), f"{failures(errs, dtype, tols)} (all {errs})"
    assert boundary_puts == [(T, C)] * 2
    assert site_puts == ([(T, n, C)] if HAS_CUDA else [])


def test_mismatched_boundary_fails_the_check():
    ops = _chain_ops()
    assert_mismatched_boundaries_fail(ops, 3, 40, 37, FP16, DEV)


def test_the_suite_gate_passes_the_chain_and_fails_a_mismatched_boundary():
    """The correctness gate of an op=chain case (suite.run.check), as a run applies it: the chain
    on TileLang's boundaries passes in fwd+bwd; boundaries fed the next site's b negated (still
    well-formed coefficients) fail it after the first boundary."""
    ops = _chain_ops()
    dtype = "bf16" if HAS_CUDA else "fp16"
    case = normalise(Case(method="mhc", C=40, T=37, n=3, op="chain", sites=3, dtype=dtype,
                          device=DEV, mode="fwd+bwd"))
    result = checking.check(ops, case, DEV)
    assert result["passed"], result

    def negated_b(x, f, h_post, h_res, phi, b, alpha, **kw):
        return ops.post_coeffs(x, f, h_post, h_res, phi, -b, alpha, **kw)
    bad = checking.check(dataclasses.replace(ops, post_coeffs=negated_b),
                         normalise(dataclasses.replace(case, mode="fwd")), DEV)
    assert not bad["passed"]
    assert bad["errors"]["layer_input0"] <= bad["tols"]["layer_input0"]
    assert bad["errors"]["layer_input1"] > bad["tols"]["layer_input1"]


def test_the_backend_offers_the_fused_boundary():
    ops = kernels.get("mhc", "tilelang")
    assert ops.post_coeffs is post_coeffs and ops.apply_pre is layer_input
    assert kernels.get("hc", "tilelang").post_coeffs is None


# ------------------------------------------------------------------ determinism, config, inputs
def test_reductions_have_no_atomics():
    """Deterministic by construction: every partial sum has one writer and is summed in a fixed
    order, so no kernel of the fused boundary uses an atomic."""
    assert "atomic" not in inspect.getsource(post_coeffs_kernels)


def test_an_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown setting split"):
        post_coeffs(*post_inputs(2, 24, 3, FP16, DEV, torch.Generator().manual_seed(1)),
                    config={"split": 2})


def test_input_errors():
    x, f, h_post, h_res, phi, b, alpha = assert_input_errors(post_coeffs, layer_input, FP16, DEV)
    with pytest.raises(ValueError, match="multiple of 8"):
        post_coeffs(x[..., :20], f[:, :20], h_post, h_res, phi[:40], b, alpha)


def test_empty_tokens():
    ins = post_inputs(3, 24, 0, FP16, DEV, torch.Generator().manual_seed(2))
    leaves = [t.clone().requires_grad_() for t in ins]
    x_next, h_pre, h_post, h_res = post_coeffs(*leaves)
    li = layer_input(x_next, h_pre)
    assert x_next.shape == (0, 3, 24) and li.shape == (0, 24) and h_res.shape == (0, 3, 3)
    (li.float().sum() + x_next.float().sum() + h_res.sum()).backward()
    assert leaves[0].grad.shape == (0, 3, 24) and leaves[4].grad.abs().sum().item() == 0


@pytest.mark.skipif(HAS_CUDA or not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")),
                    reason="sm_90a compile check: needs nvcc and no GPU (the GPU tests cover it there)")
def test_kernels_compile_for_sm90a(monkeypatch):
    monkeypatch.setenv("HCBENCH_TILELANG_TARGET", '{"kind": "cuda", "arch": "sm_90a"}')
    k = post_coeffs_kernels
    # __wrapped__: not memoised, so nothing compiled for another target stays in the cache
    for build in (lambda: k.build_fwd.__wrapped__(4, 264, "bfloat16", 128, 64, False),
                  lambda: k.build_finish.__wrapped__(8, 264, 5, 20, False),
                  lambda: k.build_bwd.__wrapped__(4, 264, "bfloat16", 128, 64, True, True, True,
                                                  True, True, False),
                  lambda: k.build_dphi.__wrapped__(8, 264, "bfloat16", 128, 64, False)):
        assert "__global__" in build().get_kernel_source()


# ------------------------------------------------------------------ GPU, model-sized
GPU_BOUNDARY = [(n, C, T, dt) for n in (1, 4, 8) for C, T, dt in ((2560, 4097, BF16), (264, 17, FP16))]


@pytest.mark.gpu
@pytest.mark.parametrize("n,C,T,dtype", GPU_BOUNDARY,
                         ids=[f"n{c[0]}-C{c[1]}-T{c[2]}-{str(c[3])[6:]}" for c in GPU_BOUNDARY])
def test_gpu_boundary(n, C, T, dtype):
    g = torch.Generator().manual_seed(n + C + T)
    errs = check_boundary(*_fn(None), post_inputs(n, C, T, dtype, "cuda", g), g)
    assert not failures(errs, dtype), f"{failures(errs, dtype)} (all {errs})"


@pytest.mark.gpu
@pytest.mark.parametrize("n,C", [(4, 2560), (8, 1024), (1, 4096)])
def test_gpu_chain(n, C):
    g = torch.Generator().manual_seed(n + C)
    errs, tols = check_chain(kernels.get("mhc", "tilelang"), *chain_inputs(n, C, 4097, 4, BF16, "cuda", g), g)
    assert not failures(errs, BF16, tols), f"{failures(errs, BF16, tols)} (all {errs})"
