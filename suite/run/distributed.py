"""Runs the distributed cases across the ranks of the world; only rank 0 writes records.

Rank 0 runs `harness.py run` as in one process (suite.run.runner); the distributed cases come
first, through `run_cases`. Every other rank runs `follow`: it loads the same scenarios, takes
the list of case ids to run from rank 0 (so a resumed run agrees on what is left) and takes part
in each case. Per case, every rank of the world:
  1. decides the same skip (suite.workloads.availability.distributed_unavailable) or joins the case's group;
  2. builds its part and passes the gate (prepare), then all ranks exchange statuses: one
     rank's failure fails the case on every rank before any timed message;
  3. times (run) and sends its part to rank 0, which combines and records.
A rank that dies or a collective that times out raises on the others (gloo closes the
connection, or the process group timeout); rank 0 records the case as failed with that reason,
records every remaining distributed case as failed (the world is broken), and the run exits 1.
When torchrun stops rank 0 because another rank exited (SIGTERM), rank 0 finishes the record in
hand first. Records already written are never lost (suite.store.runs writes atomically).
"""
from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from suite.core.guard import deadline, failure, first_line
from suite.core.scenario import Case
from suite.measure.timing import Timer
from suite.run import groups, lifecycle
from suite.workloads.availability import distributed_unavailable
from suite.workloads.dist import bench as dist_bench, launch, pipeline

# Fault injection for tests: "RANK:CASE_INDEX" makes that rank exit before the timed part of
# that case, "RANK:CASE_INDEX:hang" makes it sleep there (a collective that never completes).
FAULT_ENV = "HCBENCH_FAULT_EXIT"
_terminated = {"flag": False}


class WorldBroken(Exception):
    pass


def _on_sigterm(signum, frame):
    # Keep running: the next collective fails at once (its peer is gone) and the case is recorded.
    _terminated["flag"] = True


class _Groups:
    """Process groups per set of ranks, created collectively by every rank in case order."""

    def __init__(self):
        self.cache: dict = {}

    def case_group(self, ranks: tuple):
        if not dist.is_initialized() or len(ranks) == 1:
            return None
        if ranks == tuple(range(dist.get_world_size())):
            return dist.group.WORLD
        if ranks not in self.cache:
            self.cache[ranks] = dist.new_group(list(ranks))
        return self.cache[ranks]

    def boundaries(self, ranks: tuple):
        key = ("pipe",) + ranks
        if key not in self.cache:
            self.cache[key] = pipeline.boundary_groups(list(ranks))
        return self.cache[key]


def _exchange(world: launch.World, value):
    """Every rank's value, on every rank (the world group)."""
    if world.size == 1:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def _device_for(case: Case, world: launch.World) -> str:
    if case.device == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def _failed(exc: BaseException) -> tuple:
    """A rank's status after an exception: guard.failure's reason and traceback, as a tuple that
    travels to rank 0."""
    fields = failure(exc)
    return ("failed", fields["reason"]) + ((fields["traceback"],) if "traceback" in fields else ())


def _one_case(index: int, case: Case, world: launch.World, groups: _Groups, timers: dict):
    """Runs one case on this rank; on rank 0 returns the record's fields (status, reason, ...)."""
    reason = distributed_unavailable(case, world.size)
    if reason:
        return {"status": "skipped", "reason": reason}
    ranks = tuple(range(case.gpus))
    group = groups.case_group(ranks)
    pipe_groups = (groups.boundaries(ranks)
                   if case.parallel == "pipeline" and case.gpus > 1 else None)
    member = world.rank in ranks
    device = _device_for(case, world)
    if device not in timers:
        timers[device] = Timer(device)
    ctx = dist_bench.Ctx(world.rank, list(ranks), group, device, timers[device])
    bench, gate, status = None, None, ("ok", None)
    if member:
        try:
            bench, gate = dist_bench.prepare(case, ctx, pipe_groups)
            if bench is None:
                status = ("failed", lifecycle.gate_reason(gate))
            elif gate is not None and not gate["passed"]:
                status = ("failed", "check failed: the message did not arrive bit for bit")
        except Exception as exc:  # noqa: BLE001  (reported by rank 0 for every rank)
            status = _failed(exc)
    statuses = _exchange(world, (status, gate if world.rank == 0 else None))
    bad = [(r, s[0]) for r, s in enumerate(statuses) if s[0][0] != "ok"]
    fields = {"check": statuses[0][1]}
    if bad:
        dist_bench.release(bench)
        r, st = bad[0]
        return {**fields, "status": "failed", "reason": f"rank {r}: {st[1]}",
                **({"traceback": st[2]} if len(st) > 2 else {})}
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"{world.rank}:{index}":
        os._exit(3)
    if fault == f"{world.rank}:{index}:hang":
        time.sleep(10**6)
    part, status = None, ("ok", None)
    if member:
        try:
            part = dist_bench.run_part(bench)
        except Exception as exc:  # noqa: BLE001
            status = _failed(exc)
    dist_bench.release(bench)
    try:
        parts = _exchange(world, (status, part))
    except Exception as exc:
        raise WorldBroken(f"a rank died or timed out during the timed part (rank "
                          f"{world.rank} saw: {first_line(exc)[:200]})") from exc
    bad = [(r, p[0]) for r, p in enumerate(parts) if p[0][0] != "ok"]
    if bad:
        r, st = bad[0]
        if world.size > 1:
            raise WorldBroken(f"rank {r}: {st[1]}")
        return {**fields, "status": "failed", "reason": f"rank {r}: {st[1]}",
                **({"traceback": st[2]} if len(st) > 2 else {})}
    if world.rank != 0:
        return None
    member_parts = [p[1] for r, p in enumerate(parts) if r in ranks]
    fields.update(dist_bench.combine(case, member_parts))
    if case.parallel == "p2p" and not fields["check"]["passed"]:
        return {**fields, "status": "failed", "reason": "check failed: message corrupted"}
    if fields.get("losses_finite") is False:
        return {**fields, "status": "failed", "reason": "a micro-batch loss is not finite"}
    if fields.get("replicas_agree") is False:
        return {**fields, "status": "failed",
                "reason": "replicas disagree after a synchronised step (all-reduce wrong)"}
    return {**fields, "status": "ok"}


