"""dashboards/hcbench-grafana.json and the series labels suite/publish/postgres.py writes, checked
without a server: Grafana quotes every template variable the SQL uses, and no two cases share a
label. tests/test_publish_pg.py runs the same panels against a real PostgreSQL."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from suite.core import record as record_schema
from suite.core.scenario import Case
from suite.publish import postgres as publish_pg
from suite.publish.published import load_runs

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "publish"
BOARD = ROOT / "dashboards" / "hcbench-grafana.json"
DISTRIBUTED = ("gpus", "parallel", "overlap", "microbatches")

_VARIABLE = re.compile(r"(['\"]?)(\$\{([^}]*)\}|\[\[([^\]]*)\]\]|\$(\w+))")


def board_queries(board: dict) -> list[tuple[str, str]]:
    """(where, SQL) for every panel target and every query variable of the board."""
    out = [(f"panel {p['id']} {p['title']!r}", t["rawSql"]) for p in board["panels"]
           for t in p.get("targets", []) if "rawSql" in t]
    out += [(f"variable {v['name']}", v["query"]) for v in board["templating"]["list"]
            if v["type"] == "query"]
    return out


def unquoted_variables(sql: str) -> list[str]:
    """Template variable uses in `sql` that Grafana does not quote as SQL strings: anything but a
    bare ${name:sqlstring} (each value single-quoted, quotes doubled) and the $__ macros."""
    bad = []
    for m in _VARIABLE.finditer(sql):
        quote, whole, braced, _, bare = m.groups()
        if bare is not None and bare.startswith("__") and not quote:
            continue
        if braced is not None and re.fullmatch(r"\w+:sqlstring", braced) and not quote:
            continue
        bad.append(quote + whole)
    return bad


def distributed_records() -> list[dict]:
    """Records of cases that differ from each other only in the distributed fields, or only in
    their kernel settings, built from the fixture's model-scope and site records."""
    runs = {r.run_id: r for r in load_runs([FIXTURE])}
    model = next(r for r in runs["run-b2-model"].records if r["status"] == "ok")
    site = next(r for r in runs["run-a1"].records if r["status"] == "ok")
    variants = [(model, dict(gpus=2, parallel="data", overlap="none")),
                (model, dict(gpus=2, parallel="data", overlap="priority")),
                (model, dict(gpus=4, parallel="data", overlap="none")),
                (model, dict(gpus=2, parallel="pipeline", microbatches=4, overlap="none")),
                (model, dict(gpus=2, parallel="pipeline", microbatches=8, overlap="none")),
                (model, dict(gpus=2, parallel="pipeline", microbatches=4, overlap="stream")),
                (model, dict(gpus=4, parallel="pipeline", microbatches=4, overlap="none")),
                (site, dict(gpus=1, parallel="p2p")),
                (site, dict(gpus=2, parallel="p2p")),
                (site, dict(gpus=4, parallel="p2p"))]
    out = []
    for base, fields in variants:
        rec = copy.deepcopy(base)
        rec["case"].update(fields)
        rec["case_id"] = Case(**rec["case"]).case_id
        out.append(rec)
    tuned = copy.deepcopy(out[0])           # same case id, other kernel settings: another case
    tuned["kernel_settings"] = {"HCBENCH_MHC_PRE_BT": "8"}
    return out + [tuned]


def test_every_template_variable_in_the_sql_is_quoted_by_grafana():
    for sql in ("u.gpu IN ($gpu)", "u.gpu = '$gpu'", "u.gpu IN (${gpu})", "u.gpu = '${gpu}'",
                "u.gpu IN ([[gpu]])", "u.gpu IN (${gpu:raw})", "u.gpu IN ('${gpu:sqlstring}')",
                "u.gpu IN (${gpu:csv})"):
        assert unquoted_variables(sql), sql         # the check sees each unsafe form
    assert not unquoted_variables("u.gpu IN (${gpu:sqlstring}) AND $__timeFilter(u.started_utc)")
    board = json.loads(BOARD.read_text())
    bad = {where: unquoted_variables(sql) for where, sql in board_queries(board)
           if unquoted_variables(sql)}
    assert not bad, bad


def test_series_labels_name_every_case_field_and_tell_cases_apart():
    """The same label never stands for two cases (gpu and join key), the label without its id
    already tells them apart, one case keeps one label over runs, and the distributed fields and
    kernel settings are named."""
    pairs = [(run.gpu, r) for run in load_runs([FIXTURE]) for r in run.records]
    pairs += [("Test GPU D (synthetic)", r) for r in distributed_records()]
    cases_of, readable_of, labels_of = {}, {}, {}
    for gpu, r in pairs:
        key = (gpu, record_schema.join_key(r))
        label = publish_pg.series_label(r)
        cases_of.setdefault(f"{gpu} {label}", set()).add(key)
        readable_of.setdefault(f"{gpu} {label.rsplit(' #', 1)[0]}", set()).add(key)
        labels_of.setdefault(key, set()).add(label)
    assert len({k for keys in cases_of.values() for k in keys}) > 50
    assert all(len(keys) == 1 for keys in cases_of.values()), cases_of
    assert all(len(keys) == 1 for keys in readable_of.values()), readable_of
    assert all(len(labels) == 1 for labels in labels_of.values()), labels_of
    for r in distributed_records():
        label = publish_pg.series_label(r)
        for field in DISTRIBUTED:
            if r["case"].get(field) is not None:
                assert f"{field}={r['case'][field]}" in label, (field, label)
        for knob, value in (r.get("kernel_settings") or {}).items():
            assert f"{knob}={value}" in label
    site = pairs[0][1]
    label = publish_pg.series_label(site)
    for field in ("C", "T", "n", "dtype", "mode", "scope", "op", "sinkhorn_iters", "gpus"):
        assert f"{field}={site['case'][field]}" in label, (field, label)
