"""The training step as a trainer runs it (micro-batches, AdamW, shared weights), the verdict's
wording, extrapolation and calibration gate, and a deepseek overhead run end to end on the CPU."""
import json
import statistics

import pytest
import torch

from suite.analysis import overhead
from suite.core import recompute_size
from suite.core.scenario import Case, ScenarioError, normalise, parse
from suite.run import groups
from suite.workloads import steps
from tests.run_helpers import run_model_scenario

TINY = {"C": 64, "T": 32, "seq": 16, "heads": 4, "vocab": 64, "layers": 2, "n": 2,
        "dtype": "fp32", "device": "cpu", "scope": "model", "mode": "fwd+bwd",
        "family": "deepseek"}


def case(method="mhc", **kw):
    return normalise(Case(**{"method": method, **TINY, **kw}))


def test_a_step_runs_accum_microbatches_then_one_optimizer_step(monkeypatch):
    step = steps.Step(case(accum=3), "cpu", seed=0)
    calls = []
    orig = step.module.forward
    monkeypatch.setattr(step.module, "forward", lambda *a: calls.append("mb") or orig(*a))
    for opt in (step.shared_opt, step.own_opt):
        o = opt.step
        monkeypatch.setattr(opt, "step", lambda *a, _o=o, **k: calls.append("opt") or _o(*a, **k))
    step.call()
    assert calls == ["mb", "mb", "mb", "opt", "opt"]
    assert all(p.grad is None for p in step.params)          # dropped after the step


def test_models_of_a_group_share_weights_but_not_connections():
    a = steps.Step(case("residual"), "cpu", seed=0)
    b = steps.Step(case("mhc"), "cpu", seed=0, donor=a)
    pa = dict(a.module.named_parameters())
    pb = dict(b.module.named_parameters())
    shared = [k for k in pb if ".conn." not in f".{k}"]
    assert shared and all(pb[k] is pa[k] for k in shared)
    assert any(".conn." in k for k in pb) and b.own_opt is not None and a.own_opt is None
    assert b.shared_opt is a.shared_opt
    before = pa["embed"].detach().clone()
    b.call()                                   # b's step moves the shared weights too
    assert not torch.equal(before, pa["embed"])


def test_moe_router_bias_moves_each_step():
    step = steps.Step(case("residual"), "cpu", seed=0)
    (moe,) = step.moe
    step.call()
    assert moe.router_bias.abs().sum() > 0


def test_wording_follows_the_interval():
    assert overhead.wording(6.0, 7.5) == "consistent with 6.7%"
    assert overhead.wording(7.0, 9.0) == "above 6.7%"
    assert overhead.wording(2.0, 6.0) == "below 6.7%"


def test_extrapolation_scales_the_depth_dependent_part_only():
    stat = overhead.extrapolated_pct(10.0)
    # head 20 ms; 2 of 20 layers: residual 40 ms, method 44 ms -> full 220 and 260 ms
    assert stat(44.0, 40.0, 20.0) == pytest.approx(100 * (260 - 220) / 220)
    assert overhead.extrapolated_pct(1.0)(44.0, 40.0, 20.0) == pytest.approx(10.0)


def test_bootstrap_of_several_series_resamples_shared_rounds():
    rounds = [r for r in range(20) for _ in range(2)]
    m = ([44.0 + 0.1 * (r % 3) for r in rounds], rounds)
    r = ([40.0 + 0.1 * (k % 3) for k in rounds], rounds)
    h = ([20.0] * len(rounds), rounds)
    point, lo, hi = overhead.bootstrap([m, r, h], overhead.extrapolated_pct(10.0))
    assert lo <= point <= hi
    with pytest.raises(ValueError, match="not interleaved"):
        overhead.bootstrap([m, ([1.0], [99])], overhead.overhead_pct)


def test_eq20_default_block_is_the_integer_optimum_per_site():
    c = case(recompute="mhc", layers=2)               # 4 sites
    assert c.L_r == recompute_size.best_lr(2, 4)
    deep = case(recompute="mhc", layers=2, depth=30)  # optimum of the full 60 sites, within 4
    assert deep.L_r == min(4, recompute_size.best_lr(2, 60))
    doc = {"name": "t", "defaults": TINY,
           "include": [{"method": "mhc", "recompute": "mhc", "L_r": 5}]}
    with pytest.raises(ScenarioError, match="L_r: 5 is more than the 4 sites"):
        parse(doc, "x.yaml")


