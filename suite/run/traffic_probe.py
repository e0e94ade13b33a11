"""The program Nsight Compute profiles for one case: `python -m suite.run.traffic_probe '<case JSON>'`.

It builds the case's inputs exactly as the timed run does (suite/workload, same seed), calls the op
once outside the NVTX range, so that compilation, autotuning and first allocations are not
counted, then once inside the range `hcbench`, which is all that ncu measures (suite/run/traffic.py).
It prints one line starting with PROBE_ERROR if the op raises, so the parent can say why.
"""
from __future__ import annotations

import contextlib
import json
import sys

import torch

import kernels
from suite.core.scenario import Case, normalise
from suite.run.traffic import NVTX_RANGE, PROBE_ERROR
from suite.workloads import workload


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool):
    if not enabled:
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def run_case(case: Case) -> int:
    """Number of output tensors of the profiled call (a sanity line for the log)."""
    ops = kernels.get(case.method, case.backend)
    cuda = case.device == "cuda"
    inputs = workload.make_inputs(case, case.device, case.seed)
    # NVTX ranges are per thread and autograd runs a CUDA backward on its own device thread; with
    # multithreading off it runs on this one, inside the range, so fwd+bwd counts its backward.
    with torch.autograd.set_multithreading_enabled(False):
        workload.run(ops, case, inputs)
        if cuda:
            torch.cuda.synchronize()
        with nvtx_range(NVTX_RANGE, cuda):
            outs = workload.run(ops, case, inputs)
            if cuda:
                torch.cuda.synchronize()
    return len(outs)


def main(argv: list[str]) -> int:
    try:
        if len(argv) != 1:
            raise ValueError("usage: python -m suite.run.traffic_probe '<case JSON>'")
        case = normalise(Case(**json.loads(argv[0])))
        count = run_case(case)
    except Exception as exc:  # noqa: BLE001 - any failure is reported to the parent in one line
        text = str(exc).strip().splitlines()
        print(f"{PROBE_ERROR} {type(exc).__name__}: {text[0] if text else ''}", flush=True)
        return 1
    print(f"hcbench-probe: ok, {case.label()}, {count} outputs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
