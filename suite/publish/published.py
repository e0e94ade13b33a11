"""What publishing works on: runs read from run folders or history.sqlite, and the rules built on them.

- `Run`: one run's records, environment, GPU model and start time, plus the cases its saved
  scenarios list that have no record (shown as "not run", never dropped).
- `history`: each case's medians over runs on the same GPU model, in time order, with the
  regression rule applied to each run against the runs before it.
- `hardware`: the same case ids on different GPU models, as time ratios to a reference GPU.

The regression rule is suite/analysis/regression.py's, the one definition used everywhere.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from suite.core import record as record_schema
from suite.analysis import regression
from suite.store.runs import device_model, not_run, read_env, read_records



@dataclass
class Run:
    run_id: str
    env: dict
    records: list[dict]
    path: str = ""
    not_run: list[dict] = field(default_factory=list)   # saved cases without a record

    @property
    def gpu(self) -> str:
        return gpu_model(self.env)

    @property
    def is_cpu(self) -> bool:
        """A run whose environment names no GPU (a CPU smoke run): it has no GPU model to join, so
        it stays out of GPU tables, hardware ratios, the history and the regression gate."""
        return not ((self.env.get("gpus") or [{}])[0] or {}).get("name")

    @property
    def started(self) -> str:
        """When the run began: its earliest record, else the environment's capture time."""
        stamps = [r["started_utc"] for r in self.records if r.get("started_utc")]
        return min(stamps) if stamps else (self.env.get("captured_utc") or "")

    @property
    def copy_gbps(self) -> float | None:
        rates = self.env.get("copy_rate") or {}
        rate = rates.get("cuda") or next(iter(rates.values()), None)
        return rate.get("gbps") if rate else None

    @property
    def scenarios(self) -> list[str]:
        names = {r.get("scenario") or "unnamed" for r in self.records}
        names |= {c.get("scenario") or "unnamed" for c in self.not_run}
        return sorted(names)

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "skipped": 0, "failed": 0, "not run": len(self.not_run)}
        for r in self.records:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out


gpu_model = device_model


class PublishError(Exception):
    """Bad input to publish: one line naming the path and what is wrong."""


