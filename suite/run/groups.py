"""Comparison groups of whole-step cases (scopes layer and model): the cases that differ only in
method, backend, n and recompute are checked one by one, then built together and timed
interleaved, so that every ratio between them comes from one GPU state.

Each case goes through the one lifecycle (suite.run.lifecycle): skipped, or gated against fp64
(suite.workloads.steps.check) under its deadline. The members that pass are packed into
subgroups that fit the GPU's memory together with their baselines, and each subgroup is timed in
rotated rounds (ROUNDS for scope layer; MODEL_ROUNDS whole steps by wall clock for scope model,
every sample keeping its round index for the bootstrap of suite.analysis.overhead). A record is
written as soon as it is final, so an interrupted group keeps its finished subgroups.
"""
from __future__ import annotations

import hashlib
import json
import math
import time

import torch

import kernels
from suite.analysis import predict
from suite.core.guard import deadline, failure, first_line
from suite.core.record import throughput
from suite.core.scenario import Case
from suite.measure.timing import Timing, matmul_rate_tflops
from suite.run import lifecycle
from suite.store.runs import new_record, write_json
from suite.workloads import fastest
from suite.workloads.steps import (Step, activation_peak, check, device_parts, measure_memory,
                                   set_estimate)

ROUNDS = 8                 # scope layer
MODEL_ROUNDS = 20          # scope model: whole steps, the overhead's bootstrap resamples rounds
MIN_PER_ROUND = 3
GROUP_FIELDS = ("device", "scope", "C", "T", "seq", "layers", "heads", "mlp_ratio", "vocab",
                "dtype", "mode", "gpus", "family", "accum", "depth")


