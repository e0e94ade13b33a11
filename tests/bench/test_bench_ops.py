"""pytest-benchmark entry points: one test per registered backend, method and op.

For teams that gate changes in their own CI:
    pytest tests/bench --benchmark-only --benchmark-json=bench.json
    pytest tests/bench --benchmark-only --benchmark-compare
They build the runner's inputs (suite.workloads.workload) and synchronise with the runner's Timer, so a
timing here means the same work as a record of `harness.py run`. A plain `make test` runs each
once, untimed. The correctness gate runs first, as in the runner.
"""
import pytest

import kernels
from suite.analysis import cost
from suite.core.scenario import Case
from suite.measure.timing import Timer
from suite.run import check
from suite.workloads import workload
from suite.workloads.availability import unavailable
from tests.conftest import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
# Small enough for a CPU; the kernels' own dtype on a GPU.
SHAPE = dict(T=256, C=256, n=4, dtype="bf16" if HAS_CUDA else "fp32", device=DEVICE)
OPS = [("site", "fwd"), ("site", "fwd+bwd"), ("pre", "fwd"), ("post", "fwd"), ("coeffs", "fwd")]

CASES = [Case(method=m, backend=b, op=op, mode=mode, **SHAPE)
         for b in kernels.BACKENDS for m in kernels.METHODS for op, mode in OPS
         if not (m == "residual" and op == "coeffs")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.backend}-{c.method}-{c.op}-{c.mode}")
def test_bench(benchmark, case):
    from suite.core.scenario import normalise
    case = normalise(case)
    reason = unavailable(case)
    if reason:
        pytest.skip(reason)
    ops = kernels.get(case.method, case.backend)
    result = check.check(ops, case, case.device)
    assert result["passed"], result
    timer = Timer(case.device)
    inputs = workload.make_inputs(case, case.device, case.seed)
    c = cost.case_cost(case.method, case.op, case.mode, case.n, case.C, case.T, case.dtype,
                       case.sinkhorn_iters)
    benchmark.extra_info.update(case_id=case.case_id, case=case.to_dict(),
                                bytes=c.total, max_rel_err=result["max_rel_err"])

    def call():
        workload.run(ops, case, inputs)
        timer.sync()

    benchmark(call)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["gbps"] = c.total / stats.stats.median / 1e9
