"""Whole-model scopes on the CPU: training, recompute gradients and memory, the model gate,
scenario rules, and a run of scope model end to end through the runner."""
import json
from dataclasses import replace

import pytest
import torch

import kernels
from kernels import Ops, reference as ref
from suite.core import recompute_size
from suite.core.scenario import Case, ScenarioError, normalise, parse
from suite.run import groups
from suite.workloads import recompute, stability, steps
from suite.workloads.model import ModelConfig, Transformer
from tests.run_helpers import run_model_scenario

TINY = {"C": 32, "layers": 3, "heads": 4, "seq": 16, "vocab": 64, "n": 4, "dtype": "fp32"}


def tokens(batch=2, seq=16, vocab=64, seed=3):
    tok = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return tok, torch.roll(tok, -1, dims=1)


@pytest.mark.parametrize("method", ["residual", "hc", "mhc"])
def test_model_trains_and_loss_falls(method):
    case = normalise(Case(method=method, scope="stability", mode="fwd+bwd", device="cpu",
                          dtype="fp32", C=32, heads=4, layers=2, seq=16, T=128, steps=25, lr=3e-3))
    losses = stability.train(case, "cpu")["stability"]["loss"]
    assert len(losses) == 25 and all(x is not None for x in losses)
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5


def grads_of(method, mode, L_r, backend="torch"):
    cfg = ModelConfig(method=method, recompute=mode, L_r=L_r, backend=backend, **TINY)
    model = Transformer(cfg, seed=1)
    model.randomise_connections(5)
    with recompute.SavedBytes() as saved:
        loss = model(*tokens())
    loss.backward()
    return loss.item(), {k: p.grad for k, p in model.named_parameters()}, saved.total


@pytest.mark.parametrize("method", ["hc", "mhc"])
def test_recompute_gives_the_same_gradients(method):
    loss0, g0, _ = grads_of(method, "none", 1)
    assert all(g is not None and g.abs().sum() > 0 for g in g0.values())
    for mode, L_r in (("mhc", 1), ("mhc", 2), ("mhc", 3), ("full", 2)):
        loss, g, _ = grads_of(method, mode, L_r)
        assert loss == pytest.approx(loss0, rel=1e-6)
        for name in g0:
            err = ((g[name] - g0[name]).norm() / g0[name].norm()).item()
            assert err < 1e-5, (mode, L_r, name, err)


def test_recompute_keeps_less_for_backward():
    """Bytes autograd keeps: mHC recompute drops the connection's states, full drops F's too."""
    none = grads_of("mhc", "none", 1)[2]
    per_block = grads_of("mhc", "mhc", 1)[2]       # L_r counts sites: 3 layers are 6 blocks
    one_block = grads_of("mhc", "mhc", 6)[2]
    full = grads_of("mhc", "full", 2)[2]
    assert full < one_block <= per_block < none
    # What mhc recompute keeps of the state: one x0 [T, n, C] per block instead of every x_l.
    T, n, C = 32, 4, 32
    assert per_block - one_block == pytest.approx(5 * T * n * C * 4, rel=0.01)


def test_memory_model_and_best_block():
    assert recompute_size.lr_star(4, 30) == pytest.approx(4.472, abs=1e-3)
    assert recompute_size.lr_star(4, 12) == pytest.approx(2.828, abs=1e-3)
    assert recompute_size.memory_model(4, 10, 30, 5) == 4 * 10 * 6 + 6 * 10 * 5
    assert recompute_size.memory_model(4, 10, 30, 4) == 4 * 10 * 8 + 6 * 10 * 4
    assert recompute_size.best_lr(4, 30) == 5        # PAPERS.md: integer argmin 5 for L = 30
    assert recompute_size.best_lr(4, 60) == 6
    for L in (12, 30, 61):
        assert abs(recompute_size.best_lr(4, L) - recompute_size.lr_star(4, L)) < 1.0


def model_case(**kw):
    base = {"method": "mhc", "C": 64, "T": 32, "backend": "torch", "n": 4, "dtype": "bf16", "mode": "fwd+bwd",
                "scope": "model", "device": "cpu", "layers": 2, "heads": 2, "seq": 32, "vocab": 128}
    return normalise(Case(**{**base, **kw}))


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_model_gate_passes_the_reference_backend_in_bf16(scope):
    for method in ("residual", "hc", "mhc"):
        result = steps.check(model_case(method=method, scope=scope), "cpu")
        assert result["passed"], result
        assert result["max_rel_err"] > 0 and "loss" in result["errors"] or scope == "layer"


@pytest.fixture
def fake_backend(monkeypatch):
    table = {}
    monkeypatch.setitem(kernels.BACKENDS, "fake", kernels.Backend("fake", "unused"))
    monkeypatch.setitem(kernels._LOADED, "fake", table)
    return table


def test_model_gate_fails_a_wrong_kernel(fake_backend):
    short = lambda *a, **k: ref.mhc_pre(*a, **{**k, "sinkhorn_iters": 3})
    fake_backend["mhc"] = Ops("mhc", "fake", pre=short, post=ref.post)
    for scope in ("model", "layer"):
        result = steps.check(model_case(backend="fake", scope=scope, dtype="fp32"), "cpu")
        assert not result["passed"] and result["max_rel_err"] > 10 * result["tol"]
    transposed = lambda x, f, hp, hr: ref.post(x, f, hp, hr.transpose(-1, -2))
    fake_backend["mhc"] = Ops("mhc", "fake", pre=ref.mhc_pre, post=transposed)
    assert not steps.check(model_case(backend="fake"), "cpu")["passed"]


