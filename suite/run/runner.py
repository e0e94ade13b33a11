"""Runs cases: availability -> correctness gate -> timing -> record, one case at a time (scope
stability: gate -> training run -> record, suite.run.stability).

A case the machine cannot run is recorded as skipped with the reason; an exception or an
out-of-memory in one case is recorded as failed and the sweep goes on; Ctrl-C stops the sweep
with every finished case already written.
"""
from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

import kernels
from suite.analysis import cost as costing
from suite.core.record import throughput
from suite.core.scenario import Case, Scenario
from suite.measure import env as environment, telemetry
from suite.measure.timing import Timer, copy_rate_gbps
from suite.run import (check as checking, distributed as dist_run, groups, lifecycle,
                       stability as stability_run, traffic)
from suite.store.runs import RunStore, new_record, new_run_dir, read_env, read_records, write_json
from suite.workloads import workload
from suite.workloads.availability import unavailable


class ResumeMismatch(Exception):
    """A run folder resumed on another GPU: its times would not be comparable."""


class Session:
    """One run: its store, its environment and the copy rate measured once per device."""

    def __init__(self, store: RunStore, env: dict):
        self.store = store
        self.env = env
        self.timers: dict[str, Timer] = {}
        self.copy: dict[str, dict] = dict(env.get("copy_rate", {}))
        self.gpu_uuid = env["gpus"][0].get("uuid") if env.get("gpus") else None

    def timer(self, device: str) -> Timer:
        if device not in self.timers:
            self.timers[device] = Timer(device)
        return self.timers[device]

    def measure_copy_rates(self, devices: set[str]) -> None:
        for device in sorted(devices):
            if device not in self.copy:
                self.copy[device] = copy_rate_gbps(self.timer(device))
        self.env["copy_rate"] = self.copy
        write_json(self.store.dir / "env.json", self.env)

    def run_case(self, case: Case, scenario: str) -> dict:
        record = new_record(case, scenario, self.gpu_uuid, self.env)
        if case.scope == "stability":
            work = lambda: stability_run.measure(self, case, record)  # noqa: E731
        else:
            work = lambda: self._measure(case, record)  # noqa: E731
        lifecycle.attempt(case, record, work)
        self.store.add(record)
        return record

    def _measure(self, case: Case, record: dict) -> None:
        started = time.perf_counter()
        ops = kernels.get(case.method, case.backend)
        if not lifecycle.gate(record, checking.check(ops, case, case.device)):
            return
        timer = self.timer(case.device)
        inputs = workload.make_inputs(case, case.device, case.seed)
        call = lambda: workload.run(ops, case, inputs)  # noqa: E731
        with telemetry.Sampler(self.gpu_uuid if case.device == "cuda" else None) as sampler:
            timing = timer.time(call, case.warmup_ms, case.rep_ms)
        record["telemetry"] = sampler.summary()
        record["flags"], record["flag_notes"] = telemetry.flags(record["telemetry"], timing.summary())
        record["peak_mem_bytes"] = _peak_memory(call, timer)
        cost = costing.case_cost(case.method, case.op, case.mode, case.n, case.C, case.T,
                                 case.dtype, case.sinkhorn_iters, case.sites)
        seconds = timing.median * 1e-3
        record["time_ms"] = timing.summary()
        if case.op == "chain":       # a chain stands for its sites: the time one of them takes
            record["per_site_ms"] = timing.median / case.sites
        record.update(throughput(cost.read, cost.write, cost.flops, seconds, self.copy.get(case.device)))
        if "copy_gbps" in record:
            record["pct_of_copy"] = 100.0 * record["gbps"] / record["copy_gbps"]
        if case.traffic:
            del call, inputs            # the profiled child needs the memory
            gc.collect()
            if case.device == "cuda":
                torch.cuda.empty_cache()
            left = case.timeout_s - (time.perf_counter() - started) - 10
            record.update(traffic.measure(case, cost, timeout_s=min(traffic.TIMEOUT_S, left)))


def _gpu_models(env: dict) -> list[str]:
    return [g.get("name") for g in env.get("gpus", [])]


def _gpu_uuids(env: dict) -> list[str]:
    return [g.get("uuid") for g in env.get("gpus", [])]


def _peak_memory(call, timer: Timer) -> int | None:
    """Peak device memory allocated during one call, the timer's L2-flush buffer excluded."""
    if not timer.cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - timer.flush_bytes


class ProgressView:
    """A rich progress bar on a terminal; one plain line per case otherwise (CI, SLURM logs)."""

    def __init__(self, total: int, console: Console):
        self.console = console
        self.total = total
        self.live = console.is_terminal
        self.done = 0
        self.bar = None
        if self.live:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                                TimeRemainingColumn(), console=console, transient=False)
            self.task = self.bar.add_task("starting", total=total)
            self.bar.start()

    def starting(self, case: Case):
        if self.bar:
            self.bar.update(self.task, description=case.label())

    def finished(self, case: Case, record: dict):
        self.done += 1
        if self.bar:
            self.bar.advance(self.task)
        status = record["status"]
        detail = (f"{record['time_ms']['median']:.4g} ms" if status == "ok"
                  else record.get("reason") or "")
        line = f"[{self.done}/{self.total}] {case.label()}: {status} {detail}"
        if self.bar:
            if status != "ok":
                self.bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def close(self):
        if self.bar:
            self.bar.stop()


