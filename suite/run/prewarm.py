"""Fills the compile caches for a scenario's cases in parallel, before a timed run.

Usage: python harness.py prewarm SCENARIO.yaml [--only KEY=V1,V2 ...] [--set KEY=V ...] [--jobs 6]

Why: some backends compile for minutes per shape the first time they meet it (Liger-Kernel's mHC
unrolls its K loop with tl.static_range and makes T a compile-time constant: minutes per width and
token count on an H100's host, 322 s for C = 7168 fwd+bwd; torch.compile a few seconds per graph). The runner meets the shapes one after another; this script meets them
all at once, one process per distinct shape, so the Triton and Inductor on-disk caches are full
when `harness.py run` starts. Nothing is timed or recorded here; the runner still checks and
times every case itself, and its first, untimed call still happens.

Each worker builds the case's inputs with suite.workloads.workload and calls the op once (forward, and
backward in fwd+bwd mode). Where a site case's correctness check uses fewer tokens than the case
(suite.run.check.check_tokens: the fp64 reference does not fit at full size) and its backend compiles
per token count (kernels.Backend.compiles_per_T), that token count is warmed too, as a job of its
own; otherwise that compile would happen inside the timed process. A worker that fails prints its error; the others go on.
Exit status: 0 when every worker finished, 1 otherwise, 2 for bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import sys
import time

import kernels
from suite.core.scenario import Case, ScenarioError, load_all
from suite.run.check import check_tokens
from suite.workloads import workload
from suite.workloads.availability import unavailable


def _warm(job: tuple[dict, int | None]) -> tuple[str, float, str | None]:
    import torch

    case_dict, tokens = job
    case = Case(**case_dict)
    label = case.label() + (f" (check shape, T={tokens})" if tokens else "")
    t0 = time.perf_counter()
    reason = unavailable(case)
    if reason:
        return label, 0.0, f"skipped: {reason}"
    try:
        ops = kernels.get(case.method, case.backend)
        inputs = workload.make_inputs(case, case.device, case.seed, T=tokens)
        workload.run(ops, case, inputs)
        if case.device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # reported, not fatal: the runner will record it properly
        return label, time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc)[:200]}"
    return label, time.perf_counter() - t0, None


def _check_jobs(cases: list) -> list[tuple[dict, int]]:
    """(case, tokens) for each distinct check shape that differs from its case's T, of site cases
    on a GPU whose backend compiles per token count. Taken here, in the parent, before any worker
    holds GPU memory: nearly the free memory the runner sees (check_tokens rounds down to a power
    of two, so a small difference seldom changes it). No GPU, or none usable: no extra jobs."""
    import torch

    wanted = [c for c in cases if c.device == "cuda" and c.scope == "site" and not c.parallel
              and kernels.BACKENDS[c.backend].compiles_per_T]
    if not wanted or not torch.cuda.is_available():
        return []
    try:
        shapes = [check_tokens(c, "cuda") for c in wanted]
    except Exception as exc:  # noqa: BLE001 (a GPU that cannot open a context: the run says so)
        print(f"prewarm: check shapes not warmed ({type(exc).__name__}: {str(exc)[:120]})")
        return []
    seen = {_shape_key(c) for c in cases}        # a check shape that is some case's own: warmed
    jobs = []
    for case, tokens in zip(wanted, shapes):
        key = _shape_key(dataclasses.replace(case, T=tokens))
        if key not in seen:
            seen.add(key)
            jobs.append((case.to_dict(), tokens))
    return jobs


def _shape_key(case) -> tuple:
    # Cases differing only in run-control fields compile the same kernels.
    d = case.to_dict()
    return tuple(sorted((k, str(v)) for k, v in d.items() if k not in case.RUN_CONTROL))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness.py prewarm", description=__doc__.splitlines()[0])
    p.add_argument("scenario")
    p.add_argument("--only", action="append", default=[])
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--jobs", type=int, default=6, help="parallel processes (default 6)")
    args = p.parse_args(argv)
    try:
        scenarios = load_all([args.scenario], args.set, args.only)
    except ScenarioError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    unique = {}
    for sc in scenarios:
        for case in sc.cases:
            unique.setdefault(_shape_key(case), case)
    cases = list(unique.values())
    jobs = [(c.to_dict(), None) for c in cases] + _check_jobs(cases)
    extra = f" (+{len(jobs) - len(cases)} check shapes)" if len(jobs) > len(cases) else ""
    print(f"prewarm: {len(cases)} distinct cases{extra}, {args.jobs} processes", flush=True)
    t0 = time.perf_counter()
    bad = 0
    # spawn: CUDA cannot be used in forked children.
    with mp.get_context("spawn").Pool(max(1, args.jobs)) as pool:
        for label, secs, err in pool.imap_unordered(_warm, jobs):
            bad += err is not None and not err.startswith("skipped")
            print(f"  {secs:7.1f} s  {label}" + (f"  ({err})" if err else ""), flush=True)
    print(f"prewarm: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
