"""Adjacent sites of a model run their boundary fused (post of one site with the next site's
coefficients, kernels/chain.py) where the backend has it: the same loss and gradients as post
and pre apart, and the fused call really runs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels
from kernels import reference as ref
from suite.core.scenario import Case, normalise
from suite.workloads import recompute
from suite.workloads.model import ModelConfig, Transformer, model_config

TINY = {"C": 32, "layers": 2, "heads": 4, "seq": 16, "vocab": 64, "n": 4, "dtype": "fp64"}


def _loss_and_grads(fusion: bool, mode: str = "none", L_r: int = 1, method: str = "mhc"):
    cfg = ModelConfig(method=method, boundary_fusion=fusion, recompute=mode, L_r=L_r, **TINY)
    model = Transformer(cfg, seed=0)
    model.randomise_connections(5)
    tok = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    loss = model(tok, torch.roll(tok, -1, dims=1))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def counted(monkeypatch):
    """Counts the fused boundary calls of the reference backend."""
    calls = {"n": 0}
    ops = kernels.get("mhc", "torch")

    def post_coeffs(*args, **kw):
        calls["n"] += 1
        return ref.mhc_post_coeffs(*args, **kw)
    monkeypatch.setitem(kernels._LOADED["torch"], "mhc", dataclasses.replace(ops, post_coeffs=post_coeffs))
    return calls


@pytest.mark.parametrize("mode,L_r", [("none", 1), ("full", 2), ("mhc", 1), ("mhc", 2), ("mhc", 3),
                                      ("mhc", 4)])
def test_fused_boundaries_give_the_same_loss_and_gradients(counted, mode, L_r):
    """Every gradient (the embedding's is x0's, F's weights, each site's phi, b and alpha) against
    the same mode with the boundaries apart and against no recompute with them apart."""
    loss_ref, g_ref = _loss_and_grads(False)
    loss0, g0 = _loss_and_grads(False, mode, L_r)
    assert counted["n"] == 0
    loss1, g1 = _loss_and_grads(True, mode, L_r)
    # 4 sites: fused are all 3 boundaries without recompute, those inside a block under full and
    # mhc, each run twice there (the checkpoint's rerun, mhc's replay)
    blocks = recompute.site_blocks(range(4), 4 if mode == "none" else L_r)
    assert counted["n"] == sum(len(b) - 1 for b in blocks) * (1 if mode == "none" else 2)
    assert g_ref.keys() == g0.keys() == g1.keys()
    for loss, g in ((loss0, g0), (loss1, g1)):
        assert loss == pytest.approx(loss_ref, rel=1e-12)
        for name in g_ref:
            assert torch.allclose(g[name], g_ref[name], rtol=1e-10, atol=1e-12), name


def test_a_backend_without_the_fused_boundary_runs_post_and_pre_apart():
    cfg = ModelConfig(method="hc", **{**TINY, "dtype": "fp32"})
    model = Transformer(cfg, seed=0)
    assert kernels.get("hc", "torch").post_coeffs is None
    assert not recompute.fused_boundaries(model.sites())
    assert recompute.fused_boundaries(Transformer(ModelConfig(method="mhc", **TINY), seed=0).sites())
    assert not recompute.fused_boundaries(
        Transformer(ModelConfig(method="mhc", boundary_fusion=False, **TINY), seed=0).sites())


def test_the_case_field_reaches_the_model_and_keeps_earlier_ids():
    base = dict(method="mhc", C=64, T=32, scope="model", layers=2, seq=16, vocab=64, device="cpu",
                mode="fwd+bwd")
    on, off = normalise(Case(**base)), normalise(Case(**base, boundary_fusion=False))
    assert on.boundary_fusion is True and model_config(on).boundary_fusion
    assert not model_config(off).boundary_fusion and on.case_id != off.case_id
    before = {k: v for k, v in dataclasses.asdict(on).items() if k != "boundary_fusion"}
    assert on.case_id == normalise(Case(**before)).case_id
