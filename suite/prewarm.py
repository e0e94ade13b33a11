"""Fills the compile caches for a scenario's cases in parallel, before a timed run.

Usage: python -m suite.prewarm SCENARIO.yaml [--only KEY=V1,V2 ...] [--set KEY=V ...] [--jobs 6]

Why: some backends compile for minutes per shape the first time they meet it (Liger-Kernel's mHC
unrolls its K loop with tl.static_range: about 100 s per width on an H100's host; torch.compile
a few seconds per graph). The runner meets the shapes one after another; this script meets them
all at once, one process per distinct shape, so the Triton and Inductor on-disk caches are full
when `harness.py run` starts. Nothing is timed or recorded here; the runner still checks and
times every case itself, and its first, untimed call still happens.

Each worker builds the case's inputs with suite.workload and calls the op once (forward, and
backward in fwd+bwd mode). Where the runner's correctness check uses fewer tokens than the case
(suite.check.check_tokens, on a GPU too small for the fp64 reference at full size), that token
count is warmed too, as a job of its own: a backend that compiles per token count would otherwise
compile it inside the timed process. A worker that fails prints its error; the others go on.
Exit status: 0 when every worker finished, 1 otherwise, 2 for bad input.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time


def _warm(job: tuple[dict, int | None]) -> tuple[str, float, str | None]:
    import torch

    import kernels
    from suite import workload
    from suite.availability import unavailable
    from suite.scenario import Case
    case_dict, tokens = job
    case = Case(**case_dict)
    label = case.label() + (f" (check shape, T={tokens})" if tokens else "")
    t0 = time.perf_counter()
    reason = unavailable(case)
    if reason:
        return label, 0.0, f"skipped: {reason}"
    try:
        ops = kernels.get(case.method, case.backend)
        inputs = workload.make_inputs(case, case.device, case.seed, T=tokens or case.T)
        workload.run(ops, case, inputs)
        if case.device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # reported, not fatal: the runner will record it properly
        return label, time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc)[:200]}"
    return label, time.perf_counter() - t0, None


def _check_shapes(cases: list) -> list[int | None]:
    """Per case, the check's token count where it is smaller than the case's, else None. Taken
    here, in the parent, before any worker holds GPU memory: the free memory the runner sees."""
    import torch

    from suite.check import check_tokens
    if not any(c.device == "cuda" for c in cases) or not torch.cuda.is_available():
        return [None] * len(cases)
    shapes = [check_tokens(c, "cuda") if c.device == "cuda" else c.T for c in cases]
    return [t if t != c.T else None for t, c in zip(shapes, cases)]


def _shape_key(case) -> tuple:
    # Cases differing only in run-control fields compile the same kernels.
    d = case.to_dict()
    return tuple(sorted((k, str(v)) for k, v in d.items() if k not in case.RUN_CONTROL))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario")
    p.add_argument("--only", action="append", default=[])
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--jobs", type=int, default=6, help="parallel processes (default 6)")
    args = p.parse_args(argv)
    from suite.cli import BadInput, _load
    try:
        scenarios = _load([args.scenario], args.set, args.only)
    except BadInput as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    unique = {}
    for sc in scenarios:
        for case in sc.cases:
            unique.setdefault(_shape_key(case), case)
    cases = list(unique.values())
    jobs = [(c.to_dict(), None) for c in cases]
    jobs += [(c.to_dict(), t) for c, t in zip(cases, _check_shapes(cases)) if t]
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
