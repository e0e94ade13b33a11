"""Scope stability on the CPU: the gain metric and the order of the composite, the corpus and its
split, the two mHC inits, the spike rule and the schedule, divergence, scenario validation, and
scenarios/stability.yaml's CPU cases end to end through the command line."""

import pytest
import torch

from suite import cli
from suite.core.record import flat
from suite.core.scenario import Case, ScenarioError, normalise, parse
from suite.store.runs import read_records
from suite.workloads import corpus, stability
from tests.conftest import ROOT


def run_dir(out):
    """The one run folder under --out (history.sqlite lies beside it)."""
    (run,) = [d for d in out.iterdir() if d.is_dir()]
    return run


def tokens_of(matrices):
    """[T, n, n] copies of each matrix, T = 3 tokens."""
    return [torch.tensor(m, dtype=torch.float64).expand(3, *torch.tensor(m).shape) for m in matrices]


# ---------------------------------------------------------------- the metric
def test_a_permutation_has_gain_one_and_a_known_matrix_its_row_and_column_sums():
    perm = [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    g = stability.amax_gains(tokens_of([perm, perm, perm]))
    assert g["forward"] == [1.0, 1.0, 1.0] and g["backward"] == [1.0, 1.0, 1.0]
    m = [[1.0, -3.0], [0.5, 2.0]]             # row sums -2, 2.5; column sums 1.5, -1
    g = stability.amax_gains(tokens_of([m]))
    assert g["forward"] == [2.5] and g["backward"] == [1.5]
    assert g["single_forward"] == [2.5] and g["single_backward"] == [1.5]


def test_the_composite_runs_from_a_site_to_the_last_in_the_papers_order():
    """P_l = H(L) ... H(l): with H1 = [[1, 1], [0, 1]] then H2 = diag(2, 1), P_1 = H2 @ H1 =
    [[2, 2], [0, 1]] (row sums 4, 1; column sums 2, 3); the other order, H1 @ H2 =
    [[2, 1], [0, 1]], would give 3 and 2."""
    h1, h2 = [[1.0, 1.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 1.0]]
    P = stability.composites(tokens_of([h1, h2]))
    assert torch.equal(P[0][0], torch.tensor([[2.0, 2.0], [0.0, 1.0]], dtype=torch.float64))
    assert torch.equal(P[1][0], torch.tensor(h2, dtype=torch.float64))      # the last site alone
    g = stability.amax_gains(tokens_of([h1, h2]))
    assert g["forward"] == [4.0, 2.0] and g["backward"] == [3.0, 2.0]


def test_gains_average_the_per_token_gain_over_the_sequence():
    a = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[4.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    assert stability.amax_gains([a])["forward"] == [3.0]


# ---------------------------------------------------------------- the corpus
def _tree(root):
    files = {"b.py": b"print(2)\n", "a.py": b"x = 1\n", "pkg/m.py": b"import os\n",
             "pkg/n.py": b"y = 3\n", "site-packages/third.py": b"no\n", "test/t.py": b"no\n",
             "config-3-x/cfg.py": b"no\n", "_sysconfigdata__x.py": b"no\n", "notes.txt": b"no\n"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_the_corpus_split_is_deterministic_disjoint_and_by_path(tmp_path):
    _tree(tmp_path)
    assert corpus.source_files(tmp_path) == ["a.py", "b.py", "pkg/m.py", "pkg/n.py"]
    c = corpus.load(str(tmp_path))
    assert set(c.train_files).isdisjoint(c.val_files)
    assert sorted(c.train_files + c.val_files) == corpus.source_files(tmp_path)
    for rel in corpus.source_files(tmp_path):
        assert (rel in c.val_files) == corpus.is_validation(rel)
    # Each stream is its files in path order, each followed by one 0 byte.
    assert c.train == b"".join((tmp_path / f).read_bytes() + b"\x00" for f in c.train_files)
    again = corpus.load.__wrapped__(str(tmp_path))
    assert again.describe()["sha256"] == c.describe()["sha256"]
    # The standard library itself: a tenth or so is validation, never a file on both sides.
    std = corpus.load()
    assert set(std.train_files).isdisjoint(std.val_files)
    assert 0.03 < len(std.val_files) / (len(std.train_files) + len(std.val_files)) < 0.2
    assert not any(f.startswith(("site-packages/", "test/")) for f in std.train_files)


def test_batches_follow_the_seed_and_validation_is_fixed():
    data = corpus.load()
    a, b = (corpus.Batches(data, 32, 4, seed, "cpu") for seed in (0, 0))
    c = corpus.Batches(data, 32, 4, 1, "cpu")
    first = a.next_train()
    assert torch.equal(first[0], b.next_train()[0]) and not torch.equal(first[0], c.next_train()[0])
    assert torch.equal(first[0][:, 1:], first[1][:, :-1])        # targets are the next bytes
    va, vc = list(a.validation()), list(c.validation())
    assert all(torch.equal(x[0], y[0]) for x, y in zip(va, vc))
    assert sum(t.shape[0] for t, _ in va) == corpus.VAL_WINDOWS
    assert torch.equal(a.probe()[0], va[0][0][0])


# ---------------------------------------------------------------- inits, schedule, spikes
TINY = dict(scope="stability", mode="fwd+bwd", device="cpu", dtype="fp32", C=32, heads=2,
            layers=2, seq=16, T=32)


def test_identity_init_starts_h_res_near_i_and_the_paper_init_near_uniform():
    tokens = corpus.Batches(corpus.load(), 16, 2, 0, "cpu").probe()
    n = 4
    for init in ("identity", "paper"):
        model = stability.build(normalise(Case(method="mhc", n=n, init=init, **TINY)), "cpu")
        h = torch.stack(stability.h_res_per_site(model, tokens))       # [sites, T, n, n]
        diag = torch.diagonal(h, dim1=-2, dim2=-1)
        off = h.sum(dim=(-2, -1)) - diag.sum(dim=-1)
        if init == "identity":
            assert diag.min() > 0.9 and off.max() / (n * n - n) < 0.05
            assert diag.mean().item() == pytest.approx(stability.identity_diagonal(n), abs=2e-3)
        else:
            assert (h - 1.0 / n).abs().max() < 0.01


def test_the_learning_rate_warms_up_then_decays_at_80_and_90_percent():
    lrs = [stability.lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == 1.0 and lrs[79] == 1.0
    assert lrs[80] == pytest.approx(0.316) and lrs[90] == pytest.approx(0.1)


def test_spikes_against_the_running_median_and_counted_as_runs():
    losses = [2.0] * 60 + [3.5, 3.6, 2.0, 2.0, 4.0] + [2.0] * 5 + [float("nan")]
    steps = stability.spike_steps(losses, factor=1.5, window=50)
    assert steps == [60, 61, 64, 70]
    assert stability.spike_count(steps) == 3
    assert stability.spike_steps([10.0] * 10 + [2.0] * 60) == []        # a fall is no spike


def test_a_gradient_that_is_not_finite_ends_the_run(monkeypatch):
    step = stability.MasterAdamW.step
    calls = []

    def poisoned(self, lr):
        calls.append(1)
        if len(calls) == 3:                 # step 2's gradients overflow
            self.full[0].grad.fill_(float("nan"))
        return step(self, lr)

    monkeypatch.setattr(stability.MasterAdamW, "step", poisoned)
    case = normalise(Case(method="hc", steps=12, lr=1e-3, **TINY))
    out = stability.train(case, "cpu")["stability"]
    assert out["diverged_at"] == 2 and out["steps_run"] == 3 and out["grad_norm"][2] is None
    assert out["final"] == {"train_loss": None, "val_loss": None}
    assert [g["step"] for g in out["gains"]] == [0]       # nothing measured on spoilt weights
    assert all(v["step"] <= 2 for v in out["val_loss"])


# ---------------------------------------------------------------- the scenario
def test_stability_fields_are_checked_with_one_line_each():
    base = {"name": "s", "defaults": {"scope": "stability", "mode": "fwd+bwd", "device": "cpu",
                                      "C": 32, "T": 32, "seq": 16}}
    cases = parse({**base, "sweep": {"method": ["residual", "hc", "mhc"],
                                     "init": ["paper", "identity"]}}, "s.yaml").cases
    assert [(c.method, c.init) for c in cases] == [("residual", None), ("hc", "paper"),
                                                  ("mhc", "paper"), ("mhc", "identity")]
    assert all(c.vocab == 256 and c.steps and c.lr for c in cases)
    for bad, want in [({"lr": "3e-3"}, "include[0].lr: '3e-3' is text to YAML"),
                      ({"init": "ones"}, "init: 'ones' is not allowed; allowed: paper | identity"),
                      ({"vocab": 512}, "vocab: 512 is not allowed with scope stability"),
                      ({"accum": 2}, "accum: means nothing for scope stability"),
                      ({"backend": "auto"}, "backend: 'auto' chooses by timing")]:
        with pytest.raises(ScenarioError) as err:
            parse({**base, "include": [{"method": "mhc", **bad}]}, "s.yaml")
        assert len(err.value.problems) == 1 and want in err.value.problems[0], err.value.problems
    with pytest.raises(ScenarioError, match="lr: means nothing for scope model"):
        parse({"name": "s", "defaults": {"device": "cpu", "C": 32, "T": 32},
               "include": [{"method": "mhc", "scope": "model", "mode": "fwd+bwd", "lr": 0.1}]},
              "s.yaml")
    site = parse({"name": "s", "defaults": {"device": "cpu", "C": 32, "T": 32, "steps": 5},
                  "include": [{"method": "mhc"}]}, "s.yaml").cases[0]
    assert site.steps is None and site.case_id == normalise(Case(method="mhc", C=32, T=32,
                                                                 device="cpu")).case_id


def test_the_scenarios_cpu_cases_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    code = cli.main(["run", str(ROOT / "scenarios/stability.yaml"), "--only", "device=cpu",
                     "--out", str(out)])
    assert code == 0
    run = run_dir(out)
    records = {(r["case"]["method"], r["case"]["init"]): r for r in read_records(run)}
    assert set(records) == {("residual", None), ("hc", "paper"), ("mhc", "paper"),
                            ("mhc", "identity")}
    for (method, init), r in records.items():
        c, st = r["case"], r["stability"]
        assert r["status"] == "ok" and r["check"]["passed"], r.get("reason")
        assert r["time_ms"]["median"] > 0 and r["tokens_per_s"] > 0 and r["time_kind"]
        assert st["steps_run"] == c["steps"] and st["diverged_at"] is None
        assert len(st["loss"]) == len(st["grad_norm"]) == c["steps"]
        assert all(x is not None and x > 0 for x in st["grad_norm"])
        assert st["val_loss"][-1]["step"] == c["steps"] and st["final"]["val_loss"] is not None
        assert st["loss"][-1] < st["loss"][0]
        assert len(st["corpus"]["sha256"]["train"]) == 64 and st["corpus"]["bytes"]["val"] > 0
        assert st["optimizer"]["lr"] == c["lr"] and st["spike_rule"]["factor"] == 1.5
        row = flat(r)
        assert row["lr"] == c["lr"] and row["steps"] == c["steps"] and row["init"] == init
        assert row["train_loss"] == st["final"]["train_loss"] and row["spikes"] == st["spikes"]
        if method == "residual":
            assert st["gains"] == [] and st["max_gain"] is None and row["max_gain_fwd"] is None
            continue
        sites = 2 * c["layers"]
        assert [g["step"] for g in st["gains"]] == sorted({round(c["steps"] * f)
                                                           for f in stability.GAIN_POINTS})
        assert all(len(g[k]) == sites for g in st["gains"] for k in
                   ("forward", "backward", "single_forward", "single_backward"))
        assert row["max_gain_fwd"] == st["max_gain"]["end"]["forward"] >= 0.99
        assert st["paper"]["max_gain"] == stability.PAPER_MAX_GAIN[method]
        if method == "mhc":       # rows of a Sinkhorn output sum to 1
            assert all(abs(x - 1) < 1e-4 for g in st["gains"] for x in g["forward"])
    # Residual, HC and mHC start from the same weights and see the same bytes.
    first = {k: r["stability"]["loss"][0] for k, r in records.items()}
    assert max(first.values()) - min(first.values()) < 1e-3
    report = (run / "report.md").read_text()
    assert "## Stability: composite gain over depth and training loss" in report
    assert "| hc | torch | paper | 0.01 | 4 |" in report


def test_no_corpus_skips_with_the_reason_and_a_wrong_backend_fails_its_gate(tmp_path, monkeypatch):
    """The one lifecycle: a machine without the sources skips the case; a backend that computes
    the wrong function fails the model gate with one line, and the run goes on."""
    import kernels
    from kernels import reference as ref

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(corpus, "stdlib_root", lambda: empty)
    out = tmp_path / "skip"
    only = ["--only", "device=cpu", "--only", "method=residual"]
    assert cli.main(["run", str(ROOT / "scenarios/stability.yaml"), *only, "--out", str(out)]) == 3
    (record,) = read_records(run_dir(out))
    assert record["status"] == "skipped" and "no Python standard library sources" in record["reason"]
    monkeypatch.undo()

    wrong = kernels.Ops("hc", "fake", pre=ref.hc_pre,
                        post=lambda x, f, hp, hr: ref.post(x, f, hp, hr) * 1.1)
    monkeypatch.setitem(kernels.BACKENDS, "fake", kernels.Backend("fake", "unused"))
    monkeypatch.setitem(kernels._LOADED, "fake", {"hc": wrong, "mhc": kernels.get("mhc", "torch")})
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndefaults: {scope: stability, mode: fwd+bwd, device: cpu, dtype: fp32,\n"
                    "  backend: fake, C: 32, heads: 2, layers: 2, seq: 16, T: 32, steps: 2}\n"
                    "sweep: {method: [hc, mhc]}\n")
    out = tmp_path / "fail"
    assert cli.main(["run", str(path), "--out", str(out)]) == 1
    records = {r["case"]["method"]: r for r in read_records(run_dir(out))}
    assert records["hc"]["status"] == "failed" and records["hc"]["reason"].startswith("check failed")
    assert "stability" not in records["hc"] and records["mhc"]["status"] == "ok"
