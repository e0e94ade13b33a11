"""The regression rule (suite/analysis/regression.py) and the gate that fails compare and publish
on it (exit 4, one line per regression), with environment changes marked instead of judged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from suite.analysis import regression
from suite.analysis.regression import judge
from suite.cli import main
from suite.publish.published import Run, history, newest_regressions

ENV = {"driver": "580.1", "torch": "2.11.0", "triton": "3.6.0"}


def _earlier(*medians, spread=0.01, env=ENV):
    return [(m, m * (1 - spread), m * (1 + spread), env) for m in medians]


def test_ratio_and_band_both_needed():
    assert judge(1.0, ENV, []).verdict == "first run"
    assert judge(1.06, ENV, _earlier(1.0)).verdict == "regression"       # +6%, above p90 1.01
    assert judge(1.04, ENV, _earlier(1.0)).verdict == "within noise"     # above the band, under 5%
    assert judge(0.90, ENV, _earlier(1.0)).verdict == "improvement"
    assert judge(1.15, ENV, _earlier(1.0, spread=0.2)).verdict == "within noise"  # inside p10-p90
    assert judge(1.04, ENV, _earlier(1.0), pct=3).verdict == "regression"         # its threshold


def test_robust_z_gates_once_the_history_is_long_enough():
    # Five earlier runs that wander by +-8% from run to run: +9% is inside that history's noise,
    # although it clears the ratio and a tight single-run band.
    noisy = _earlier(1.0, 1.08, 0.93, 1.06, 0.95, spread=0.005)
    j = judge(1.09, ENV, noisy)
    assert j.z is not None and j.z < regression.Z_LIMIT and j.verdict == "within noise"
    # The same step over a steady history is far outside it.
    steady = _earlier(1.0, 1.001, 0.999, 1.002, 0.998, spread=0.005)
    j = judge(1.09, ENV, steady)
    assert j.z > regression.Z_LIMIT and j.verdict == "regression"
    # One outlier among the earlier runs does not move a median/MAD score (a mean/SD one would).
    assert regression.robust_z(1.0, [1.0, 1.01, 0.99, 1.0, 50.0]) == pytest.approx(0.0)


def test_an_environment_change_is_marked_not_called_a_regression():
    new_env = {**ENV, "torch": "2.12.0"}
    j = judge(1.5, new_env, _earlier(1.0, 1.0))
    assert j.verdict == "environment changed" and j.env_change == ("torch 2.11.0 -> 2.12.0",)
    assert j.change_pct(1.5) == pytest.approx(50.0)
    # Judged only against runs of its own environment once there are some.
    mixed = _earlier(1.0) + _earlier(2.0, env=new_env)
    assert judge(2.01, new_env, mixed).verdict == "within noise"
    # An env.json without a field (an older run) is not a change.
    assert judge(1.0, {"torch": "2.11.0"}, _earlier(1.0)).verdict == "within noise"


def _rec(cid, median, started, commit="a" * 40):
    return {"case_id": cid, "status": "ok", "started_utc": started, "scenario": "s",
            "code": {"commit": commit, "dirty": False},
            "case": {"method": "mhc", "backend": "triton", "op": "site", "n": 4, "C": 1024,
                     "T": 64, "dtype": "bf16", "mode": "fwd", "device": "cuda"},
            "time_ms": {"median": median, "p10": median * 0.99, "p90": median * 1.01,
                        "cv": 0.01, "n": 3}}


def _env(torch="2.11.0"):
    return {"gpus": [{"name": "GPU X", "driver": "580.1", "sms": 132, "memory_bytes": 2**34, "capability": "9.0"}], "versions": {"torch": torch}}


def test_history_marks_code_and_environment_changes():
    runs = [Run("r1", _env(), [_rec("a", 1.0, "2026-01-01T00:00:00+00:00")]),
            Run("r2", _env(), [_rec("a", 1.2, "2026-01-02T00:00:00+00:00", "b" * 40)]),
            Run("r3", _env("2.12.0"), [_rec("a", 1.6, "2026-01-03T00:00:00+00:00", "b" * 40)])]
    pts = history(runs)["GPU X"]["a"]
    assert [p.verdict for p in pts] == ["first run", "regression", "environment changed"]
    assert pts[1].code_change == "aaaaaaaaaa -> bbbbbbbbbb" and pts[2].code_change is None
    assert pts[2].env_change == ("torch 2.11.0 -> 2.12.0",)
    # Only the newest run of a case counts for the gate, and an environment change is not one.
    assert newest_regressions(runs) == []
    assert [p.run_id for _, _, p in newest_regressions(runs[:2])] == ["r2"]


def _write_run(root: Path, name: str, median: float, env: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "env.json").write_text(json.dumps(env or _env()))
    rec = {**_rec("a", median, f"2026-01-0{len(list(root.iterdir()))}T00:00:00+00:00"),
           "schema": "hcbench.record/2"}
    (d / "records.jsonl").write_text(json.dumps(rec) + "\n")
    return d


@pytest.mark.parametrize("command", ["compare-two", "compare-history", "publish"])
def test_fail_on_regression_exits_4_with_one_line_per_regression(tmp_path, capsys, command):
    runs = tmp_path / "runs"
    a = _write_run(runs, "r1", 1.0)
    b = _write_run(runs, "r2", 1.2)
    argv = {"compare-two": ["compare", str(a), str(b)],
            "compare-history": ["compare", "--history", str(runs)],
            "publish": ["publish", str(runs), "--to", str(tmp_path / "site")]}[command]
    assert main(argv) == 0                                     # reported, not gated
    capsys.readouterr()
    assert main(argv + ["--fail-on-regression"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("regression: GPU X | ") and "+20.0%" in err[0]
    assert main(argv + ["--fail-on-regression=25"]) == 0       # +20% is under a 25% threshold


def test_fail_on_regression_spares_an_environment_change(tmp_path):
    runs = tmp_path / "runs"
    a = _write_run(runs, "r1", 1.0)
    b = _write_run(runs, "r2", 1.5, _env("2.12.0"))
    assert main(["compare", str(a), str(b), "--fail-on-regression"]) == 0
    assert main(["compare", "--history", str(runs), "--fail-on-regression"]) == 0


def test_bad_threshold_is_one_line_exit_2(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write_run(runs, "r1", 1.0)
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--history", str(runs), "--fail-on-regression=-3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "give a percentage above 0" in err and "Traceback" not in err
    shutil.rmtree(runs)

