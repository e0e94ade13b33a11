"""The one timing path of the suite.

GPU: CUDA events around each call, L2 flushed (a buffer of twice the L2 size overwritten) before
every call and outside the events, warm-up excluded, at least MIN_SAMPLES samples.
CPU: time.perf_counter around each call.

Why the flush writes (zero_) rather than reads: L2 is write-back. A timed kernel leaves up to an
L2's worth of its own output dirty at the end event; after a writing flush it instead pays for
evicting the flush's dirty lines, which is the steady state of back-to-back kernels in a
training step. A reading flush would leave the write-back of the kernel's last outputs out of
the time, an optimistic bias of up to 50 MB of writes on an H100.
Either way the result is every raw sample plus median, p10, p90 and CV (std / mean).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

MIN_SAMPLES = 30
MAX_SAMPLES = 2000


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)   # milliseconds

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        xs = sorted(self.samples)
        pos = q * (len(xs) - 1)
        lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def cv(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        mean = statistics.fmean(self.samples)
        return statistics.stdev(self.samples) / mean if mean > 0 else 0.0

    def summary(self) -> dict:
        return {"median": self.median, "p10": self.quantile(0.1), "p90": self.quantile(0.9),
                "cv": self.cv, "n": len(self.samples), "samples": [round(s, 6) for s in self.samples]}


class Timer:
    """Times a zero-argument callable on one device."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._flush = None
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
            self._flush = torch.empty(2 * l2, dtype=torch.int8, device=self.device)

    @property
    def flush_bytes(self) -> int:
        return self._flush.numel() if self._flush is not None else 0

    def _one(self, fn: Callable) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        self._flush.zero_()   # overwrite the whole L2: no line of the last call stays cached
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable, warmup_ms: float = 25.0, rep_ms: float = 100.0,
             min_samples: int = MIN_SAMPLES, max_samples: int = MAX_SAMPLES) -> Timing:
        """Warms up for warmup_ms (at least one call), then takes enough samples to fill rep_ms."""
        with torch.cuda.device(self.device) if self.cuda else _nullcontext():
            self.sync()
            first = self._one(fn)                 # compiles, autotunes, allocates: never kept
            spent, est, calls = first, first, 0
            while spent < warmup_ms and calls < max_samples:
                est = self._one(fn)
                spent += est
                calls += 1
            count = int(min(max_samples, max(min_samples, rep_ms / max(est, 1e-4))))
            return Timing([self._one(fn) for _ in range(count)])


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def copy_rate_gbps(timer: Timer, nbytes: int | None = None) -> dict:
    """Device-to-device copy rate, bytes read + written per second, with the Timer above."""
    if nbytes is None:
        nbytes = 2**30 if timer.cuda else 2**26
    src = torch.randint(0, 127, (nbytes,), dtype=torch.int8, device=timer.device)
    dst = torch.empty_like(src)
    timing = timer.time(lambda: dst.copy_(src), warmup_ms=25, rep_ms=200)
    rate = 2 * nbytes / (timing.median * 1e-3) / 1e9
    del src, dst
    return {"gbps": rate, "bytes": nbytes, "time_ms": timing.summary()}
