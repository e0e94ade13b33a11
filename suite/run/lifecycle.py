"""The one lifecycle of a case, whatever its scope: skipped when this machine cannot run it
(suite.workloads.availability says why), otherwise attempted under its deadline; an exception
fails it with one line and a short traceback (suite.core.guard.failure), and a correctness gate
that does not pass fails it with the gate's worst error. One failing case never stops the sweep.

The runner (scope site) and the comparison groups (suite.run.groups) live through `attempt` and
`gate`; the distributed protocol (suite.run.distributed) runs across ranks and says the same
things in the same words through `gate_reason` and guard.failure.
"""
from __future__ import annotations

import gc
import time
from typing import Callable

import torch

from suite.core.guard import deadline, failure
from suite.core.scenario import Case
from suite.workloads.availability import unavailable


def attempt(case: Case, record: dict, work: Callable[[], None]) -> None:
    """Skips the case with its reason, or runs `work` (which fills `record`) under the case's
    deadline and turns an exception into a failed record; then frees what the case held and
    stamps `wall_s`, the case's own wall clock."""
    t0 = time.perf_counter()
    reason = unavailable(case)
    if reason:
        record.update(status="skipped", reason=reason)
    else:
        try:
            with deadline(case.timeout_s):
                work()
        except Exception as exc:  # noqa: BLE001  (one failing case never stops the sweep)
            record.update(failure(exc))
        finally:
            release(case.device)
    record["wall_s"] = round(time.perf_counter() - t0, 3)


def gate_reason(result: dict) -> str:
    """The reason a case that failed its correctness gate gives."""
    return (f"check failed: {result['worst']} rel err {result['max_rel_err']:.3g} "
            f"> tol {result['tol']:.1g}")


def gate(record: dict, result: dict) -> bool:
    """Keeps the gate's result in the record and fails the record when it did not pass."""
    record["check"] = result
    if not result["passed"]:
        record.update(status="failed", reason=gate_reason(result))
    return result["passed"]


def release(device: str) -> None:
    """Frees what a finished case held, so the next one starts from the same memory."""
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
