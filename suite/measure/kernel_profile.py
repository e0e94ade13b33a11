"""Per-kernel device times of one call, for the tuning scripts: where a fused op's time goes.
A diagnostic beside suite.measure.timing (the one timer records come from), never a source of records."""
from __future__ import annotations

import torch


def kernel_times(fn, device: str = "cuda", reps: int = 5) -> dict:
    """{kernel name: mean device us per call} over `reps` calls of fn (torch.profiler), with a
    256 MB write between calls (L2 flushed; its kernel is left out). {} off a CUDA device."""
    if device != "cuda":
        return {}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    buf = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            buf.fill_(1)
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        out[e.key] = out.get(e.key, 0.0) + t / reps
    for k in [k for k in out if "FillFunctor<unsigned char>" in k]:      # the flush
        out.pop(k)
    return out


def print_kernels(label: str, fn, device: str = "cuda", min_us: float = 3.0) -> None:
    """Prints kernel_times, slowest first (kernels under min_us left out)."""
    try:
        kt = kernel_times(fn, device)
    except Exception as exc:   # the profiler is a diagnostic: never fail the run for it
        print(f"  kernels {label}: profiler failed: {type(exc).__name__}: {exc}", flush=True)
        return
    if kt:
        print(f"  kernels {label}: total {sum(kt.values()):.0f} us", flush=True)
        for k, v in sorted(kt.items(), key=lambda kv: -kv[1]):
            if v >= min_us:
                print(f"    {v:8.1f} us  {k[:90]}", flush=True)
