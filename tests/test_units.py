"""Cost model, timing statistics, tolerance arithmetic and the results store, each alone."""
import json
import math
import sqlite3
import time

import pytest
import torch

from suite.analysis import cost
from suite.core.tolerance import rel_err, tolerance
from suite.measure.timing import (MIN_SAMPLES, PAD_CAP_MS, Timer, Timing, copy_rate_gbps,
                                  launch_pad_ms)
from suite.store.runs import History, RunStore, atomic_write, read_records


# ---------------------------------------------------------------- cost (MATH.md table, ANCHORS.md)
def test_site_floor_matches_anchors():
    # ANCHORS.md: floor bytes (3n+2)C x 2 B x T = 1.88 GB at C=4096, 3.29 GB at C=7168.
    for C, gb in ((4096, 1.88), (7168, 3.29)):
        c = cost.case_cost("mhc", "site", "fwd", 4, C, 16384, "bf16")
        assert abs(c.total / 1e9 - gb) < 0.01 + 0.005 * gb   # + coefficients and phi, small


def test_post_bytes_match_anchors():
    for C, gb in ((2560, 0.75), (4096, 1.21), (7168, 2.11)):
        c = cost.case_cost("mhc", "post", "fwd", 4, C, 16384, "bf16")
        assert abs(c.total / 1e9 - gb) < 0.01


def test_post_forward_elements_per_token():
    n, C, T = 4, 1024, 1
    c = cost.forward_cost("hc", "post", n, C, T, "bf16", 0)
    assert c.read == (n + 1) * C * 2 + (n + n * n) * 4 and c.write == n * C * 2


def test_post_fwd_bwd_is_5n_plus_3_elements():
    n, C = 4, 4096
    c = cost.case_cost("mhc", "post", "fwd+bwd", n, C, 1, "bf16")
    state = c.total - 3 * (n + n * n) * 4
    assert state == (5 * n + 3) * C * 2


def test_residual_site_is_3C_forward_and_7C_with_backward():
    C = 4096
    assert cost.case_cost("residual", "site", "fwd", 1, C, 1, "bf16").total == 3 * C * 2
    assert cost.case_cost("residual", "site", "fwd+bwd", 1, C, 1, "bf16").total == 7 * C * 2
    assert cost.case_cost("residual", "pre", "fwd", 1, C, 1, "bf16").total == 0


def test_site_is_pre_plus_post_forward():
    for method in ("hc", "mhc"):
        args = (method, 4, 2560, 100, "fp16", 20)
        site = cost.forward_cost(method, "site", *args[1:])
        pre = cost.forward_cost(method, "pre", *args[1:])
        post = cost.forward_cost(method, "post", *args[1:])
        assert site.read == pre.read + post.read and site.write == pre.write + post.write


def test_mhc_flops_are_dominated_by_the_gemm():
    n, C, T = 4, 4096, 16384
    c = cost.case_cost("mhc", "coeffs", "fwd", n, C, T, "bf16")
    gemm = 2 * T * n * C * (n * n + 2 * n)
    assert gemm <= c.flops < 1.2 * gemm


# ---------------------------------------------------------------- timing
def test_timing_statistics():
    t = Timing([float(i) for i in range(1, 101)])
    assert t.median == 50.5
    assert t.quantile(0.1) == pytest.approx(10.9)
    assert t.quantile(0.9) == pytest.approx(90.1)
    s = t.summary()
    assert s["n"] == 100 and len(s["samples"]) == 100 and 0.5 < s["cv"] < 0.6


def test_cpu_timer_takes_at_least_min_samples_and_excludes_warmup():
    calls = []
    timing = Timer("cpu").time(lambda: calls.append(1), warmup_ms=1, rep_ms=1)
    assert len(timing.samples) >= MIN_SAMPLES
    assert len(calls) > len(timing.samples)          # warm-up calls were made and not kept
    assert all(s >= 0 for s in timing.samples)


