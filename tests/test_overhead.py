"""Overhead arithmetic and interval, the step cost model and its predictions."""
import pytest

from suite.analysis import overhead, predict
from suite.core.scenario import Case, normalise


def interleaved(times_a, times_b, rounds=8, per_round=4):
    """Samples and round indices for two cases timed in alternating rounds."""
    a, b, ra = [], [], []
    for r in range(rounds):
        for k in range(per_round):
            a.append(times_a(r, k))
            b.append(times_b(r, k))
            ra.append(r)
    return (a, ra), (b, list(ra))


def test_overhead_pct():
    assert overhead.overhead_pct(106.7, 100.0) == pytest.approx(6.7)
    assert overhead.overhead_pct(90.0, 100.0) == pytest.approx(-10.0)


def test_bootstrap_interval_covers_a_known_overhead_and_narrows_with_less_noise():
    import random
    rng = random.Random(1)
    noisy = interleaved(lambda r, k: 110 * (1 + 0.02 * rng.gauss(0, 1)),
                        lambda r, k: 100 * (1 + 0.02 * rng.gauss(0, 1)))
    point, lo, hi = overhead.bootstrap_overhead(*noisy)
    assert lo < 10.0 < hi and lo <= point <= hi and hi - lo < 6
    quiet = interleaved(lambda r, k: 110 * (1 + 0.002 * rng.gauss(0, 1)),
                        lambda r, k: 100 * (1 + 0.002 * rng.gauss(0, 1)))
    _, qlo, qhi = overhead.bootstrap_overhead(*quiet)
    assert qhi - qlo < (hi - lo) / 3


def test_bootstrap_pairs_rounds_so_common_drift_cancels():
    # Both cases slow down together round by round: the ratio stays exactly 1.05.
    pair = interleaved(lambda r, k: 105 * (1 + 0.1 * r), lambda r, k: 100 * (1 + 0.1 * r))
    point, lo, hi = overhead.bootstrap_overhead(*pair)
    assert point == pytest.approx(5.0) and hi - lo < 20


def test_bootstrap_refuses_cases_not_timed_together():
    with pytest.raises(ValueError, match="not interleaved"):
        overhead.bootstrap_overhead(([1.0, 1.0], [0, 1]), ([1.0, 1.0], [2, 3]))


def test_crossing_width():
    pts = [(1280, 30.0), (2560, 12.0), (4096, 6.0), (7168, 4.0)]
    assert overhead.crossing_width(pts) == 4096
    assert overhead.crossing_width([(1280, 5.0), (2560, 8.0), (7168, 5.0)]) == 7168
    assert overhead.crossing_width([(1280, 9.0)]) is None


def step_case(method, C=2560, recompute="none", **kw):
    base = {"method": method, "C": C, "T": 4096, "n": 4, "dtype": "bf16", "mode": "fwd+bwd", "scope": "model",
                "device": "cuda", "layers": 12, "seq": 4096, "vocab": 8192, "recompute": recompute,
                "backend": "torch" if method == "residual" else "triton"}
    return normalise(Case(**{**base, **kw}))


def test_step_cost_counts_the_transformer_and_the_connection():
    res, mhc = predict.step_cost(step_case("residual")), predict.step_cost(step_case("mhc"))
    C, T, L = 2560, 4096, 12
    dense = 6 * (4 + 2 * 4) * C * C * T * L          # 6 FLOPs per weight per token
    assert res.matmul_flops > dense and res.matmul_flops == mhc.matmul_flops
    assert mhc.conn_bytes > 4 * res.conn_bytes      # the 14C floor against 3C, and backward
    full = predict.step_cost(step_case("mhc", recompute="full", L_r=1))
    assert full.matmul_flops > 1.3 * mhc.matmul_flops
    again = predict.step_cost(step_case("mhc", recompute="mhc", L_r=1))
    assert again.conn_bytes > mhc.conn_bytes and again.matmul_flops == mhc.matmul_flops


def test_predicted_overhead_falls_with_width_and_with_faster_memory():
    by_c = [predict.predicted_overhead(step_case("mhc", C=c), step_case("residual", C=c),
                                       3000, 700) for c in (1280, 2560, 7168)]
    assert by_c[0] > by_c[1] > by_c[2] > 0
    slow = predict.predicted_overhead(step_case("mhc"), step_case("residual"), 3000, 700, 0.3)
    assert slow > by_c[1]
    h200 = predict.rates_for("H200", "NVIDIA H100 80GB HBM3", 3000, 700)
    assert h200["copy_gbps"] == pytest.approx(3000 * 4800 / 3350)
    assert h200["matmul_tflops"] == pytest.approx(700)
    b200 = predict.rates_for("B200", "NVIDIA H100 80GB HBM3", 3000, 700)
    assert b200["matmul_tflops"] == pytest.approx(700 * 2250 / 989)
    # A run on a machine outside the table (a CPU) says nothing about these GPUs: datasheets then.
    h200_cpu = predict.rates_for("H200", None, 21, 0.5)
    b200_cpu = predict.rates_for("B200", "AMD EPYC", 21, 0.5)
    assert h200_cpu["copy_gbps"] == pytest.approx(predict.TYPICAL_COPY_FRACTION * 4800)
    assert b200_cpu["matmul_tflops"] == pytest.approx(predict.TYPICAL_MATMUL_FRACTION * 2250)
    assert h200_cpu["scaled_from"] is None
