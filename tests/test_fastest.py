"""Backend auto (suite.workloads.fastest): the fastest backend per op, and a fused boundary between
adjacent sites only where two sites measured faster with it than with post and pre apart."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import kernels
from suite.core.scenario import Case, normalise
from suite.workloads import fastest


class ScriptedTimer:
    """Runs each call once (so it must work) and answers the medians given, in order."""

    def __init__(self, medians):
        self.medians = list(medians)

    def time(self, fn, **kw):
        fn()
        return SimpleNamespace(median=self.medians.pop(0))


def _case(seed):
    return normalise(Case(method="mhc", n=2, C=16, T=8, dtype="bf16", device="cpu", scope="model",
                          family="dense", layers=1, heads=2, seq=8, vocab=32, backend="auto", seed=seed))


@pytest.mark.parametrize("boundary, want", [((3.0, 2.5), "unfused"), ((2.0, 2.5), "fused")])
def test_the_boundary_is_fused_only_where_it_measured_faster(monkeypatch, boundary, want):
    monkeypatch.setattr(kernels, "candidates", lambda method, device: ["torch", "unfused"])
    monkeypatch.setattr(fastest, "_CHOSEN", {})
    # pre: torch 1.0, unfused 2.0; post: torch 1.0, unfused 2.0; then fused, unfused boundary
    choice = fastest.choose(_case(seed=len(want)), ScriptedTimer([1.0, 2.0, 1.0, 2.0, *boundary]))
    assert (choice["pre"], choice["post"], choice["boundary"]) == ("torch", "torch", want)
    assert choice["times_ms"]["boundary"] == dict(zip(("fused", "unfused"), boundary))
    ops = kernels.compose("mhc", choice["pre"], choice["post"], choice["boundary"])
    assert (ops.post_coeffs is not None) == (want == "fused")


@pytest.mark.parametrize("boundary, want", [((3.0, 2.5), "unfused"), ((2.0, 2.5), "fused:torch")])
def test_a_mixed_pair_times_another_backends_fused_boundary(monkeypatch, boundary, want):
    """Pre and post from different backends: a boundary fused by a third party (here torch's,
    the only candidate that has one) is timed against the pair's post and pre apart."""
    monkeypatch.setattr(kernels, "candidates", lambda method, device: ["torch", "unfused"])
    monkeypatch.setattr(fastest, "_CHOSEN", {})
    # pre: torch 1.0, unfused 2.0; post: torch 2.0, unfused 1.0; then torch's fused boundary, unfused
    choice = fastest.choose(_case(seed=7 + len(want)), ScriptedTimer([1.0, 2.0, 2.0, 1.0, *boundary]))
    assert (choice["pre"], choice["post"], choice["boundary"]) == ("torch", "unfused", want)
    assert choice["times_ms"]["boundary"] == dict(zip(("fused:torch", "unfused"), boundary))
    ops = kernels.compose("mhc", choice["pre"], choice["post"], choice["boundary"])
    assert (ops.post_coeffs is not None) == (want != "unfused")
    assert ops.pre is kernels.get("mhc", "torch").pre and ops.post is kernels.get("mhc", "unfused").post


def test_no_fused_boundary_to_time(monkeypatch):
    monkeypatch.setattr(kernels, "candidates", lambda method, device: ["torch", "unfused"])
    monkeypatch.setattr(fastest, "_has_fused_boundary", lambda case, name: False)
    monkeypatch.setattr(fastest, "_CHOSEN", {})
    choice = fastest.choose(_case(seed=9), ScriptedTimer([1.0, 2.0, 2.0, 1.0]))
    assert (choice["pre"], choice["post"], choice["boundary"]) == ("torch", "unfused", "unfused")
    assert "boundary" not in choice["times_ms"]


def test_compose_boundaries():
    assert kernels.compose("mhc", "torch", "unfused").post_coeffs is None        # a mixed pair's own: none
    assert kernels.compose("mhc", "torch", "torch").post_coeffs is not None
    assert kernels.compose("mhc", "torch", "torch", "unfused").post_coeffs is None
    tri = kernels.get("mhc", "triton")
    ops = kernels.compose("mhc", "torch", "unfused", "fused:triton")
    assert (ops.post_coeffs, ops.apply_pre) == (tri.post_coeffs, tri.apply_pre)
    assert ops.backend == "torch+unfused, boundary triton"
    assert kernels.compose("mhc", "triton", "triton", "fused:triton") is tri
    for bad in ("sometimes", "unfused:triton", "fused:"):
        with pytest.raises(ValueError, match="boundary"):
            kernels.compose("mhc", "torch", "torch", bad)
    with pytest.raises(ValueError, match="compile has no fused boundary"):
        kernels.compose("mhc", "torch", "torch", "fused:compile")