def test_triton_layer_passes_the_gate_in_the_interpreter():
    pytest.importorskip("triton")
    case = model_case(backend="triton", scope="layer", C=32, heads=2, T=16, seq=16)
    result = steps.check(case, "cuda" if torch.cuda.is_available() else "cpu")
    assert result["passed"], result


def test_scenario_rules_for_model_scopes():
    doc = {"name": "t", "defaults": {"T": 64, "C": 64, "device": "cpu"},
           "include": [{"method": "mhc", "scope": "model", "mode": "fwd"}]}
    with pytest.raises(ScenarioError) as e:
        parse(doc, "x.yaml")
    assert "mode: 'fwd' is not allowed with scope model" in e.value.problems[0]
    bad = [({"seq": 48}, "T: 64 is not a multiple of seq 48"),
           ({"heads": 5}, "heads: 5 does not divide C 64"),
           ({"layers": 2, "recompute": "mhc", "L_r": 5}, "L_r: 5 is more than the 4 sites"),
           ({"recompute": "some"}, "'some' is not allowed; allowed: none | mhc | full"),
           ({"layers": 0}, "0 is not allowed; allowed: integers >= 1")]
    for extra, msg in bad:
        doc["include"] = [{"method": "mhc", "scope": "model", "mode": "fwd+bwd", **extra}]
        with pytest.raises(ScenarioError) as e:
            parse(doc, "x.yaml")
        assert len(e.value.problems) == 1 and msg in e.value.problems[0], e.value.problems


def test_site_case_ids_do_not_change_and_model_fields_count_only_where_measured():
    site = normalise(Case(method="residual", C=2560, T=16384))
    assert site.case_id == "237c16dd0ca2"              # the id before the model fields existed
    assert normalise(replace(site, layers=4, recompute="mhc")).case_id == site.case_id
    m = model_case(method="mhc", recompute="mhc", L_r=1)
    assert m.case_id != model_case(method="mhc", recompute="mhc", L_r=2).case_id
    assert model_case(method="residual", recompute="mhc").recompute == "none"
    assert model_case(recompute="none", L_r=2).L_r is None


def test_subgroups_fit_the_budget_and_keep_baselines():
    res = model_case(method="residual")
    cases = [res] + [model_case(recompute="none")] + [model_case(recompute="mhc", L_r=r)
                                                      for r in (1, 2)]
    one = steps.persistent_estimate(cases[0])
    # Models of one group share their weights: together they hold about one model's bytes.
    assert groups.subgroups(cases, budget=1.5 * one) == [cases]
    # A CUDA-graph case owns its weights, so it and its graph baseline need sets of their own.
    graphs = [model_case(method="residual", cuda_graph=True), model_case(cuda_graph=True)]
    sets = groups.subgroups(cases + graphs, budget=2.5 * one)
    assert len(sets) == 2
    for s in sets:
        assert steps.set_estimate(s) <= 2.5 * one
        assert res in s or graphs[0] in s
    assert groups.subgroups(cases, budget=float("inf")) == [cases]


def test_model_scope_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(groups, "MODEL_ROUNDS", 6)       # the rounds' logic, at CI's speed
    run, records = run_model_scenario(tmp_path, """
        name: t
        defaults: {T: 32, C: 32, n: 2, dtype: fp32, device: cpu, warmup_ms: 1, rep_ms: 1,
                   seq: 16, heads: 2, vocab: 32, layers: 2, mode: fwd+bwd, scope: model}
        sweep:
          method: [residual, mhc]
          recompute: [none, mhc]
    """)
    assert set(records) == {("residual", "none"), ("mhc", "none"), ("mhc", "mhc")}
    for r in records.values():
        assert r["status"] == "ok" and r["check"]["passed"] and r["tokens_per_s"] > 0
        assert sorted(set(r["rounds"])) == list(range(groups.MODEL_ROUNDS))
        assert len(r["rounds"]) == len(r["time_ms"]["samples"])
        assert len(r["interleaved_with"]) == 2
    report = (run / "report.md").read_text()
    assert "## Overhead verdict" in report and "## Recompute" in report
    env = json.loads((run / "env.json").read_text())
    assert env["matmul_rate"]["cpu"]["tflops"] > 0


def test_triton_recompute_gives_the_same_gradients():
    """mHC recompute with the fused kernels: backprop first differentiates a post for f alone, then
    for x; the site link (kernels/site_link.py) must hand post's dx over only in the second."""
    pytest.importorskip("triton")
    tiny = {**TINY, "dtype": "bf16"}

    def grads(mode):
        # boundaries apart in both: this is the path of post and pre under recompute, and the
        # comparison is of recompute, not of two roundings of a block edge (fused boundaries:
        # tests/triton/test_recompute.py)
        cfg = ModelConfig(method="mhc", recompute=mode, L_r=2, backend="triton",
                          boundary_fusion=False, **tiny)
        model = Transformer(cfg, seed=1)
        model.randomise_connections(5)
        if torch.cuda.is_available():
            model = model.cuda()
        tok, tgt = (t.to(next(model.parameters()).device) for t in tokens())
        model(tok, tgt).backward()
        return {k: p.grad.float() for k, p in model.named_parameters()}

    g0, g1 = grads("none"), grads("mhc")
    for name in g0:
        err = ((g1[name] - g0[name]).norm() / g0[name].norm()).item()
        assert err < 1e-2, (name, err)
