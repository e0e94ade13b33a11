"""The one timing path of the suite: one sample primitive (`Timer.sample`) and the schedules
over it: `Timer.time` (warm-up then padded samples of one callable), `Timer.wall` (whole steps by
wall clock), `Timer.interleaved` and `Timer.interleaved_wall` (several callables in rotated
rounds, for comparisons), and the lockstep schedule across ranks of suite.workloads.dist.bench, which
takes `Timer.sample` on every rank.

What each time includes:

- **Padded device time** (`Timer.time`, `time_ms` of kernel-level cases). CUDA events around
  each call, L2 flushed (a buffer of twice the L2 size overwritten) before every call and
  outside the events, warm-up excluded, at least MIN_SAMPLES samples. Between the flush and the
  start event the GPU spins in a sleep kernel (the *launch pad*) sized from the slowest host
  enqueue seen in the warm-up (1.5x, capped at `pad_cap_ms`). While it sleeps, the host queues
  the whole call, so the sample is the device's time from the call's first kernel to its last
  with no wait for the host: the pad removes the host's Python and launch time, both before the
  first kernel and between kernels, for as long as the host stays ahead of the GPU. It does not
  remove host gaps when the host enqueues more slowly than the GPU runs and the pad runs out
  (a call longer than the pad cap, or a launch queue that fills while the GPU sleeps); then
  some host time stays in. `host_ms` is the median enqueue time of one call in the warm-up.
- **Back-to-back wall clock per call** (`b2b_ms`, recorded beside every padded time):
  perf_counter around B2B_CALLS calls run back to back with no flush and no pad, after a
  synchronisation and ending with one, divided by the number of calls. It includes host time
  wherever the host is slower than the device; inputs may stay in L2 between calls.
- **Whole-step wall clock** (`Timer.wall`, the headline of scope `model`): each sample is one
  call from a synchronised GPU to the next synchronisation, perf_counter on the host: what a
  training loop that synchronises once per step (to read its loss) sees. No flush, no pad:
  a step's own kernels evict L2 many times over. Beside it, per sample, the CUDA-event span
  of the same call (the device timeline from first to last kernel, host gaps included) and
  the host time to enqueue it (until the call returned).

Why the flush writes (zero_) rather than reads: L2 is write-back. A timed kernel leaves up to an
L2's worth of its own output dirty at the end event; after a writing flush it instead pays for
evicting the flush's dirty lines, which is the steady state of back-to-back kernels in a
training step. A reading flush would leave the write-back of the kernel's last outputs out of
the time, an optimistic bias of up to 50 MB of writes on an H100.
On a CPU every time is perf_counter around the call.
Every result keeps its raw samples plus median, p10, p90 and CV (std / mean).
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
B2B_CALLS = 10          # calls in the back-to-back wall-clock measurement beside a padded time


def launch_pad_ms(host_ms: list[float], cap_ms: float = PAD_CAP_MS) -> float:
    """Sleep before the start event: the slowest warm-up enqueue, with margin for jitter."""
    if not host_ms:
        return 0.0
    return min(cap_ms, 1.5 * max(host_ms) + 0.05)


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)   # milliseconds
    host_ms: float | None = None     # median host time to enqueue one call (GPU only)
    pad_ms: float = 0.0              # sleep queued before each sample's start event
    b2b_ms: float | None = None      # back-to-back wall clock per call, host included
    device_ms: list[float] | None = None   # Timer.wall: CUDA-event span of each sample
    enqueue_ms: list[float] | None = None  # Timer.wall: host time until each call returned

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
        out = {"median": self.median, "p10": self.quantile(0.1), "p90": self.quantile(0.9),
               "cv": self.cv, "n": len(self.samples), "host_ms": self.host_ms,
               "launch_pad_ms": self.pad_ms, "b2b_ms": self.b2b_ms,
               "samples": [round(s, 6) for s in self.samples]}
        if self.device_ms is not None:
            out["device_span_ms"] = [round(s, 6) for s in self.device_ms]
            out["enqueue_ms"] = [round(s, 6) for s in self.enqueue_ms or []]
        return out


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

    @property
    def can_pad(self) -> bool:
        return self.cuda and self._cycles_per_ms > 0

    def sample(self, fn: Callable, pad_ms: float = 0.0) -> tuple[float, float]:
        """The sample primitive: (time of the call in ms, host ms to enqueue it), L2 flushed."""
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

    def back_to_back_ms(self, fn: Callable, calls: int = B2B_CALLS) -> float:
        """Wall clock per call of `calls` calls run back to back (no flush, no pad), from a
        synchronised device to the synchronisation after the last."""
        with torch.cuda.device(self.device) if self.cuda else _nullcontext():
            self.sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            self.sync()
            return (time.perf_counter() - t0) * 1e3 / calls

    def time(self, fn: Callable, warmup_ms: float = 25.0, rep_ms: float = 100.0,
             min_samples: int = MIN_SAMPLES, max_samples: int = MAX_SAMPLES,
             pad_cap_ms: float = PAD_CAP_MS, b2b_calls: int = B2B_CALLS) -> Timing:
        """Warms up for warmup_ms (at least one call), then takes enough padded samples to fill
        rep_ms; then, unless b2b_calls is 0, the back-to-back wall clock per call."""
        with torch.cuda.device(self.device) if self.cuda else _nullcontext():
            self.sync()
            first, _ = self.sample(fn)              # compiles, autotunes, allocates: never kept
            spent, est, hosts = first, first, []
            while (spent < warmup_ms or not hosts) and len(hosts) < max_samples:
                est, host = self.sample(fn)
                spent += est
                hosts.append(host)
            pad = launch_pad_ms(hosts, pad_cap_ms) if self.can_pad else 0.0
            count = int(min(max_samples, max(min_samples, rep_ms / max(est, 1e-4))))
            samples = [self.sample(fn, pad)[0] for _ in range(count)]
            host_ms = statistics.median(hosts) if self.cuda else None
            b2b = self.back_to_back_ms(fn, b2b_calls) if b2b_calls else None
            return Timing(samples, host_ms=host_ms, pad_ms=pad, b2b_ms=b2b)

    def wall(self, fn: Callable, samples: int) -> Timing:
        """Whole calls by wall clock: each sample from a synchronised device to the next
        synchronisation (no flush, no pad), with the CUDA-event span and the host enqueue time
        of the same call. No warm-up: the caller warms."""
        walls, spans, enq = [], [], []
        with torch.cuda.device(self.device) if self.cuda else _nullcontext():
            for _ in range(samples):
                self.sync()
                if self.cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                if self.cuda:
                    start.record()
                fn()
                if self.cuda:
                    end.record()
                t1 = time.perf_counter()
                self.sync()
                t2 = time.perf_counter()
                walls.append((t2 - t0) * 1e3)
                enq.append((t1 - t0) * 1e3)
                spans.append(start.elapsed_time(end) if self.cuda else (t1 - t0) * 1e3)
        return Timing(walls, host_ms=statistics.median(enq), device_ms=spans, enqueue_ms=enq)

    # -- schedules over several callables: interleaved rounds, order rotated every round, each
    # sample keeping its round (the overhead's bootstrap resamples whole rounds)
    def interleaved(self, calls: list, warmup_ms: float, rep_ms: float, rounds: int,
                    min_per_round: int) -> list[tuple["Timing", list[int]]]:
        """Padded device time (`time`) of each call in `rounds` rounds; per call, its Timing and
        the round of each sample. Each round discards its first call of each case (the switch
        between models), through `time`."""
        for fn in calls:
            self.time(fn, warmup_ms=warmup_ms, rep_ms=0.0, min_samples=1, max_samples=1,
                      b2b_calls=0)
        samples = [[] for _ in calls]
        round_of = [[] for _ in calls]
        hosts = [[] for _ in calls]
        pads = [[] for _ in calls]
        per_round = rep_ms / rounds
        k = len(calls)
        for r in range(rounds):
            for j in range(k):
                i = (r + j) % k
                t = self.time(calls[i], warmup_ms=0.0, rep_ms=per_round,
                              min_samples=min_per_round, max_samples=1000, b2b_calls=0)
                samples[i] += t.samples
                round_of[i] += [r] * len(t.samples)
                if t.host_ms is not None:
                    hosts[i].append(t.host_ms)
                pads[i].append(t.pad_ms)
        return [(Timing(s, host_ms=statistics.median(h) if h else None, pad_ms=max(p)), ro)
                for s, ro, h, p in zip(samples, round_of, hosts, pads)]

    def interleaved_wall(self, calls: list, warmup_steps: int, rep_ms: float,
                         rounds: int) -> list[tuple["Timing", list[int]]]:
        """Whole steps by wall clock (`wall`) in `rounds` rounds, each call for as many
        back-to-back steps as fill its share of rep_ms (at least one), after `warmup_steps`
        steps of each (the last one timed to plan the rounds). No call is discarded at a switch:
        steps of hundreds of milliseconds evict every cache."""
        est = []
        for fn in calls:
            for _ in range(max(0, warmup_steps - 1)):
                fn()
            est.append(self.wall(fn, 1).median)
        per_round = rep_ms / rounds
        walls = [[] for _ in calls]
        spans = [[] for _ in calls]
        enq = [[] for _ in calls]
        round_of = [[] for _ in calls]
        k = len(calls)
        for r in range(rounds):
            for j in range(k):
                i = (r + j) % k
                t = self.wall(calls[i], max(1, round(per_round / max(est[i], 1e-3))))
                walls[i] += t.samples
                spans[i] += t.device_ms
                enq[i] += t.enqueue_ms
                round_of[i] += [r] * len(t.samples)
        return [(Timing(w, host_ms=statistics.median(e), device_ms=d, enqueue_ms=e), ro)
                for w, d, e, ro in zip(walls, spans, enq, round_of)]


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


def matmul_rate_tflops(timer: Timer, size: int | None = None) -> dict:
    """bf16 dense matmul rate (square, size^3), with the suite's one timer."""
    size = size or (8192 if timer.cuda else 256)
    dtype = torch.bfloat16 if timer.cuda else torch.float32
    ab = [torch.randn(size, size, device=timer.device, dtype=dtype) for _ in range(2)]
    timing = timer.time(lambda: ab[0] @ ab[1], warmup_ms=50, rep_ms=200)
    ab.clear()
    return {"tflops": 2 * size ** 3 / (timing.median * 1e-3) / 1e12, "size": size,
            "dtype": str(dtype).replace("torch.", ""), "time_ms": timing.summary()}
