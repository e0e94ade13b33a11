"""pytest-benchmark entry points: one test per registered backend, method and op.

For teams that gate changes in their own CI (docs/contributing.md; save a run first, then compare):
    pytest tests/bench --benchmark-only --benchmark-save=base
    pytest tests/bench --benchmark-only --benchmark-compare --benchmark-compare-fail=median:5%
Each test builds the runner's inputs (suite.workloads.workload) and passes the runner's fp64 gate
first. pytest-benchmark's own numbers, and its --benchmark-compare-fail gate, are the host wall
clock of one call followed by a device synchronisation: no L2 flush, no launch pad, host time
included. The suite's Timer (suite/measure/timing.py) times the same call as `harness.py run` does;
its summary goes to extra_info["suite_time_ms"], the GB/s in extra_info comes from its median.
A plain `make test` runs each once, untimed.
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

    if benchmark.enabled:
        # The number a record of `harness.py run` holds for this case (padded device time, L2
        # flushed); its warm-up also compiles and autotunes before pytest-benchmark's rounds.
        timing = timer.time(lambda: workload.run(ops, case, inputs), case.warmup_ms, case.rep_ms)
        summary = timing.summary()
        benchmark.extra_info["suite_time_ms"] = {k: summary[k] for k in
                                                 ("median", "p10", "p90", "n", "b2b_ms")}
        benchmark.extra_info["gbps"] = c.total / (timing.median * 1e-3) / 1e9
    benchmark(call)
