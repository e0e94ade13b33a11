"""What bounds a case: its deadline, and the one-line form of what stopped it (`failure`, the
one mapping from an exception to a failed record's fields).

Below the runner (suite.run.runner), the whole-step groups (suite.workloads.steps) and the
distributed protocol (suite.run.distributed), which all use it.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import signal
import threading
import traceback


class CaseTimeout(Exception):
    """A case ran past its timeout_s."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raises CaseTimeout in this thread after `seconds` (SIGALRM; main thread on POSIX only).

    It ends a case stuck in Python code, such as a compilation that never finishes or a wait
    loop; a kernel hung inside one blocking CUDA call returns to Python only when that call does.
    """
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"timed out after {seconds:g} s (timeout_s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def failure(exc: BaseException) -> dict:
    """The record fields of a case that raised: status failed and a one-line reason (a time-out
    and an out-of-memory say so; anything else names its type and keeps a short traceback)."""
    if isinstance(exc, CaseTimeout):
        return {"status": "failed", "reason": str(exc)}
    if type(exc).__name__ == "OutOfMemoryError":      # torch.cuda's, without importing torch
        return {"status": "failed", "reason": f"out of memory: {first_line(exc)}"}
    return {"status": "failed", "reason": f"{type(exc).__name__}: {first_line(exc)}",
            "traceback": traceback.format_exc(limit=8)}


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