def load_run_dir(path: Path) -> Run:
    path = Path(path)
    if not (path / "records.jsonl").exists():
        raise PublishError(f"{path}: not a run folder (no records.jsonl)")
    try:
        records = read_records(path)
    except ValueError as exc:
        raise PublishError(str(exc)) from None
    try:
        env = read_env(path)
    except ValueError as exc:
        raise PublishError(str(exc)) from None
    return Run(path.name, env, records, str(path), not_run(path, records))


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run folders as given; a folder holding run folders (e.g. results/) stands for all of them."""
    out = []
    for p in paths:
        p = Path(p)
        if (p / "records.jsonl").exists():
            out.append(p)
        elif p.is_dir():
            inner = sorted(d for d in p.iterdir() if (d / "records.jsonl").exists())
            if not inner:
                raise PublishError(f"{p}: neither a run folder nor a folder of run folders "
                                   "(no records.jsonl)")
            out += inner
        else:
            raise PublishError(f"{p}: no such folder")
    return out


def load_runs(paths: list[Path]) -> list[Run]:
    runs = [load_run_dir(p) for p in expand_run_dirs(paths)]
    ids = [r.run_id for r in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PublishError(f"run folder given twice: {dup[0]}")
    return sorted(runs, key=lambda r: (r.started, r.run_id))


def load_history(db: Path) -> list[Run]:
    """Every run in a history.sqlite (suite/store/runs.py), records from their stored JSON."""
    db = Path(db)
    if not db.exists():
        raise PublishError(f"{db}: no such history database")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        runs = {rid: Run(rid, json.loads(env or "{}"), [], path or "")
                for rid, env, path in con.execute("SELECT run_id, env, path FROM runs")}
        for rid, rec in con.execute("SELECT run_id, record FROM records ORDER BY run_id, case_id"):
            runs.setdefault(rid, Run(rid, {}, [])).records.append(json.loads(rec))
    except sqlite3.DatabaseError as exc:
        raise PublishError(f"{db}: not a history database ({exc})") from None
    finally:
        con.close()
    return sorted(runs.values(), key=lambda r: (r.started, r.run_id))


def filter_runs(runs: list[Run], gpu: list[str] | None = None, since: str | None = None,
                scenario: list[str] | None = None) -> list[Run]:
    """Runs on a GPU whose model contains one of `gpu` (case-insensitive), started on or after
    `since` (ISO date), keeping only the records of the named scenarios."""
    out = []
    for run in runs:
        if gpu and not any(g.lower() in run.gpu.lower() for g in gpu):
            continue
        if since and run.started[:len(since)] < since:
            continue
        if scenario:
            keep = set(scenario)
            run = Run(run.run_id, run.env, [r for r in run.records if r.get("scenario") in keep],
                      run.path, [c for c in run.not_run if c.get("scenario") in keep])
            if not run.records and not run.not_run:
                continue
        out.append(run)
    return out


# ---------------------------------------------------------------- history and regressions
def _ok(r: dict) -> bool:
    return r.get("status") == "ok" and bool(r.get("time_ms")) and r["time_ms"].get("median") is not None


@dataclass
class Point:
    run_id: str
    started: str
    record: dict
    median: float
    p10: float
    p90: float
    baseline: float | None = None     # median of the earlier medians it was judged against
    band: tuple[float, float] | None = None
    verdict: str = ""                 # suite.analysis.regression.Judgement.verdict
    z: float | None = None
    env_change: tuple[str, ...] = ()  # "torch 2.10.0 -> 2.11.0": why it is not called a regression
    code_change: str | None = None    # "abc1234 -> def5678" when the commit differs from the last run
    environment: dict = field(default_factory=dict)

    @property
    def change_pct(self) -> float | None:
        return None if self.baseline is None else 100.0 * (self.median / self.baseline - 1.0)


def _commit(r: dict) -> str | None:
    commit = (r.get("code") or {}).get("commit")
    return commit[:10] if commit else None


def history(runs: list[Run], pct: float = regression.REGRESSION_PCT) -> dict[str, dict[str, list[Point]]]:
    """gpu model -> case id -> points in time order, each judged against the ones before it."""
    out: dict[str, dict[str, list[Point]]] = {}
    runs = [run for run in runs if not run.is_cpu]
    envs = {run.run_id: regression.environment(run.env) for run in runs}
    # In time order of the records themselves: a resumed run may add cases after a later run.
    timed = sorted(((r.get("started_utc") or run.started, run.run_id, r["case_id"], run, r)
                    for run in runs for r in run.records if _ok(r)), key=lambda x: x[:3])
    for _, _, _, run, r in timed:
        per_case = out.setdefault(run.gpu, {})
        t = r["time_ms"]
        med = t["median"]
        p10, p90 = t.get("p10", med), t.get("p90", med)
        pts = per_case.setdefault(record_schema.join_key(r), [])
        env = envs[run.run_id]
        j = regression.judge(med, env, [(p.median, p.p10, p.p90, p.environment) for p in pts], pct)
        code = None
        if pts and _commit(pts[-1].record) and _commit(r) and _commit(pts[-1].record) != _commit(r):
            code = f"{_commit(pts[-1].record)} -> {_commit(r)}"
        pts.append(Point(run.run_id, run.started, r, med, p10, p90, j.baseline, j.band, j.verdict,
                         j.z, j.env_change, code, env))
    return out


def newest_regressions(runs: list[Run], pct: float = regression.REGRESSION_PCT
                       ) -> list[tuple[str, str, Point]]:
    """(gpu model, join key, point) of each case whose newest run is a regression: what
    `--fail-on-regression` fails on."""
    return [(gpu, cid, pts[-1]) for gpu, cases in sorted(history(runs, pct).items())
            for cid, pts in sorted(cases.items()) if pts and pts[-1].verdict == "regression"]


# ---------------------------------------------------------------- across GPU models
def latest_per_gpu(runs: list[Run]) -> dict[str, dict[str, tuple[Run, dict]]]:
    """gpu model -> case id -> (run, record) of the newest ok record of that case on that GPU
    (CPU runs have no GPU model and are left out)."""
    out: dict[str, dict[str, tuple[Run, dict]]] = {}
    for run in sorted((r for r in runs if not r.is_cpu), key=lambda r: (r.started, r.run_id)):
        for r in run.records:
            if _ok(r):
                out.setdefault(run.gpu, {})[record_schema.join_key(r)] = (run, r)
    return out


def hardware(runs: list[Run], reference: str | None = None):
    """(gpus in column order, rows): rows hold a case id present on at least two GPU models, with
    each GPU's (run, record) and its time over the reference GPU's time (the reference is the GPU
    with the most cases unless named)."""
    latest = latest_per_gpu(runs)
    gpus = sorted(latest, key=lambda g: (-len(latest[g]), g))
    if reference and reference in latest:
        gpus.remove(reference)
        gpus.insert(0, reference)
    rows = []
    ids = sorted({cid for g in gpus for cid in latest[g]})
    for cid in ids:
        present = {g: latest[g][cid] for g in gpus if cid in latest[g]}
        if len(present) < 2:
            continue
        ref = present.get(gpus[0])
        ratios = {}
        for g, (_, r) in present.items():
            ratios[g] = None if ref is None else r["time_ms"]["median"] / ref[1]["time_ms"]["median"]
        rows.append({"case_id": next(iter(present.values()))[1]["case_id"], "join_key": cid,
                     "per_gpu": present, "ratio": ratios})
    return gpus, rows
