"""Publishing without a browser or a database: the history and regression rules on synthetic
records, the exports, the static site built from the fixture and from the committed H100 runs,
and the command line's errors."""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

import pytest

from suite.cli import main
from suite.publish import dashboard, export as publish_export
from suite.publish.published import (PublishError, Run, filter_runs, hardware, history,
                                     load_run_dir, load_runs)

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "publish"
REAL = sorted(p for p in (ROOT / "results").glob("2026*") if (p / "records.jsonl").exists())


def _rec(case_id: str, median: float, spread: float, started: str, status: str = "ok") -> dict:
    return {"case_id": case_id, "status": status, "started_utc": started, "scenario": "s",
            "case": {"method": "hc", "backend": "torch", "op": "site", "n": 4, "C": 1024, "T": 64,
                     "dtype": "bf16", "mode": "fwd", "device": "cuda"},
            "time_ms": None if status != "ok" else {
                "median": median, "p10": median * (1 - spread), "p90": median * (1 + spread),
                "cv": spread / 2, "n": 3, "samples": [median] * 3}}


def _run(run_id: str, gpu: str, recs: list[dict]) -> Run:
    return Run(run_id, {"gpus": [{"name": gpu}]}, recs)


# ---------------------------------------------------------------- rules
def test_history_baseline_is_median_of_previous_runs():
    runs = [_run(f"r{i}", "GPU X", [_rec("a", m, 0.01, f"2026-01-0{i + 1}T00:00:00+00:00")])
            for i, m in enumerate([1.0, 1.3, 1.0, 1.04, 1.2])]
    pts = history(runs)["GPU X"]["a"]
    # 1.0 after (1.0, 1.3): 13% under their median 1.15 and under their p10s' median: improvement
    assert [p.verdict for p in pts] == ["first run", "regression", "improvement", "within noise",
                                        "regression"]
    assert pts[-1].baseline == pytest.approx(1.02)        # median of 1.0, 1.3, 1.0, 1.04
    assert pts[-1].change_pct == pytest.approx(100 * (1.2 / 1.02 - 1))


def test_history_is_per_gpu_model_and_in_record_time_order():
    a = _run("late-folder", "GPU X", [_rec("a", 2.0, 0.01, "2026-01-03T00:00:00+00:00")])
    b = _run("early-folder", "GPU X", [_rec("a", 1.0, 0.01, "2026-01-01T00:00:00+00:00")])
    c = _run("other-gpu", "GPU Y", [_rec("a", 5.0, 0.01, "2026-01-02T00:00:00+00:00")])
    h = history([a, c, b])
    assert [p.run_id for p in h["GPU X"]["a"]] == ["early-folder", "late-folder"]
    assert h["GPU X"]["a"][-1].verdict == "regression"
    assert [p.verdict for p in h["GPU Y"]["a"]] == ["first run"]


def test_failed_records_never_enter_the_history():
    runs = [_run("r1", "G", [_rec("a", 1.0, 0.01, "2026-01-01T00:00:00")]),
            _run("r2", "G", [_rec("a", 0, 0, "2026-01-02T00:00:00", status="failed")])]
    assert len(history(runs)["G"]["a"]) == 1


def test_hardware_ratios_join_case_ids():
    runs = [_run("r1", "A", [_rec("a", 2.0, 0.01, "2026-01-01T00:00:00"),
                             _rec("only-a", 1.0, 0.01, "2026-01-01T00:00:00")]),
            _run("r2", "B", [_rec("a", 1.0, 0.01, "2026-01-02T00:00:00")])]
    gpus, rows = hardware(runs, reference="A")
    assert gpus == ["A", "B"] and [r["case_id"] for r in rows] == ["a"]
    assert rows[0]["ratio"]["B"] == pytest.approx(0.5)


# ---------------------------------------------------------------- loading and exports
def test_fixture_runs_load_with_not_run_cases_and_filters():
    runs = load_runs([FIXTURE])
    assert [r.run_id for r in runs] == ["run-a1", "run-b1", "run-b2-model", "run-a2"]
    a1 = load_run_dir(FIXTURE / "run-a1")
    assert a1.counts() == {"ok": 33, "skipped": 1, "failed": 1, "not run": 1}
    assert [r.run_id for r in filter_runs(runs, gpu=["gpu a"])] == ["run-a1", "run-a2"]
    assert [r.run_id for r in filter_runs(runs, since="2026-01-06")] == ["run-b2-model", "run-a2"]
    only = filter_runs(runs, scenario=["sample_model"])
    assert [r.run_id for r in only] == ["run-b2-model"]
    regs = [(g, p.record["case"]["method"], p.record["case"]["C"]) for g, cases in history(runs).items()
            for pts in cases.values() for p in pts if p.verdict == "regression"]
    assert regs == [("Test GPU A (synthetic)", "mhc", 2048)]    # the fixture's one slowed case


