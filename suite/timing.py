"""The one timing path of the suite.

GPU: CUDA events around each call, L2 flushed (a buffer of twice the L2 size overwritten) before
every call and outside the events, warm-up excluded, at least MIN_SAMPLES samples.
CPU: time.perf_counter around each call.

What a GPU sample is: device time from the call's first kernel to its last. Between the flush and
the start event the GPU spins in a sleep kernel sized from the host time one call takes to enqueue
(measured in the warm-up), so the host's Python and launch overhead before the first kernel is not
in the sample. In a training step that overhead overlaps the previous layer's kernels, and kernel
timings elsewhere (nvbench, tritonbench's CUDA-graph mode) exclude it too. It is not hidden from the
record: `host_ms` is the median enqueue time, and a call whose host_ms exceeds its device time
cannot keep the GPU busy on its own. Host gaps between a call's kernels (eager PyTorch) stay in.

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
PAD_CAP_MS = 50.0       # a call that enqueues for longer than this probably synchronises inside


def launch_pad_ms(host_ms: list[float]) -> float:
    """Sleep before the start event: the slowest warm-up enqueue, with margin for jitter."""
    if not host_ms:
        return 0.0
    return min(PAD_CAP_MS, 1.5 * max(host_ms) + 0.05)


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)   # milliseconds
    host_ms: float | None = None     # median host time to enqueue one call (GPU only)
    pad_ms: float = 0.0              # sleep queued before each sample's start event

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
                "cv": self.cv, "n": len(self.samples), "host_ms": self.host_ms,
                "launch_pad_ms": self.pad_ms, "samples": [round(s, 6) for s in self.samples]}


class Timer:
    """Times a zero-argument callable on one device."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._flush = None
        self._cycles_per_ms = 0.0
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
            self._flush = torch.empty(2 * l2, dtype=torch.int8, device=self.device)
            if hasattr(torch.cuda, "_sleep"):
                with torch.cuda.device(self.device):
                    self._cycles_per_ms = self._sleep_rate()

    def _sleep_rate(self) -> float:
        """Clock cycles of torch.cuda._sleep per millisecond (the second of two tries: warm)."""
        rate = 0.0
        for _ in range(2):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(1_000_000)
            end.record()
            end.synchronize()
            rate = 1_000_000 / max(start.elapsed_time(end), 1e-3)
        return rate

    @property
    def flush_bytes(self) -> int:
        return self._flush.numel() if self._flush is not None else 0

    def _one(self, fn: Callable, pad_ms: float = 0.0) -> tuple[float, float]:
        """(time of the call in ms, host ms to enqueue it)."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
            return ms, ms
        self._flush.zero_()   # overwrite the whole L2: no line of the last call stays cached
        if pad_ms > 0 and self._cycles_per_ms > 0:
            torch.cuda._sleep(int(pad_ms * self._cycles_per_ms))
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host = (time.perf_counter() - t0) * 1e3
        end.synchronize()
        return start.elapsed_time(end), host

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable, warmup_ms: float = 25.0, rep_ms: float = 100.0,
             min_samples: int = MIN_SAMPLES, max_samples: int = MAX_SAMPLES) -> Timing:
        """Warms up for warmup_ms (at least one call), then takes enough samples to fill rep_ms."""
        with torch.cuda.device(self.device) if self.cuda else _nullcontext():
            self.sync()
            first, _ = self._one(fn)              # compiles, autotunes, allocates: never kept
            spent, est, hosts = first, first, []
            while (spent < warmup_ms or not hosts) and len(hosts) < max_samples:
                est, host = self._one(fn)
                spent += est
                hosts.append(host)
            pad = launch_pad_ms(hosts) if self.cuda and self._cycles_per_ms > 0 else 0.0
            count = int(min(max_samples, max(min_samples, rep_ms / max(est, 1e-4))))
            samples = [self._one(fn, pad)[0] for _ in range(count)]
            host_ms = statistics.median(hosts) if self.cuda else None
            return Timing(samples, host_ms=host_ms, pad_ms=pad)


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
    return {"gbps": rate, "bytes": nbytes, "time_ms": timing.summary()}