def test_new_fields_keep_old_ids_and_separate_new_cases():
    old = json.loads(open("tests/data/old_model_record.json").read())
    c = normalise(Case(**old["case"]))
    assert c.case_id == old["case_id"]                    # a record made before these fields
    assert case("mhc").case_id != case("mhc", family="dense").case_id
    assert case("mhc", accum=2).case_id != case("mhc").case_id
    a = case("mhc", recompute="mhc", L_r=2)
    assert "recompute=mhc L_r=2" in a.label() and "deepseek" in a.label()


def test_calibration_gate_hides_predictions_of_an_uncalibrated_model():
    res = {"case_id": "r", "status": "ok", "case": case("residual").to_dict(),
           "device": {"step_ms": 1e9, "optimizer_ms": 1.0}, "copy_gbps": 3000.0,
           "matmul_tflops_measured": 700.0}
    rows = overhead.calibration_rows([res])
    assert rows["r"]["calibrated"] is False and rows["r"]["error"] < -0.9


def test_deepseek_overhead_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(groups, "MODEL_ROUNDS", 5)       # the rounds' logic, at CI's speed
    run, records = run_model_scenario(tmp_path, """
        name: t
        defaults: {T: 32, C: 64, n: 2, dtype: fp32, device: cpu, rep_ms: 1, seq: 16, heads: 4,
                   vocab: 64, layers: 2, depth: 6, accum: 2, mode: fwd+bwd, scope: model,
                   family: deepseek, backend: auto}
        include:
          - {method: residual}
          - {method: mhc, recompute: [none, mhc]}
    """)
    assert set(records) == {("residual", "none"), ("mhc", "none"), ("mhc", "mhc")}
    for r in records.values():
        assert r["status"] == "ok" and r["check"]["passed"], r.get("reason")
        assert r["time_kind"] == "wall clock per step"
        assert sorted(set(r["rounds"])) == list(range(groups.MODEL_ROUNDS))
        assert r["device"]["step_ms"] == pytest.approx(
            2 * r["device"]["microbatch_ms"] + r["device"]["optimizer_ms"])
        assert r["optimizer_share"] > 0 and r["op_backends"]["pre"] == "torch"
        heads = [v for v in r["interleaved_with"].values() if v["method"] == "head"]
        assert len(heads) == 1 and len(heads[0]["samples"]) >= groups.MODEL_ROUNDS
    rows = overhead.verdict(list(records.values()), {})
    assert {row["case"].recompute for row in rows} == {"none", "mhc"}
    for row in rows:
        r = row["record"]
        head = statistics.median(next(v for v in r["interleaved_with"].values()
                                      if v["method"] == "head")["samples"])
        assert row["ms"] == pytest.approx(head + (r["time_ms"]["median"] - head) * 3)
        assert row["low"] <= row["overhead"] <= row["high"] and row["wording"]
    report = (run / "report.md").read_text()
    assert "## Overhead verdict" in report and "paper's configuration" in report
    assert "## Recompute" in report and "Not on one GPU" in report


def test_deepseek_gate_passes_the_reference_in_bf16_and_fails_a_wrong_kernel(monkeypatch):
    import kernels
    from kernels import Ops
    from kernels import reference as ref
    gate_like = {"C": 256, "T": 64, "seq": 64, "n": 4, "backend": "torch"}
    # bf16 near the gate's own shape on a GPU (C = 480); HC in fp32: its unbounded mixing
    # amplifies bf16 rounding at this size past the bf16 bound (0.045 against 0.03 here; 0.025
    # at the GPU gate's shape)
    for method, dtype in (("residual", "bf16"), ("mhc", "bf16"), ("hc", "fp32")):
        result = steps.check(case(method, dtype=dtype, **gate_like), "cpu")
        assert result["passed"], (method, result["worst"], result["max_rel_err"])
    transposed = lambda x, f, hp, hr: ref.post(x, f, hp, hr.transpose(-1, -2))
    monkeypatch.setitem(kernels.BACKENDS, "fake", kernels.Backend("fake", "unused"))
    monkeypatch.setitem(kernels._LOADED, "fake", {"mhc": Ops("mhc", "fake", pre=ref.mhc_pre,
                                                             post=transposed)})
    bad = steps.check(case("mhc", backend="fake"), "cpu")
    assert not bad["passed"] and bad["max_rel_err"] > 10 * bad["tol"]
