"""An interrupted run's terminal summary and report.md say how many saved cases have no record
and how to run them."""
import io
import json
import shutil
from pathlib import Path

from rich.console import Console

from suite.report.tables import markdown, print_run

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "publish" / "run-a1"   # saves 36 cases, 35 have a record


def _cut(tmp_path: Path, drop: int) -> Path:
    """run-a1 as an interrupted run would leave it: its last `drop` records never written."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    lines = (run / "records.jsonl").read_text().splitlines()
    (run / "records.jsonl").write_text("\n".join(lines[:len(lines) - drop]) + "\n")
    return run


def _terminal(run: Path) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    print_run(run, console)
    return console.export_text()


def test_interrupted_run_says_how_many_cases_were_not_run(tmp_path):
    run = _cut(tmp_path, 3)
    hint = f"4 cases not run (interrupted; `python harness.py run --resume {run}` runs them)"
    assert hint in " ".join(_terminal(run).split())
    assert hint in markdown(run)


def test_one_case_not_run_and_none(tmp_path):
    assert "1 case not run (interrupted;" in markdown(FIXTURE)
    run = _cut(tmp_path, 0)
    saved = run / "scenarios" / "sample.json"
    doc = json.loads(saved.read_text())
    assert (doc["cases"][-1]["method"], doc["cases"][-1]["backend"]) == ("mhc", "triton")
    doc["cases"] = doc["cases"][:-1]     # the case without a record (make_fixture.py), unlisted
    saved.write_text(json.dumps(doc))
    assert "not run" not in markdown(run) and "not run" not in _terminal(run)


def test_a_run_folder_without_saved_scenarios_reports_as_before(tmp_path):
    run = _cut(tmp_path, 0)
    shutil.rmtree(run / "scenarios")
    assert "not run" not in markdown(run)
    assert "33 ok, 1 skipped, 1 failed of 35 cases" in markdown(run)
