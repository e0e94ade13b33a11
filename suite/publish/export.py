"""Exports of published runs: tidy CSV, github-action-benchmark JSON and Markdown tables.

Tidy CSV: one row per record (and per saved case that has no record, status "not run"); a column
is empty where the record lacks the field. github-action-benchmark: the customSmallerIsBetter
format, one entry per case (the newest ok record of each case on each GPU model), value = median
ms, range = the p10-p90 spread.
"""
from __future__ import annotations

import csv
import io
import json

from suite.analysis.regression import RULE
from suite.core import record as record_schema
from suite.publish.published import Run, history, latest_per_gpu
from suite.report.tables import case_label, reasons, rows

CSV_COLUMNS = ("run_id", "gpu", "run_started_utc") + record_schema.NAMES


def _row(run: Run, r: dict, status: str | None = None) -> dict:
    row = record_schema.flat(r)
    if status:
        row["status"] = status
    row["copy_gbps"] = row["copy_gbps"] or run.copy_gbps
    return {"run_id": run.run_id, "gpu": run.gpu, "run_started_utc": run.started, **row}


def tidy_rows(runs: list[Run]) -> list[dict]:
    out = []
    for run in runs:
        for r in sorted(run.records, key=lambda r: r["case_id"]):
            out.append(_row(run, r))
        for c in run.not_run:
            out.append(_row(run, {**c, "reason": "listed in the run's scenarios, no record"}, "not run"))
    return out


def tidy_csv(runs: list[Run]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in tidy_rows(runs):
        w.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def case_name(r: dict) -> str:
    return case_label(r)


def benchmark_entries(runs: list[Run]) -> list[dict]:
    """github-action-benchmark customSmallerIsBetter: [{name, unit, value, range, extra}]."""
    out = []
    latest = latest_per_gpu(runs)
    for gpu in sorted(latest):
        for cid in sorted(latest[gpu]):
            run, r = latest[gpu][cid]
            t = r["time_ms"]
            extra = [f"case {cid}", f"run {run.run_id}", f"cv {100 * t.get('cv', 0):.1f}%"]
            if r.get("gbps") is not None:
                extra.append(f"{r['gbps']:.0f} GB/s")
            if r.get("pct_of_copy") is not None:
                extra.append(f"{r['pct_of_copy']:.1f}% of copy")
            out.append({"name": f"{gpu} | {case_name(r)} [{cid}]", "unit": "ms",
                        "value": round(t["median"], 6),
                        "range": f"{t.get('p10', t['median']):.4g}-{t.get('p90', t['median']):.4g}",
                        "extra": "; ".join(extra)})
    return out


def benchmark_json(runs: list[Run]) -> str:
    return json.dumps(benchmark_entries(runs), indent=1) + "\n"


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    esc = [[str(c).replace("|", "/") for c in row] for row in body]
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(row) + " |" for row in esc])


def markdown(runs: list[Run]) -> str:
    """Per run and scenario the report's table, then the history's verdicts, for pasting in reviews."""
    lines = ["# Published runs", ""]
    for run in runs:
        copy = f", copy {run.copy_gbps:.0f} GB/s" if run.copy_gbps else ""
        lines += [f"## {run.run_id} ({run.gpu}{copy}, started {run.started})", ""]
        for sc in run.scenarios:
            recs = [r for r in run.records if (r.get("scenario") or "unnamed") == sc]
            if not recs:
                continue
            header, body = rows(recs)
            lines += [f"### {sc}", ""] + _md_table(header, body) + [""]
            for (status, why), rs in reasons(recs).items():
                lines.append(f"- **{status}** ({len(rs)}): {why}")
            missing = [c for c in run.not_run if (c.get("scenario") or "unnamed") == sc]
            if missing:
                lines.append(f"- **not run** ({len(missing)}): listed in the run's scenarios, no record")
            lines.append("")
    hist = history(runs)
    judged = [(g, cid, p) for g, cases in sorted(hist.items()) for cid, pts in sorted(cases.items())
              for p in pts if p.baseline is not None]
    if judged:
        lines += ["## History: each run against the runs before it (same GPU model)", "", RULE, ""]
        body = [[g, case_name(p.record), p.run_id, f"{p.median:.4g}", f"{p.baseline:.4g}",
                 f"{p.change_pct:+.1f}", f"{p.band[0]:.4g}-{p.band[1]:.4g}",
                 "" if p.z is None else f"{p.z:+.1f}",
                 "; ".join((p.verdict,) + p.env_change
                           + ((f"code {p.code_change}",) if p.code_change else ()))]
                for g, cid, p in judged]
        lines += _md_table(["gpu", "case", "run", "median ms", "earlier median ms", "change %",
                            "noise band ms", "z", "verdict"], body) + [""]
    return "\n".join(lines) + "\n"
