"""The correctness gate: a backend is compared with the fp64 reference before it is timed.

Fresh inputs (a seed the timed run does not use), every output and, in fwd+bwd mode, every
gradient; error is norm-wise relative (suite.tolerance). Where the fp64 reference of the full case
would not fit in device memory, the check runs on fewer tokens and says how many.
"""
from __future__ import annotations

import torch

import kernels
from suite import workload
from suite.scenario import Case
from suite.tolerance import rel_err, tolerance

CHECK_SEED_OFFSET = 1_000_003
# Bytes of device memory per state element that the fp64 reference plus the backend need,
# generously (inputs, upcast copies, outputs, gradients, autograd temporaries).
BYTES_PER_ELEMENT = 160


def check_tokens(case: Case, device: str) -> int:
    if device != "cuda":
        return case.T
    free, _ = torch.cuda.mem_get_info()
    per_token = case.n * case.C * BYTES_PER_ELEMENT
    return max(1, min(case.T, int(0.6 * free) // per_token))


def check(ops: kernels.Ops, case: Case, device: str) -> dict:
    T = check_tokens(case, device)
    inputs = workload.make_inputs(case, device, case.seed + CHECK_SEED_OFFSET, T=T)
    got = workload.run(ops, case, inputs)
    ref = workload.run(kernels.get(case.method, "torch"), case, workload.upcast(inputs))
    errors = {}
    for name, want in ref.items():
        if name not in got:
            errors[name] = float("inf")          # a gradient the backend did not produce
        else:
            errors[name] = rel_err(got[name], want)
    del got, ref, inputs
    tol = tolerance(workload.TORCH_DTYPES[case.dtype])
    worst = max(errors, key=errors.get)
    return {"max_rel_err": errors[worst], "tol": tol, "passed": errors[worst] <= tol,
            "worst": worst, "T": T, "errors": errors}
