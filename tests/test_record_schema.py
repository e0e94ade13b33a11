"""One flat projection of the record (suite/core/record.py) for SQLite, PostgreSQL and CSV, and
docs/records.md listing exactly its columns."""
import json
import re
import sqlite3
from pathlib import Path

from suite.core import record as rs
from suite.publish import export as publish_export, postgres as publish_pg
from suite.store.runs import History

ROOT = Path(__file__).resolve().parent.parent


def _record(**kw):
    base = {"schema": rs.SCHEMA, "case_id": "abc", "scenario": "s", "status": "ok",
            "case": {"method": "mhc", "C": 64, "T": 8, "scope": "model", "family": "deepseek",
                     "accum": 2, "parallel": None},
            "time_ms": {"median": 1.5, "p10": 1.4, "p90": 1.6, "cv": 0.01, "n": 20, "b2b_ms": 1.7},
            "device": {"step_ms": 1.2}, "bound": "host", "code": {"commit": "f" * 40,
                                                                   "dirty": False},
            "kernel_settings": {"HCBENCH_MHC_PRE_BT": "8"}, "flags": ["high_cv"]}
    base.update(kw)
    return base


def test_flat_has_every_column_and_reads_nested_fields():
    row = rs.flat(_record())
    assert tuple(row) == rs.NAMES
    assert row["family"] == "deepseek" and row["accum"] == 2 and row["b2b_ms"] == 1.7
    assert row["device_step_ms"] == 1.2 and row["code_commit"] == "f" * 40
    assert json.loads(row["kernel_settings"]) == {"HCBENCH_MHC_PRE_BT": "8"}
    assert row["flags"] == "high_cv"
    bare = rs.flat({"case_id": "x", "status": "skipped", "case": {}})
    assert bare["scope"] == "site" and bare["median_ms"] is None and bare["kernel_settings"] is None


def test_every_flat_copy_uses_the_same_columns():
    assert History.RECORD_COLUMNS == ("run_id",) + rs.NAMES + ("record",)
    assert publish_pg.RECORD_COLUMNS == ("run_id",) + tuple(n.lower() for n in rs.NAMES) + (
        "record",)
    assert publish_export.CSV_COLUMNS == ("run_id", "gpu", "run_started_utc") + rs.NAMES


def test_an_old_history_is_rebuilt_from_its_json(tmp_path):
    path = tmp_path / "history.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE records (run_id TEXT NOT NULL, case_id TEXT NOT NULL, status TEXT, "
                "median_ms REAL, record TEXT, PRIMARY KEY (run_id, case_id))")
    con.execute("INSERT INTO records VALUES (?,?,?,?,?)",
                ("run1", "abc", "ok", 1.5, json.dumps(_record())))
    con.commit()
    con.close()
    History(path).add_record("run2", _record(case_id="def"))
    con = sqlite3.connect(path)
    cols = [r[1] for r in con.execute("PRAGMA table_info(records)")]
    rows = con.execute('SELECT run_id, case_id, family, b2b_ms FROM records ORDER BY run_id').fetchall()
    con.close()
    assert tuple(cols) == History.RECORD_COLUMNS
    assert rows == [("run1", "abc", "deepseek", 1.7), ("run2", "def", "deepseek", 1.7)]


def test_docs_records_lists_exactly_the_flat_columns():
    text = (ROOT / "docs" / "records.md").read_text()
    section = text.split("## Flat columns", 1)[1].split("\n## ", 1)[0]
    listed = tuple(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))
    assert listed == rs.NAMES


def test_records_with_kernel_knobs_never_join_default_ones_across_runs():
    from suite.publish.published import Run, history, latest_per_gpu
    plain = _record(kernel_settings={})
    tuned = _record(kernel_settings={"HCBENCH_MHC_PRE_BT": "8"})
    assert rs.join_key(plain) == "abc" and rs.join_key(tuned).startswith("abc+k")
    env = {"gpus": [{"name": "NVIDIA H100"}], "captured_utc": "2026-12-07T00:00:00+00:00"}
    runs = [Run("r1", env, [plain], "r1"), Run("r2", env, [tuned], "r2")]
    (cases,) = history(runs).values()
    assert sorted(map(len, cases.values())) == [1, 1]     # two series, no regression between
    (latest,) = latest_per_gpu(runs).values()
    assert set(latest) == {"abc", rs.join_key(tuned)}