def run(scenarios: list[Scenario], out_root: Path, resume: Path | None = None,
        retry_failed: bool = False, console: Console | None = None) -> tuple[RunStore, bool]:
    """Runs every case not already finished; returns the store and whether it was interrupted.
    The run folder is locked while this runs (RunLocked for a second writer)."""
    console = console or Console()
    env = environment.capture()
    if resume:
        # Before the store opens: a refused resume writes nothing, not even the history.
        _check_resume(resume, env, console)
    store = RunStore(resume if resume else new_run_dir(out_root, environment.device_label(env)))
    try:
        return _run_into(store, scenarios, env, retry_failed, console)
    finally:
        store.close()


def _check_resume(resume: Path, env: dict, console: Console) -> None:
    """ResumeMismatch when the folder cannot be continued on this machine as it is; takes the
    earlier copy rate into `env` when this is the same card."""
    if not (resume / "env.json").exists() and read_records(resume):
        raise ResumeMismatch(f"{resume}: no env.json, so the GPU its records were measured on "
                             "cannot be established; resuming could mix GPUs in one folder. "
                             "Start a new run, or restore the folder's env.json")
    if (resume / "env.json").exists():
        previous = read_env(resume)
        was, now = _gpu_models(previous), _gpu_models(env)
        if was and was != now:
            raise ResumeMismatch(f"{resume}: measured on {was}, this machine has "
                                 f"{now or 'no GPU'}; start a new run here instead")
        knobs_was, knobs_now = previous.get("kernel_settings"), env["kernel_settings"]
        if knobs_was is not None and knobs_was != knobs_now:
            raise ResumeMismatch(f"{resume}: ran with kernel settings {knobs_was or 'default'}"
                                 f", this process has {knobs_now or 'default'}; set the same "
                                 "or start a new run")
        if _gpu_uuids(previous) == _gpu_uuids(env):
            env["copy_rate"] = previous.get("copy_rate", {})
        else:   # same model, another card: its own copy rate; each record names its GPU
            console.print(f"resuming on another {now[0] if now else 'machine'}: the copy rate "
                          "is measured again, and each record carries its GPU's UUID")


def _run_into(store: RunStore, scenarios: list[Scenario], env: dict, retry_failed: bool,
              console: Console) -> tuple[RunStore, bool]:
    for sc in scenarios:
        # A resumed run may add cases (e.g. another --only filter): the saved list is their union.
        saved = store.dir / "scenarios" / f"{Path(sc.path).stem}.json"
        cases = [c.to_dict() for c in sc.cases]
        if saved.exists():
            ids = {c.case_id for c in sc.cases}
            old = [c for c in json.loads(saved.read_text())["cases"] if Case(**c).case_id not in ids]
            cases = old + cases
        write_json(saved, {"path": sc.path, "name": sc.name, "description": sc.description,
                           "cases": cases})
    store.index_run(env, [sc.path for sc in scenarios])
    session = Session(store, env)
    # A skip is about the machine (no GPU, library missing), which may have changed: look again.
    done = {r["case_id"] for r in store.records
            if r["status"] == "ok" or (r["status"] == "failed" and not retry_failed)}
    todo, seen, repeated = [], set(), 0
    for sc in scenarios:
        for c in sc.cases:
            if c.case_id in seen:       # one case, one record: timed once, under its first scenario
                repeated += 1
            elif c.case_id not in done:
                todo.append((sc.name, c))
            seen.add(c.case_id)
    if repeated:
        console.print(f"{repeated} case(s) appear in more than one scenario file: each is timed once, "
                      "recorded under the first scenario that lists it")
    if done:
        console.print(f"resuming {store.dir}: {len(done)} cases already finished, {len(todo)} to go")
    runnable = {c.device for _, c in todo if unavailable(c) is None}
    session.measure_copy_rates(runnable)
    for device, rate in session.copy.items():
        console.print(f"copy rate on {device}: {rate['gbps']:.0f} GB/s (read + write)")
    if env.get("gpus"):
        env["gpu_state_check"] = telemetry.check_gpu_state(session.gpu_uuid, "cuda" in session.copy)
        write_json(store.dir / "env.json", env)
        for problem in env["gpu_state_check"]["problems"]:
            console.print(f"[yellow]GPU state: {problem}[/]", highlight=False)
    view = ProgressView(len(todo), console)
    interrupted = False
    try:
        # Distributed cases first: the other ranks wait for them (suite.run.distributed).
        dist_run.run_cases(session, [(n, c) for n, c in todo if c.parallel], view)
        for name, case in todo:
            if case.scope not in ("site", "stability") or case.parallel:
                continue    # layer and model: below, timed interleaved with their group
            view.starting(case)
            record = session.run_case(case, name)
            view.finished(case, record)
        for group in groups.groups([(n, c) for n, c in todo
                                   if c.scope in ("layer", "model") and not c.parallel]):
            groups.run_group(session, group, view)
    except KeyboardInterrupt:       # Ctrl-C, or SIGTERM through the command line's handler
        interrupted = True
        have = {r["case_id"] for r in store.records}
        left = sum(1 for _, c in todo if c.case_id not in have)
        print(f"\ninterrupted: {len(store.records)} finished cases kept in {store.dir}, {left} not "
              f"run; resume with --resume {store.dir}", file=sys.stderr)
    finally:
        view.close()
    return store, interrupted
