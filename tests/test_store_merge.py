"""suite.store.runs.merge_run_copies: copies of a run folder resumed in separate calls fold back in."""
import json
import subprocess
import sys
from pathlib import Path

from suite.store.runs import merge_run_copies, read_records, write_json

ROOT = Path(__file__).resolve().parent.parent


def _folder(path: Path, records: list[dict], cases: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "records.jsonl").write_text("".join(json.dumps({"case": {}, **r}) + "\n" for r in records))
    write_json(path / "scenarios" / "kernels.json", {"path": "k.yaml", "name": "k", "cases": cases})
    return path


def test_merge_adds_new_cases_and_upgrades_failures_only(tmp_path):
    base = _folder(tmp_path / "run", [{"case_id": "a", "status": "ok", "t": 1},
                                      {"case_id": "b", "status": "failed", "t": None}],
                   [{"C": 1}, {"C": 2}])
    c1 = _folder(tmp_path / "c1", [{"case_id": "a", "status": "ok", "t": 9},      # kept: base is ok
                                   {"case_id": "b", "status": "ok", "t": 2},      # replaces the failure
                                   {"case_id": "c", "status": "ok", "t": 3}],     # new
                 [{"C": 1}, {"C": 3}])
    c2 = _folder(tmp_path / "c2", [{"case_id": "d", "status": "skipped", "t": None}], [{"C": 4}])
    assert merge_run_copies(base, [c1, c2]) == (2, 1)
    got = {r["case_id"]: r for r in read_records(base)}
    assert got["a"]["t"] == 1 and got["b"]["t"] == 2 and set(got) == {"a", "b", "c", "d"}
    cases = json.loads((base / "scenarios" / "kernels.json").read_text())["cases"]
    assert cases == [{"C": 1}, {"C": 2}, {"C": 3}, {"C": 4}]


def test_merge_command_names_a_folder_without_records(tmp_path):
    base = _folder(tmp_path / "run", [{"case_id": "a", "status": "ok"}], [])
    (tmp_path / "empty").mkdir()
    out = subprocess.run([sys.executable, str(ROOT / "harness.py"), "merge", str(base),
                          str(tmp_path / "empty")], capture_output=True, text=True)
    assert out.returncode == 2 and "empty: no records.jsonl" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    copy = _folder(tmp_path / "copy", [{"case_id": "b", "status": "ok"}], [])
    out = subprocess.run([sys.executable, str(ROOT / "harness.py"), "merge", str(base), str(copy)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "1 records added" in out.stdout


def test_merge_brings_the_history_beside_the_folder_up_to_date(tmp_path):
    import sqlite3
    base = _folder(tmp_path / "run", [{"case_id": "a", "status": "ok", "t": 1}], [{"C": 1}])
    (base / "env.json").write_text(json.dumps({"gpus": [{"name": "GPU X"}], "host": "h"}))
    copy = _folder(tmp_path / "c1", [{"case_id": "b", "status": "ok", "t": 2}], [{"C": 2}])
    merge_run_copies(base, [copy])
    con = sqlite3.connect(tmp_path / "history.sqlite")
    try:
        ids = sorted(r[0] for r in con.execute("SELECT case_id FROM records WHERE run_id = 'run'"))
        runs = con.execute("SELECT gpu FROM runs WHERE run_id = 'run'").fetchall()
    finally:
        con.close()
    assert ids == ["a", "b"] and runs == [("GPU X",)]
