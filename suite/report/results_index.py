"""The index of committed run folders in docs/results.md, made from the folders themselves.

`harness.py results-doc` rewrites the block between BEGIN and END in docs/results.md: one row per
run folder committed under results/ (a folder whose records.jsonl git tracks; every run folder
where there is no git), with its GPU, copy rate, scenarios, case counts and start date, and
whether it is the newest run of its scenarios on its GPU model (the reference run).
`--check` only compares, so CI can fail when the page drifts from the records.
"""
from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

from suite.store.runs import read_env, read_records

BEGIN = "<!-- BEGIN runs index: written by `python harness.py results-doc`; do not edit -->"
END = "<!-- END runs index -->"


def committed_runs(results: Path) -> list[Path]:
    """Run folders under `results` whose records.jsonl is committed (all of them without git)."""
    results = Path(results)
    try:
        out = subprocess.run(["git", "-C", str(results), "ls-files", "--", "."],
                             capture_output=True, text=True, timeout=30)
        tracked = out.stdout.splitlines() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        tracked = None
    if tracked is None:
        return sorted(p.parent for p in results.glob("*/records.jsonl"))
    names = {Path(t).parts[0] for t in tracked if Path(t).name == "records.jsonl"
             and len(Path(t).parts) == 2}
    return sorted(results / n for n in names)


def _row(run: Path) -> dict:
    env = read_env(run)
    records = read_records(run)
    gpus = env.get("gpus") or []
    copy = (env.get("copy_rate") or {}).get("cuda" if gpus else "cpu") or {}
    status = Counter(r.get("status") for r in records)
    started = min((r.get("started_utc") or "" for r in records), default="")
    return {"run": run.name, "gpu": gpus[0].get("name") if gpus else "CPU",
            "copy": copy.get("gbps"), "scenarios": sorted({r.get("scenario") or "?"
                                                           for r in records}),
            "ok": status.get("ok", 0), "skipped": status.get("skipped", 0),
            "failed": status.get("failed", 0), "total": len(records), "started": started[:10]}


def lines(results: Path) -> list[str]:
    rows = [_row(run) for run in committed_runs(results)]
    newest: dict[tuple, str] = {}
    for row in sorted(rows, key=lambda r: r["run"]):
        newest[(row["gpu"], tuple(row["scenarios"]))] = row["run"]
    out = [BEGIN, "",
           "| run folder | GPU | copy GB/s | scenarios | ok / skipped / failed of cases | started "
           "| newest of its scenarios on this GPU |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        copy = "" if row["copy"] is None else f"{row['copy']:.0f}"
        ref = "yes" if newest[(row["gpu"], tuple(row["scenarios"]))] == row["run"] else ""
        out.append(f"| `results/{row['run']}` | {row['gpu']} | {copy} | "
                   f"{', '.join(row['scenarios'])} | {row['ok']} / {row['skipped']} / "
                   f"{row['failed']} of {row['total']} | {row['started']} | {ref} |")
    return out + ["", END]


def render(doc_text: str, results: Path) -> str:
    """The page with its block replaced (put before its first section when missing)."""
    block = "\n".join(lines(results))
    if BEGIN in doc_text and END in doc_text:
        head, rest = doc_text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    cut = doc_text.find("\n## ")
    cut = len(doc_text) if cut < 0 else cut + 1
    return doc_text[:cut] + "## Committed runs\n\n" + block + "\n\n" + doc_text[cut:]