def test_launch_pad_covers_the_slowest_enqueue_and_is_capped():
    assert launch_pad_ms([]) == 0.0
    pad = launch_pad_ms([0.04, 0.12, 0.05])
    assert pad > 0.12 and pad < 0.5                  # longer than any enqueue seen, not absurdly
    assert launch_pad_ms([500.0]) == PAD_CAP_MS      # an enqueue that syncs is not slept away
    s = Timing([1.0, 2.0], host_ms=0.1, pad_ms=pad).summary()
    assert s["host_ms"] == 0.1 and s["launch_pad_ms"] == pad


def test_cpu_timer_has_no_launch_pad():
    timing = Timer("cpu").time(lambda: None, warmup_ms=1, rep_ms=1)
    assert timing.pad_ms == 0.0 and timing.host_ms is None


@pytest.mark.gpu
def test_gpu_launch_pad_hides_host_overhead():
    """A call that spends ~2 ms in Python before one tiny kernel: unpadded, the host time is in
    the sample; padded, only the kernel is."""
    x = torch.ones(1024, device="cuda")

    def slow_host():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 2e-3:
            pass
        x.add_(1)

    timing = Timer("cuda").time(slow_host, warmup_ms=5, rep_ms=5)
    assert timing.host_ms >= 2.0 and timing.pad_ms > timing.host_ms
    assert timing.median < 0.5, timing.summary()


def test_copy_rate_is_positive():
    rate = copy_rate_gbps(Timer("cpu"), nbytes=2**20)
    assert rate["gbps"] > 0 and rate["time_ms"]["n"] >= MIN_SAMPLES


# ---------------------------------------------------------------- tolerance
def test_rel_err_is_normwise_and_nan_never_passes():
    ref = torch.tensor([3.0, 4.0])
    assert rel_err(ref, ref) == 0
    assert rel_err(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert rel_err(torch.tensor([float("nan"), 4.0]), ref) == math.inf
    assert rel_err(torch.tensor([float("inf"), 4.0]), ref) == math.inf
    with pytest.raises(ValueError):
        rel_err(torch.zeros(3), ref)
    assert tolerance(torch.bfloat16) > tolerance(torch.float16) > tolerance(torch.float32)


# ---------------------------------------------------------------- store
def _record(case_id, status="ok", median=1.0):
    case = {"method": "mhc", "backend": "torch", "op": "site", "n": 4, "C": 8, "T": 4,
            "dtype": "fp32", "mode": "fwd", "device": "cpu"}
    return {"case_id": case_id, "case": case, "status": status,
            "time_ms": {"median": median, "p10": median, "p90": median, "cv": 0.0}}


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, "old")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        atomic_write(path, Boom())         # fails mid-write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]   # no temp file left behind


def test_run_store_keeps_one_record_per_case_and_history_upserts(tmp_path):
    store = RunStore(tmp_path / "run1")
    store.add(_record("a"))
    store.add(_record("b", "failed"))
    store.add(_record("a", median=2.0))          # a rerun replaces, never duplicates
    recs = read_records(tmp_path / "run1")
    assert [r["case_id"] for r in recs] == ["b", "a"] and recs[1]["time_ms"]["median"] == 2.0
    store.close()          # the history takes records in batches, and all of them at close
    con = sqlite3.connect(tmp_path / "history.sqlite")
    rows = con.execute("SELECT case_id, status, median_ms FROM records ORDER BY case_id").fetchall()
    assert rows == [("a", "ok", 2.0), ("b", "failed", 1.0)]
    again = RunStore(tmp_path / "run1")
    assert {r["case_id"] for r in again.records} == {"a", "b"}
    again.close()


def test_history_records_runs(tmp_path):
    h = History(tmp_path / "history.sqlite")
    env = {"captured_utc": "t", "host": "h", "gpus": [{"name": "NVIDIA H100"}]}
    h.add_run("r1", env, ["s.yaml"], tmp_path)
    h.add_run("r1", env, ["s.yaml"], tmp_path)
    con = sqlite3.connect(tmp_path / "history.sqlite")
    assert con.execute("SELECT run_id, gpu FROM runs").fetchall() == [("r1", "NVIDIA H100")]


def test_corrupt_records_file_is_a_clear_error(tmp_path):
    (tmp_path / "records.jsonl").write_text(json.dumps(_record("a")) + "\n{not json\n")
    with pytest.raises(ValueError, match="records.jsonl: line 2"):
        read_records(tmp_path)
