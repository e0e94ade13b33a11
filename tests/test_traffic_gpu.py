"""One real Nsight Compute pass per kernel (GPU and ncu needed; skipped cleanly otherwise): the
plain residual add must move its analytic bytes within 15%, and the fused mHC post kernel must be
measured at all, with its bytes near MATH.md's floor."""
import pytest

from suite.analysis import cost
from suite.core.scenario import Case, normalise
from suite.run import traffic

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(traffic.find_ncu() is None, reason="needs Nsight Compute (ncu)")]


def _measure(**fields):
    case = normalise(Case(T=16384, C=4096, dtype="bf16", device="cuda", traffic=True, **fields))
    floor = cost.case_cost(case.method, case.op, case.mode, case.n, case.C, case.T, case.dtype,
                           case.sinkhorn_iters)
    got = traffic.measure(case, floor, timeout_s=300)
    m = got["bytes_measured"] or {}
    print(f"\n{case.label()}: analytic {floor.read}/{floor.write} B, measured {m.get('read')}/"
          f"{m.get('write')} B, L2 {m.get('l2')} B, {got['kernel_count']} kernels, "
          f"amplification {got['amplification']}, reason {got['traffic_reason']}")
    for k in m.get("per_kernel", []):
        print(f"    {k}")
    assert got["traffic_reason"] is None, got["traffic_reason"]
    return got, floor


def test_residual_add_moves_its_analytic_bytes_within_15_percent():
    got, floor = _measure(method="residual", backend="torch")
    assert got["kernel_count"] == 1                   # x + f is one elementwise kernel
    assert abs(got["amplification"] - 1) <= 0.15
    assert abs(got["bytes_measured"]["read"] / floor.read - 1) <= 0.15


def test_fused_mhc_post_kernel_is_measured_near_its_floor():
    got, floor = _measure(method="mhc", backend="triton", op="post", n=4)
    assert got["kernel_count"] >= 1
    assert 0.7 <= got["amplification"] <= 1.5
    assert 0.85 <= got["bytes_measured"]["read"] / floor.read <= 1.5
