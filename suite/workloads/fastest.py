"""Backend `auto`: the fastest registered backend per connection op at a case's shapes.

For each op (pre, post) every candidate backend (kernels.candidates: MATH.md exactly, compiled
once per shape, runnable here) is timed forward+backward at the case's method, n, C, T and
dtype, on the site workload's random inputs (suite.workloads.workload), with the suite's timer (padded
device time). The fastest per op is kept; its pre and post are composed into one Ops
(kernels.compose). Then the boundary between adjacent sites: two adjacent sites are timed with
the chosen pre and post apart, and with each candidate's fused boundary (post of a site with the
coefficients of the next, whichever backends pre and post came from), and the fastest is kept
(`boundary`: "unfused", "fused" for pre's and post's own backend, or "fused:<backend>"); a fused
boundary never runs untimed. Correctness is not assumed: the model's fp64 gate (suite.workloads.steps.check) runs
the composed ops before anything is timed. A choice is made once per process and shape.
"""
from __future__ import annotations

from dataclasses import replace

import kernels
from suite.core.dtypes import TORCH_DTYPES
from suite.core.scenario import Case
from suite.measure.timing import Timer
from suite.workloads import workload

OPS = ("pre", "post")
_CHOSEN: dict[tuple, dict] = {}


def choose(case: Case, timer: Timer) -> dict:
    """{"pre": backend, "post": backend, "times_ms": {op: {backend: median}}} for `case`'s
    shapes (method residual: the torch backend, its single add)."""
    key = (case.method, case.n, case.C, case.T, case.dtype, case.sinkhorn_iters, case.device)
    if key in _CHOSEN:
        return _CHOSEN[key]
    if case.method == "residual":
        names = ["torch"]
    else:
        names = kernels.candidates(case.method, case.device)
    times: dict[str, dict[str, float]] = {op: {} for op in OPS}
    reasons: dict[str, str] = {}
    for op in OPS:
        site = replace(case, scope="site", op=op, mode="fwd+bwd", **{k: None for k in
                       Case.MODEL_FIELDS})
        for name in names if len(names) > 1 else []:
            ops = kernels.get(case.method, name)
            why = ops.supports(case.n, case.C, TORCH_DTYPES[case.dtype])
            if why:
                reasons[f"{op}/{name}"] = why
                continue
            inputs = workload.make_inputs(site, case.device, case.seed)
            t = _median(timer, ops, site, inputs, reasons, f"{op}/{name}")
            if t is not None:
                times[op][name] = t
    pick = {op: (min(times[op], key=times[op].get) if times[op] else names[0]) for op in OPS}
    fused = [name for name in names if _has_fused_boundary(case, name)]
    # one candidate: nothing was timed, so its boundary stays as the backend has it
    boundary = "fused" if len(names) == 1 and fused else "unfused"
    if len(names) > 1 and fused:
        times["boundary"] = _boundary_times(case, pick["pre"], pick["post"], fused, timer, reasons)
        if "unfused" in times["boundary"]:
            boundary = min(times["boundary"], key=times["boundary"].get)
    _CHOSEN[key] = {"pre": pick["pre"], "post": pick["post"], "boundary": boundary,
                    "times_ms": times, "not_timed": reasons, "candidates": names}
    return _CHOSEN[key]


def _has_fused_boundary(case: Case, name: str) -> bool:
    ops = kernels.get(case.method, name)
    return (ops.post_coeffs is not None and ops.apply_pre is not None
            and not ops.supports(case.n, case.C, TORCH_DTYPES[case.dtype]))


def _median(timer: Timer, ops, case: Case, inputs: dict, reasons: dict, label: str) -> float | None:
    """The median ms of one call of `case` with `ops`, or None with the reason under `label`."""
    try:
        t = timer.time(lambda: workload.run(ops, case, inputs), warmup_ms=10,
                       rep_ms=30, min_samples=10, b2b_calls=0)
    except Exception as exc:  # noqa: BLE001  (a candidate that breaks is not chosen)
        reasons[label] = f"{type(exc).__name__}: {exc}"[:200]
        return None
    return round(t.median, 4)


def _boundary_times(case: Case, pre: str, post: str, fused: list[str], timer: Timer,
                    reasons: dict) -> dict:
    """Two adjacent sites (op chain, sites 2, forward+backward) with each backend's fused boundary
    in `fused`, then with the chosen pre and post apart; keyed by kernels.compose's boundary."""
    chain = replace(case, scope="site", op="chain", sites=2, mode="fwd+bwd",
                    **{k: None for k in Case.MODEL_FIELDS})
    inputs = workload.make_inputs(chain, case.device, case.seed)
    out = {}
    hows = ["fused" if name == pre == post else f"fused:{name}" for name in fused] + ["unfused"]
    for how in hows:
        t = _median(timer, kernels.compose(case.method, pre, post, how), chain, inputs,
                    reasons, f"boundary/{how}")
        if t is not None:
            out[how] = t
    return out