def test_exports():
    runs = load_runs([FIXTURE])
    rows = list(csv.DictReader(io.StringIO(publish_export.tidy_csv(runs))))
    assert len(rows) == sum(len(r.records) + len(r.not_run) for r in runs)
    assert {r["status"] for r in rows} == {"ok", "skipped", "failed", "not run"}
    assert all(r["reason"] for r in rows if r["status"] != "ok")
    entries = json.loads(publish_export.benchmark_json(runs))
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names))
    ok_per_gpu = {(r.gpu, x["case_id"]) for r in runs for x in r.records if x["status"] == "ok"}
    assert len(entries) == len(ok_per_gpu)
    assert all(e["unit"] == "ms" and e["value"] > 0 for e in entries)
    md = publish_export.markdown(runs)
    assert "| method | backend |" in md and "regression" in md and "**failed** (1)" in md


# ---------------------------------------------------------------- the site
def _hrefs(html: str) -> list[str]:
    return re.findall(r'href="([^"#]+)', html)


def _broken_links(site: Path) -> list[str]:
    bad = []
    for page in site.rglob("*.html"):
        for href in _hrefs(page.read_text()):
            if "://" in href:
                bad.append(f"{page}: external {href}")
            elif not (page.parent / href).resolve().exists():
                bad.append(f"{page}: {href}")
    return bad


