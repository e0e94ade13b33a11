"""The timer's three kinds of time (suite.measure.timing): host gaps between kernels stay out of the
padded device time and appear in the wall clock and the back-to-back time."""
import time

import pytest
import torch

from suite.measure.timing import Timer


def _gappy(device: str, kernels: int = 50, gap_s: float = 2e-4):
    x = torch.ones(64, device=device)

    def fn():
        for _ in range(kernels):
            x.mul_(1.0)
            time.sleep(gap_s)         # host work between two kernels
    return fn


def test_wall_on_cpu_is_perf_counter():
    timer = Timer("cpu")
    t = timer.wall(_gappy("cpu", kernels=5, gap_s=1e-3), samples=3)
    assert len(t.samples) == 3 and len(t.device_ms) == 3 and len(t.enqueue_ms) == 3
    assert min(t.samples) >= 5.0            # five 1 ms sleeps
    summary = t.summary()
    assert summary["device_span_ms"] and summary["enqueue_ms"]


def test_time_records_back_to_back_on_cpu():
    t = Timer("cpu").time(_gappy("cpu", kernels=2, gap_s=1e-3), warmup_ms=1, rep_ms=1,
                          min_samples=3, b2b_calls=3)
    assert t.b2b_ms is not None and t.b2b_ms >= 2.0
    assert t.summary()["b2b_ms"] == t.b2b_ms


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_host_gaps_appear_in_wall_clock_not_in_padded_device_time():
    timer = Timer("cuda")
    fn = _gappy("cuda")          # 50 tiny kernels, 0.2 ms of host work between them: >= 10 ms
    padded = timer.time(fn, warmup_ms=20, rep_ms=50, min_samples=5, b2b_calls=3)
    wall = timer.wall(fn, samples=5)
    assert wall.median >= 10.0, wall.median
    assert padded.b2b_ms >= 10.0, padded.b2b_ms
    # The pad holds the GPU while the host enqueues the whole call: the 50 kernels then run
    # back to back in well under the host's 10 ms.
    assert padded.median < 0.2 * wall.median, (padded.median, wall.median)
    # The event span of an unpadded call follows the host: its kernels wait for their launches.
    assert min(wall.device_ms) >= 5.0, wall.device_ms
