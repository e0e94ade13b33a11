"""`harness.py publish` and the history side of `harness.py compare`.

publish: run folders -> a static site (suite/publish/dashboard.py) or PostgreSQL (suite/publish/postgres.py),
plus the stand-alone exports (tidy CSV, github-action-benchmark JSON, Markdown) where asked.
compare over the history: the runs of history.sqlite (or a folder of run folders), filtered by
GPU model, start date and scenario; GPU models side by side as ratios, and each case's newest run
against the median of its previous runs on the same GPU model (suite/publish/published.py's rule).
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from suite.publish import dashboard, export as publish_export, postgres as publish_pg
from suite.analysis import regression
from suite.publish.published import (PublishError, Point, Run, filter_runs, hardware, history,
                                     load_history, load_runs, newest_regressions)
from suite.store.runs import atomic_write


def regression_lines(found: list[tuple[str, str, Point]]) -> list[str]:
    """One line per regression, for `--fail-on-regression`."""
    return [f"{gpu} | {publish_export.case_name(p.record)} [{cid}]: {p.median:.4g} ms in "
            f"{p.run_id}, {regression.describe(_judgement(p), p.median)}"
            + (f", code {p.code_change}" if p.code_change else "") for gpu, cid, p in found]


def _judgement(p: Point) -> regression.Judgement:
    return regression.Judgement(p.verdict, p.baseline, p.band, p.z, p.env_change)


def publish(run_dirs: list[Path], to: str, console: Console, csv: Path | None = None,
            benchmark_json: Path | None = None, markdown: Path | None = None,
            pct: float = regression.REGRESSION_PCT) -> list[str]:
    """Writes the site (or the database) and the exports; returns the newest runs' regressions."""
    runs = load_runs(run_dirs)
    if not runs:
        raise PublishError("publish: no run folder given")
    for path, text in ((csv, publish_export.tidy_csv), (benchmark_json, publish_export.benchmark_json),
                       (markdown, publish_export.markdown)):
        if path:
            atomic_write(Path(path), text(runs))
            console.print(f"wrote {path}")
    if to.startswith(("postgresql://", "postgres://")):
        counts = publish_pg.publish(to, runs)
        console.print(f"published {counts['runs']} runs and {counts['records']} records to "
                      f"{publish_pg.redact(to)} ({counts['new_records']} new)", soft_wrap=True)
        return regression_lines(newest_regressions(runs, pct))
    if "://" in to:
        raise PublishError(f"--to {publish_pg.redact(to)}: give a folder or a postgresql://USER@HOST/DB address")
    files = dashboard.build(runs, Path(to))
    found = newest_regressions(runs, pct)
    console.print(f"dashboard: {Path(to) / 'index.html'} ({len(files)} files, {len(runs)} runs, "
                  f"{len(found)} regression(s) in the newest runs)", soft_wrap=True)
    return regression_lines(found)


def _check_since(since: str | None) -> None:
    if since is None:
        return
    try:
        dt.date.fromisoformat(since[:10])
    except ValueError:
        raise PublishError(f"--since {since}: not a date; give YYYY-MM-DD") from None


def history_runs(source: Path) -> list[Run]:
    """Runs from a history.sqlite, or from a folder (e.g. results/): its run folders and the runs
    of its history.sqlite together. The folders are the truth (a run in both is read from its
    folder); the history adds the runs whose folders are elsewhere."""
    source = Path(source)
    if source.is_file():
        return load_history(source)
    db = source / "history.sqlite"
    folders = [d for d in sorted(source.iterdir()) if (d / "records.jsonl").exists()] \
        if source.is_dir() else []
    if not folders and not db.is_file():
        return load_runs([source])          # the one error message for a folder without runs
    runs = {r.run_id: r for r in (load_history(db) if db.is_file() else [])}
    runs.update({r.run_id: r for r in load_runs(folders)} if folders else {})
    return sorted(runs.values(), key=lambda r: (r.started, r.run_id))


def compare_history(source: Path | list[Path], gpu: list[str], since: str | None, scenario: list[str],
                    console: Console, pct: float = regression.REGRESSION_PCT) -> list[str]:
    """source: the history (a file or folder), or a list of run folders to compare. Returns the
    newest runs' regressions, one line each."""
    _check_since(since)
    found = load_runs(source) if isinstance(source, list) else history_runs(source)
    runs = filter_runs(found, gpu, since, scenario)
    if isinstance(source, list):
        source = " ".join(str(s) for s in source)
    what = ", ".join(x for x in ([f"gpu ~ {'|'.join(gpu)}"] if gpu else []) + (
        [f"since {since}"] if since else []) + ([f"scenario {'|'.join(scenario)}"] if scenario else []))
    if not runs:
        console.print(f"no run in {source} matches ({what or 'no filter'})")
        return []
    console.print(f"{len(runs)} runs from {source}" + (f" ({what})" if what else ""), highlight=False)
    gpus, rows = hardware(runs)
    if len(gpus) > 1:
        ref = gpus[0]
        t = Table(title=f"GPU models side by side: time / time on {ref} (newest ok record of each case)")
        t.add_column("case")
        for g in gpus:
            t.add_column(f"{g} ms", justify="right")
        for g in gpus[1:]:
            t.add_column(f"{g} / ref", justify="right")
        for row in rows:
            first = next(iter(row["per_gpu"].values()))[1]
            t.add_row(publish_export.case_name(first),
                      *[f"{row['per_gpu'][g][1]['time_ms']['median']:.4g}" if g in row["per_gpu"] else ""
                        for g in gpus],
                      *[f"{row['ratio'][g]:.3f}" if row["ratio"].get(g) is not None else "" for g in gpus[1:]])
        console.print(t)
        console.print(f"{len(rows)} cases on at least two GPU models")
    hist = history(runs, pct)
    for g, cases in sorted(hist.items()):
        judged = {cid: pts for cid, pts in cases.items() if len(pts) > 1}
        if not judged:
            console.print(f"{g}: {len(cases)} cases, none in more than one run", highlight=False)
            continue
        t = Table(title=f"{g}: newest run of each case against its earlier runs (regression: "
                        f"> {pct:g}% slower, above the p10-p90 noise band and, with "
                        f"{regression.Z_MIN_RUNS}+ earlier runs, z > {regression.Z_LIMIT})")
        for h in ("case", "runs", "newest run", "median ms", "earlier ms", "change %", "band ms",
                  "z", "verdict"):
            t.add_column(h, justify="left" if h in ("case", "newest run", "verdict") else "right",
                         no_wrap=h == "case", overflow="fold")
        for cid, pts in sorted(judged.items(), key=lambda kv: publish_export.case_name(kv[1][-1].record)):
            p = pts[-1]
            style = {"regression": "red", "improvement": "green"}.get(p.verdict)
            verdict = p.verdict + "".join(f"; {c}" for c in p.env_change) + (
                f"; code {p.code_change}" if p.code_change else "")
            t.add_row(escape(publish_export.case_name(p.record)), str(len(pts)), p.run_id,
                      f"{p.median:.4g}", f"{p.baseline:.4g}", f"{p.change_pct:+.1f}",
                      f"{p.band[0]:.4g}-{p.band[1]:.4g}", "" if p.z is None else f"{p.z:+.1f}",
                      escape(verdict), style=style)
        console.print(t)
    found = newest_regressions(runs, pct)
    console.print(f"{len(found)} regression(s) in the newest runs")
    return regression_lines(found)