def _loop(items: list, world: launch.World, emit) -> bool:
    """Runs (name, case) items on this rank; `emit(name, case, fields)` on rank 0.
    Returns False when the world broke."""
    groups, timers = _Groups(), {}
    broken = None
    for index, (name, case) in enumerate(items):
        t0 = time.perf_counter()
        if _terminated["flag"] and not broken:
            broken = "the launcher stopped this rank (SIGTERM)"
        if broken:
            fields = {"status": "failed", "reason": f"not run: {broken}"}
        else:
            try:
                if world.size == 1:     # one process: the runner's per-case time limit applies
                    with deadline(case.timeout_s):
                        fields = _one_case(index, case, world, groups, timers)
                else:
                    fields = _one_case(index, case, world, groups, timers)
            except WorldBroken as exc:
                broken = f"the process group broke in case {case.case_id}"
                fields = {"status": "failed", "reason": str(exc)}
            except Exception as exc:  # noqa: BLE001  (a collective that failed or timed out)
                if world.size == 1:     # nothing shared broke: the next case can run
                    fields = failure(exc)
                else:
                    broken = f"the process group broke in case {case.case_id}"
                    fields = {"status": "failed",
                              "reason": f"collective failed (a rank died or timed out): "
                                        f"{type(exc).__name__}: {first_line(exc)}"}
        if world.rank == 0 and fields is not None:
            fields["wall_s"] = round(time.perf_counter() - t0, 3)
            emit(name, case, fields)
    return broken is None


def run_cases(session, items: list, view=None) -> None:
    """Rank 0 (or the only process): runs the distributed items into session's store."""
    world = launch.from_env()
    if not items and world.size == 1:
        return
    # With several ranks, SIGTERM comes from the launcher when another rank exited: finish the
    # record in hand (its collectives fail at once) instead of dying without it. One process
    # keeps the default (a `timeout` or Ctrl-C stops it; finished records are on disk).
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if world.size > 1 else None

    def emit(name, case, fields):
        if view:
            view.starting(case)
        record = groups.new_group_record(session, case, name)
        record.update(dist_bench.labels(case))
        record["world_size"] = world.size
        record["launcher"] = world.source
        record.update(fields)
        session.store.add(record)
        if view:
            view.finished(case, record)

    try:
        launch.init(world)
        if world.size > 1:
            dist.broadcast_object_list([[c.case_id for _, c in items]], src=0)
    except Exception as exc:  # noqa: BLE001  (every distributed case fails with the reason)
        for name, case in items:
            emit(name, case, {"status": "failed", "reason": "could not join the process group: "
                              f"{type(exc).__name__}: {first_line(exc)}"})
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        return
    ok = _loop(items, world, emit)
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    if ok:
        launch.shutdown()       # after a failure, tearing the group down can wait on the dead
    if _terminated["flag"]:
        # The launcher is stopping this process (another rank exited): no single-process case
        # starts; the run ends as interrupted, every finished record kept.
        raise KeyboardInterrupt


def follow(scenarios: list, world: launch.World) -> int:
    """Every rank but 0: take part in rank 0's distributed cases. Exit 0, or 1 when broken."""
    launch.init(world)
    box = [None]
    dist.broadcast_object_list(box, src=0)
    by_id = {c.case_id: (sc.name, c) for sc in scenarios for c in sc.cases}
    missing = [i for i in box[0] if i not in by_id]
    if missing:
        print(f"rank {world.rank}: case ids {missing[:3]} from rank 0 are not in this rank's "
              "scenarios; every rank needs the same scenario files and options", flush=True)
        return 2
    ok = _loop([by_id[i] for i in box[0]], world, emit=None)
    if ok:
        launch.shutdown()
    return 0 if ok else 1