def test_site_from_fixture_is_complete_linked_and_deterministic(tmp_path):
    runs = load_runs([FIXTURE])
    dashboard.build(runs, tmp_path / "a")
    dashboard.build(runs, tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    site = tmp_path / "a"
    assert _broken_links(site) == []
    for run in runs:
        for r in run.records:
            assert (site / "r" / dashboard.slug(run.run_id) / f"{dashboard.slug(r['case_id'])}.html").exists()
    model = (site / f"scenario-{dashboard.slug('sample_model')}.html").read_text()
    for section in ("plot-time", "plot-overhead", "plot-recompute"):
        assert f"<section class=\"{section}\"" in model
    assert "paper 6.7%" in model and "flags" in model
    sample = (site / f"scenario-{dashboard.slug('sample')}.html").read_text()
    for section in ("plot-time", "plot-gbps", "plot-copy", "plot-fwdbwd"):
        assert f"<section class=\"{section}\"" in sample
    assert "check failed: x_next rel err 0.2" in sample and "not run" in sample
    assert 'class="plot-hardware"' in (site / "hardware.html").read_text()
    assert "verdict-regression" in (site / "history.html").read_text()
    assert "cdn" not in (site / "index.html").read_text().lower()


@pytest.mark.skipif(not REAL, reason="no committed runs under results/")
def test_site_from_committed_h100_runs(tmp_path):
    runs = load_runs(REAL)
    dashboard.build(runs, tmp_path)
    assert _broken_links(tmp_path) == []
    text = "".join(p.read_text() for p in tmp_path.glob("scenario-*.html"))
    assert "timed out after 60 s" in text                       # the failed mHC compile cases
    assert ">liger<" in text                                    # all five backends of kernels.yaml
    assert ">tilelang<" in text
    assert "NVIDIA H100 80GB HBM3" in (tmp_path / "index.html").read_text()


# ---------------------------------------------------------------- command line
def test_publish_command_line(tmp_path, capsys):
    out = tmp_path / "site"
    assert main(["publish", str(FIXTURE / "run-a1"), str(FIXTURE / "run-a2"), "--to", str(out),
                 "--csv", str(tmp_path / "r.csv"), "--benchmark-json", str(tmp_path / "b.json")]) == 0
    assert (out / "index.html").exists() and (tmp_path / "r.csv").exists()
    assert main(["publish", str(tmp_path / "missing"), "--to", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


def test_compare_over_history(capsys):
    assert main(["compare", "--history", str(FIXTURE), "--gpu", "GPU A", "--scenario", "sample"]) == 0
    out = capsys.readouterr().out
    assert "1 regression(s)" in out
    assert main(["compare", "--history", str(FIXTURE), "--since", "2026-01-05"]) == 0
    out = capsys.readouterr().out
    assert "side by side" in out
    assert main(["compare", "--history", str(FIXTURE), "--since", "last week"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_postgres_without_psycopg_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "psycopg", None)       # import psycopg -> ImportError
    assert main(["publish", str(FIXTURE / "run-a1"), "--to", "postgresql://u@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0]
    assert main(["publish", str(FIXTURE / "run-a1"), "--to", "postgresql://nohost"]) == 2
    assert "postgresql://USER@HOST" in capsys.readouterr().err


def test_publish_error_names_the_bad_file(tmp_path):
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "records.jsonl").write_text("{not json\n")
    with pytest.raises(PublishError, match="records.jsonl: line 1"):
        load_runs([bad])


# ---------------------------------------------------------------- plot layout on real-shaped data
def test_end_labels_that_would_overlap_are_spread_within_the_plot():
    from suite.publish.svgplot import _spread
    tags = [[100.0, 0, "a"], [101.0, 0, "b"], [100.5, 0, "c"], [300.0, 0, "d"]]
    ys = [t[0] for t in _spread(tags, 20, 302)]
    assert all(b - a >= 11 - 1e-9 for a, b in zip(ys, ys[1:]))
    assert ys[0] >= 20 and ys[-1] <= 302
    crowded = _spread([[50.0, 0, i] for i in range(40)], 20, 200)   # more than fit: keep the gap
    assert crowded[0][0] == 20 and crowded[1][0] - crowded[0][0] == 11


def _step(C, layers, method="mhc", recompute="none"):
    return {"status": "ok", "time_ms": {"median": 1.0}, "case_id": f"{method}{C}{layers}{recompute}",
            "case": {"scope": "model", "op": "site", "mode": "fwd+bwd", "T": 4096, "dtype": "bf16",
                     "C": C, "layers": layers, "n": 4, "method": method, "backend": "triton",
                     "recompute": recompute}}


def test_layers_that_follow_the_width_do_not_split_the_panels():
    overhead_like = [_step(1280, 12), _step(4096, 6), _step(7168, 2), _step(7168, 2, "hc")]
    panels = dashboard._panels(overhead_like)
    assert len(panels) == 1 and panels[0][0].endswith("L by C")
    recompute_like = [_step(2560, 12), _step(2560, 30)]          # same width, two depths
    assert sorted(t for t, _ in dashboard._panels(recompute_like)) == [
        "model · fwd+bwd · n=4 · L=12", "model · fwd+bwd · n=4 · L=30"]


def test_compare_across_the_history_sees_committed_folders_beside_a_local_history(tmp_path, capsys):
    """A local run creates results/history.sqlite; the committed H100 folders beside it still
    count (the folders are the truth, the history an index)."""
    import shutil
    from suite import cli
    results = tmp_path / "results"
    results.mkdir()
    shutil.copytree(ROOT / "results" / "20261124T075707Z-vm-h100-80gb-hbm3",
                    results / "20261124T075707Z-vm-h100-80gb-hbm3")
    scen = tmp_path / "s.yaml"
    scen.write_text("name: s\ndefaults: {device: cpu, dtype: fp32, backend: torch, n: 2, C: 64, T: 32,"
                    " mode: fwd, warmup_ms: 1, rep_ms: 2}\nsweep: {method: [mhc]}\n")
    assert cli.main(["run", str(scen), "--out", str(results)]) == 0
    assert (results / "history.sqlite").is_file()
    capsys.readouterr()
    assert cli.main(["compare", "--gpu", "H100", "--history", str(results)]) == 0
    out = capsys.readouterr().out
    assert "1 runs from" in out and "no run in" not in out


def test_publish_refuses_a_folder_it_did_not_write_and_replaces_its_own_whole(tmp_path, capsys):
    """publish --to never empties a folder of someone else's files; a site it rebuilds keeps none
    of the earlier build's pages but every file a user put into it; nothing outside the folder is
    written."""
    from suite import cli
    theirs = tmp_path / "theirs"
    (theirs / "runs").mkdir(parents=True)
    (theirs / "runs" / "mine.txt").write_text("keep\n")
    (theirs / "scenario-notes.html").write_text("keep\n")
    assert cli.main(["publish", str(FIXTURE), "--to", str(theirs)]) == 2
    assert "not a site this suite wrote" in capsys.readouterr().err
    assert (theirs / "runs" / "mine.txt").read_text() == "keep\n"
    assert (theirs / "scenario-notes.html").read_text() == "keep\n"
    site = tmp_path / "site"
    assert cli.main(["publish", str(FIXTURE), "--to", str(site)]) == 0
    stale = {p.relative_to(site) for p in (site / "runs").iterdir() if "a2" in p.name}
    assert stale
    (site / "notes.html").write_text("mine\n")
    assert cli.main(["publish", str(FIXTURE / "run-a1"), "--to", str(site)]) == 0
    assert not any((site / p).exists() for p in stale) and (site / dashboard.MARKER).is_file()
    assert (site / "notes.html").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".site.lock", "site", "theirs"]


def test_record_fields_never_become_paths_outside_the_site():
    for text in ("../../etc/passwd", "a/b", "x" * 500, ""):
        name = dashboard.slug(text)
        assert "/" not in name and ".." not in name and len(name) <= 41
    assert dashboard.slug("a/b") != dashboard.slug("a-b")
