"""Where one site call's time goes, kernel by kernel, for several backends side by side (CUDA GPU).

    python harness.py site-kernels [--method mhc] [--C 2560,4096] [--backends triton,tilelang]
                                   [--mode fwd+bwd] [--T 16384] [--n 4]

For each width and backend: one site call (suite.workloads.workload, as the runner times it, bf16) under
torch.profiler, mean device time per kernel over 5 calls with L2 flushed between calls
(suite.measure.kernel_profile). Kernels are listed slowest first with their share of the backend's
total; the last line of each width is the backends' totals. A diagnostic: it explains a
kernels.yaml row, it never writes a record. Kernels under --min-us are summed into one line.
"""
from __future__ import annotations

import argparse
import sys

import torch

import kernels
from suite.core.scenario import Case
from suite.measure.kernel_profile import kernel_times
from suite.workloads import workload


def site_profile(method: str, C: int, backend: str, mode: str, T: int, n: int) -> dict:
    n = 1 if method == "residual" else n        # the residual stream is one stream
    case = Case(method=method, C=C, T=T, n=n, dtype="bf16", mode=mode, backend=backend,
                device="cuda", sinkhorn_iters=20 if method == "mhc" else None)
    ops = kernels.get(method, backend)
    inputs = workload.make_inputs(case, "cuda", seed=C + 1)
    return kernel_times(lambda: workload.run(ops, case, inputs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="harness.py site-kernels",
                                description=__doc__.splitlines()[0])
    p.add_argument("--method", default="mhc", choices=("mhc", "hc", "residual"))
    p.add_argument("--C", default="2560,4096")
    p.add_argument("--backends", default="triton,tilelang")
    p.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--min-us", type=float, default=5.0)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("harness.py site-kernels: needs a CUDA GPU (torch.profiler device times)", file=sys.stderr)
        return 2
    for C in (int(c) for c in a.C.split(",")):
        totals = {}
        for backend in a.backends.split(","):
            try:
                kt = site_profile(a.method, C, backend, a.mode, a.T, a.n)
            except Exception as exc:  # noqa: BLE001 (one backend failing leaves the others)
                print(f"{a.method} C={C} {backend}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            total = totals[backend] = sum(kt.values())
            print(f"\n{a.method} site {a.mode}, n={1 if a.method == 'residual' else a.n} C={C} T={a.T} bf16, {backend}: "
                  f"{total:.1f} us in {len(kt)} kernels", flush=True)
            small = 0.0
            for name, us in sorted(kt.items(), key=lambda kv: -kv[1]):
                if us < a.min_us:
                    small += us
                    continue
                print(f"  {us:8.1f} us {us / total * 100:5.1f}%  {name[:100]}")
            if small:
                print(f"  {small:8.1f} us {small / total * 100:5.1f}%  (kernels under {a.min_us} us)")
            torch.cuda.empty_cache()
        print(f"\n{a.method} C={C} totals: " + ", ".join(f"{b} {t:.1f} us" for b, t in totals.items()),
              flush=True)
    return 0
