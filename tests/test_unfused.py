"""Backend `unfused` (kernels/unfused.py) on the CPU: the fp64 gate at the bf16 tolerances,
forward and gradients, against its declared variant; wrong math still fails it; the state is
never copied to fp32, forward or backward."""
from dataclasses import replace

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import unfused
from suite.core.scenario import Case, normalise
from suite.run.check import check
from suite.workloads import workload

SHAPES = [(4, 64, 32), (2, 96, 33), (1, 64, 16)]          # (n, C, T): odd T, n = 1
OPS = ["site", "pre", "post", "coeffs"]


def case(method, op="site", mode="fwd+bwd", n=4, C=64, T=32, **kw):
    return normalise(Case(method=method, C=C, T=T, n=n, dtype="bf16", mode=mode, op=op,
                          device="cpu", **kw))


@pytest.mark.parametrize("n,C,T", SHAPES)
@pytest.mark.parametrize("method,op", [(m, op) for m in ("mhc", "hc", "residual") for op in OPS
                                       if not (m == "residual" and op == "coeffs")])
def test_unfused_passes_the_gate_forward_and_gradients(method, op, n, C, T):
    for mode in ("fwd", "fwd+bwd"):
        c = case(method, op, mode, n=1 if method == "residual" else n, C=C, T=T)
        result = check(kernels.get(method, "unfused"), c, "cpu")
        assert result["passed"], (mode, result["worst"], result["max_rel_err"], result["tol"])
        assert not result["wrong_dtype"]
        if mode == "fwd+bwd" and op in ("site", "pre") and method != "residual":
            assert {"d_x", "d_b"} <= set(result["errors"])          # gradients were compared
        # Well inside the tolerance, not at its edge.
        assert all(result["errors"][k] < 0.6 * result["tols"][k] for k in result["errors"])
        if method != "residual":
            assert result["reference"] == unfused.DEVIATION
            for name in ("h_post", "h_res"):
                if name in result["errors"]:
                    assert result["errors"][name] < 0.2 * result["tols"][name]


def _short_sinkhorn(x, phi, b, alpha, sinkhorn_iters=20):
    return unfused.mhc_pre(x, phi, b, alpha, 1)


def _transposed_post(x, f, h_post, h_res):
    return unfused.post(x, f, h_post, h_res.transpose(-1, -2))


def _hc_without_norm(x, w, b, s):
    n = x.shape[1]
    proj = torch.tanh((x @ w.to(x.dtype)).float())
    h_res = s[0] * proj[..., 2:].transpose(-1, -2) + b[2 * n:].view(n, n)
    return (unfused.apply_pre(x, s[0] * proj[..., 0] + b[:n]), s[1] * proj[..., 1] + b[n:2 * n],
            h_res)


@pytest.mark.parametrize("method,field,broken,worst", [
    ("mhc", "pre", _short_sinkhorn, "h_res"),
    ("mhc", "post", _transposed_post, None),
    ("hc", "post", _transposed_post, None),
    ("hc", "pre", _hc_without_norm, "h_res"),
])
def test_a_broken_unfused_fails_the_gate(method, field, broken, worst):
    ops = replace(unfused.OPS[method], **{field: broken})
    result = check(ops, case(method), "cpu")
    assert not result["passed"]
    assert result["max_rel_err"] > 10 * result["tol"]
    if worst:
        assert result["worst"] == worst


class _Fp32StateCopies(TorchDispatchMode):
    """Records every fp32 tensor an op makes whose shape is the state's or a stream's and whose
    memory is that large (an expanded view of a per-token scalar is not a copy)."""

    def __init__(self, T, C, n):
        super().__init__()
        self.T, self.widths, self.seen = T, (C, n * C), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 2
                    and t.shape[-1] in self.widths
                    and t.untyped_storage().nbytes() >= 4 * self.T * min(self.widths)):
                self.seen.append(f"{func}: {list(t.shape)}")
        return out


@pytest.mark.parametrize("method", ["mhc", "hc"])
@pytest.mark.parametrize("backend,expect_copies", [("unfused", False), ("torch", True)])
def test_the_state_is_never_copied_to_fp32(method, backend, expect_copies):
    c = case(method)
    inputs = workload.make_inputs(c, "cpu", seed=3)
    mode = _Fp32StateCopies(c.T, c.C, c.n)
    with mode:
        workload.run(kernels.get(method, backend), c, inputs)      # forward and backward
    # The reference computes in fp32, so the probe sees its copies: it can tell.
    assert bool(mode.seen) == expect_copies, mode.seen[:5]


def test_registered_for_cpu_and_cuda_bf16_only_and_not_for_auto():
    spec = kernels.BACKENDS["unfused"]
    assert set(spec.devices) == {"cpu", "cuda"} and not spec.requires
    for method in ("residual", "hc", "mhc"):
        assert kernels.unavailable_reason(method, "unfused", "cpu") is None
    reason = kernels.get("mhc", "unfused").supports(4, 64, torch.float16)
    assert reason and "bf16" in reason
    assert kernels.get("mhc", "unfused").supports(4, 64, torch.bfloat16) is None
    # A declared variant is never chosen by backend auto.
    assert "unfused" not in kernels.candidates("mhc", "cpu")