def group_key(case: Case) -> str:
    blob = json.dumps({k: getattr(case, k) for k in GROUP_FIELDS}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- the timed step


def memory_budget(device: str) -> float:
    """Persistent bytes one subgroup may hold: 60% of the GPU, leaving room for one step's
    activations and the gate; unbounded on a CPU (tests use tiny shapes)."""
    if device != "cuda" or not torch.cuda.is_available():
        return math.inf
    return 0.6 * torch.cuda.get_device_properties(0).total_memory


def _baselines_of(case: Case, cases: list[Case]) -> list[Case]:
    """What `case` is compared with: the group's residual and its own method without recompute."""
    out = []
    for c in cases:
        if c is case:
            continue
        same_kind = bool(c.cuda_graph) == bool(case.cuda_graph)
        residual = c.method == "residual" and c.recompute == "none" and same_kind
        own_plain = (case.recompute != "none" and c.recompute == "none" and c.method == case.method
                     and c.backend == case.backend and c.n == case.n and same_kind)
        if residual or own_plain:
            out.append(c)
    return out


def subgroups(cases: list[Case], budget: float) -> list[list[Case]]:
    """Eager cases and CUDA-graph cases apart (a graph holds its own memory pool besides the
    weights), each packed by `pack`."""
    eager = [c for c in cases if not c.cuda_graph]
    graphs = [c for c in cases if c.cuda_graph]
    return [s for part in (eager, graphs) if part for s in pack(part, budget)]


def pack(cases: list[Case], budget: float) -> list[list[Case]]:
    """Packs a comparison group into sets that fit the memory budget together; each set holds
    every member's baselines, so a comparison is always between cases timed together. A
    baseline may be timed in several sets; its record comes from the first."""
    sets: list[list[Case]] = []
    current: list[Case] = []
    for case in cases:
        trial = list(current)
        for c in [case] + _baselines_of(case, cases):
            if all(c is not t for t in trial):
                trial.append(c)
        if current and set_estimate(trial) > budget:
            sets.append(current)
            trial = [case]
            for c in _baselines_of(case, cases):
                trial.append(c)
        current = trial
    if current:
        sets.append(current)
    # Keep the scenario's order inside each set.
    order = {id(c): i for i, c in enumerate(cases)}
    return [sorted(s, key=lambda c: order[id(c)]) for s in sets]


def run_group(session, items: list, view=None) -> None:
    """Measures one comparison group (a list of (scenario name, Case)) into session's store."""
    if not items:
        return
    records, passing = {}, []
    for name, case in items:
        if view:
            view.starting(case)
        record = new_group_record(session, case, name)
        records[id(case)] = (case, record)

        def gate_one(case=case, record=record):
            backends = None
            if case.backend == kernels.AUTO:
                choice = fastest.choose(case, session.timer(case.device))
                record["op_backends"] = choice
                backends = (choice["pre"], choice["post"], choice["boundary"])
            if lifecycle.gate(record, check(case, case.device, backends)):
                passing.append(case)

        lifecycle.attempt(case, record, gate_one)
    stored: set = set()

    def store(final: bool) -> None:
        """Writes every record that is final (timed, failed or skipped), so an interrupted group
        keeps its finished sets; a record is filled by the first set that times it only."""
        for key, (case, record) in records.items():
            if key in stored:
                continue
            if record["status"] == "ok" and record["time_ms"] is None:
                if not final:
                    continue
                record.update(status="failed", reason="not timed (its subgroup failed)")
            stored.add(key)
            session.store.add(record)
            if view:
                view.finished(case, record)

    store(final=False)
    if passing:
        device = passing[0].device
        budget = memory_budget(device)
        for index, members in enumerate(subgroups(passing, budget)):
            _time_subgroup(session, members, records, index)
            store(final=False)
    store(final=True)


def _build_steps(members: list[Case], records: dict) -> list:
    """The members' Steps, each sharing its weights with the first model of its kind."""
    built, donors = [], {}
    for case in members:
        choice = records[id(case)][1].get("op_backends")
        # the boundary auto chose too: the step runs exactly the ops the gate checked
        backends = (choice["pre"], choice["post"], choice["boundary"]) if choice else None
        # Eager steps drop their gradients after each step, graphs keep theirs: each kind
        # shares weights, gradients and optimizer state only with its own kind.
        kind = bool(case.cuda_graph)
        donor = donors.get(kind) if case.scope == "model" else None
        step = Step(case, case.device, case.seed, donor=donor, op_backends=backends)
        if case.scope == "model":
            donors.setdefault(kind, step)
        built.append(step)
    return built


def _time_subgroup(session, members: list[Case], records: dict, index: int) -> None:
    """Builds the members, times them interleaved, fills the records not yet timed and gives
    every record the samples of what it was timed with (`interleaved_with`)."""
    built = []
    t0 = time.perf_counter()
    try:
        with deadline(sum(c.timeout_s for c in members)):
            built = _build_steps(members, records)
            timer = session.timer(members[0].device)
            rate = matmul_rate(session, members[0].device)
            model = members[0].scope == "model"
            extra = {}
            if model:
                parts = {}
                for step in built:       # memory and device-only parts before any capture
                    step.eager_call()
                    parts[id(step)] = (measure_memory(step, timer), device_parts(step, timer))
                live = []
                for step in built:
                    if step.case.cuda_graph:
                        try:
                            step.capture()
                        except Exception as exc:  # noqa: BLE001  (recorded as the case's reason)
                            _, record = records[id(step.case)]
                            record.update(status="failed", reason="CUDA graph capture failed: "
                                          + f"{type(exc).__name__}: {first_line(exc)}")
                            continue
                    live.append(step)
                calls = [s.call for s in live]
                head_of = next((s for s in live if s.case.depth and not s.case.cuda_graph
                                and s.case.method == "residual"), None)
                if head_of is not None:
                    calls.append(head_of.head_call)
                timings = timer.interleaved_wall(calls, 1, members[0].rep_ms, MODEL_ROUNDS)
                if head_of is not None:
                    head_t, head_rounds = timings.pop()
                    extra["head:" + head_of.case.case_id] = {
                        "method": "head", "of": head_of.case.case_id,
                        "samples": [round(x, 6) for x in head_t.samples], "rounds": head_rounds}
            else:
                live = built
                timings = timer.interleaved([s.call for s in live], members[0].warmup_ms,
                                            members[0].rep_ms, ROUNDS, MIN_PER_ROUND)
            peers = {c.case_id: {"method": c.method, "backend": c.backend, "n": c.n,
                                 "recompute": c.recompute, "L_r": c.L_r,
                                 "cuda_graph": bool(c.cuda_graph),
                                 "samples": [round(x, 6) for x in t.samples], "rounds": rounds}
                     for c, (t, rounds) in zip([s.case for s in live], timings)}
            peers.update(extra)
            for step, (timing, rounds) in zip(live, timings):
                case, record = records[id(step.case)]
                if record["time_ms"] is None and record["status"] == "ok":
                    if model:
                        _fill_model(session, step, record, timing, rounds, rate,
                                    *parts[id(step)])
                    else:
                        _fill(session, step, record, timing, rounds, timer, rate)
                    record["subgroup"] = index
                    record["interleaved_with"] = {k: v for k, v in peers.items()
                                                  if k != case.case_id}
    except Exception as exc:  # noqa: BLE001  (recorded as failed; the sweep goes on)
        for case in members:
            _, record = records[id(case)]
            if record["time_ms"] is None and record["status"] == "ok":
                record.update(failure(exc))
                record["reason"] = "interleaved timing: " + record["reason"]
    finally:
        spent = time.perf_counter() - t0
        for case in members:
            _, record = records[id(case)]
            record["wall_s"] = round(record.get("wall_s", 0) + spent / len(members), 3)
        built.clear()
        lifecycle.release(members[0].device)


def new_group_record(session, case: Case, name: str) -> dict:
    return {**new_record(case, name, session.gpu_uuid, session.env), "group": group_key(case)}


def _fill_common(session, case: Case, record: dict, timing: Timing, rounds: list, rate,
                 kind: str, tokens: int) -> float:
    """What every whole-step record has: its time, rounds, tokens/s, floor bytes and FLOPs, and
    the run's copy and matmul rates. Returns the median in seconds."""
    cost = predict.step_cost(case)
    seconds = timing.median * 1e-3
    record["time_ms"] = timing.summary()
    record["time_kind"] = kind
    record["rounds"] = rounds
    record["tokens_per_s"] = tokens / seconds
    record.update(throughput(cost.read, cost.write, cost.flops, seconds, session.copy.get(case.device)))
    record["matmul_flops"] = cost.matmul_flops
    if rate:
        record["matmul_tflops_measured"] = rate["tflops"]
    return seconds


def _fill(session, step: Step, record: dict, timing: Timing, rounds: list, timer, rate) -> None:
    """Scope layer: padded device time per call."""
    _fill_common(session, step.case, record, timing, rounds, rate, "device (padded)",
                 step.case.T)
    act = activation_peak(step, timer)
    held = step.state_bytes()["params"] + 2 * step.x.numel() * step.x.element_size()
    record["activation_peak_bytes"] = act
    record["peak_mem_bytes"] = None if act is None else act + held     # weights, x and its grad


def _fill_model(session, step: Step, record: dict, timing: Timing, rounds: list, rate,
                memory: dict, device: dict) -> None:
    """Scope model: wall clock per whole step (the headline), with the device-only parts, the
    host's enqueue time, the optimizer's share, memory and model-FLOPs utilisation."""
    case = step.case
    kind = "wall clock per step" + (" (CUDA graph replay)" if case.cuda_graph else "")
    seconds = _fill_common(session, case, record, timing, rounds, rate, kind,
                           case.T * (case.accum or 1))
    wall = timing.median
    record["device"] = device
    record["optimizer_share"] = device["optimizer_ms"] / wall
    host = device.get("host_step_ms")
    record["bound"] = None if host is None else ("host" if host > device["step_ms"] else "device")
    record["wall_over_device"] = wall / device["step_ms"]
    record.update(memory)
    record["peak_mem_bytes"] = memory.get("step_peak_bytes")
    record["model_flops"] = predict.model_flops(case)
    record["tflops"] = record["model_flops"] / seconds / 1e12
    peak = predict.datasheet_tflops(session.env)
    if peak:
        record["mfu"] = record["tflops"] / peak["tflops"]
        record["mfu_peak"] = peak
    if step.moe:
        record["expert_path"] = step.moe[0].path


def matmul_rate(session, device: str) -> dict | None:
    """The bf16 matmul rate of this run, measured once per device and kept in env.json."""
    rates = session.env.setdefault("matmul_rate", {})
    if device not in rates:
        rates[device] = matmul_rate_tflops(session.timer(device))
        write_json(session.store.dir / "env.json", session.env)
    return rates[device]


def groups(items: list) -> list[list]:
    """Splits (name, case) pairs into comparison groups, in first-seen order."""
    out: dict[str, list] = {}
    for name, case in items:
        out.setdefault(group_key(case), []).append((name, case))
    return list(out.values())
