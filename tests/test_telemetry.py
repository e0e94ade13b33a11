"""GPU telemetry without a GPU: a fake NVML module stands in for pynvml, so the sampler, the UUID
lookup, the wrapped queries, the pre-run check and the flag rules are tested on any machine."""
import os
import time
from types import SimpleNamespace

import pytest

from suite.measure import telemetry


class NotSupported(Exception):
    def __str__(self):
        return "Not Supported"


class FakeNvml:
    """Two devices; the one the tests want is at NVML index 1 with UUID GPU-bbbb."""
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 0, 1, 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC = 1, 0
    nvmlClocksThrottleReasonGpuIdle = 0x1
    nvmlClocksThrottleReasonApplicationsClocksSetting = 0x2
    nvmlClocksThrottleReasonSwPowerCap = 0x4
    nvmlClocksThrottleReasonHwSlowdown = 0x8
    nvmlClocksThrottleReasonSwThermalSlowdown = 0x20
    nvmlClocksThrottleReasonHwThermalSlowdown = 0x40
    nvmlClocksThrottleReasonHwPowerBrakeSlowdown = 0x80

    def __init__(self, sm=(1980,), reasons=(0,), pids=(), ecc=0, mig=0, fail_init=False):
        self.sm, self.reasons, self.pids, self.ecc, self.mig = list(sm), list(reasons), pids, ecc, mig
        self.fail_init = fail_init
        self.handles_queried = set()
        self.shutdowns = 0
        self.calls = 0

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("driver not loaded")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"handle{i}"

    def nvmlDeviceGetUUID(self, h):
        return {"handle0": b"GPU-aaaa", "handle1": "GPU-bbbb"}[h]

    def _next(self, seq):
        return seq.pop(0) if len(seq) > 1 else seq[0]

    def nvmlDeviceGetClockInfo(self, h, kind):
        self.handles_queried.add(h)
        if kind == self.NVML_CLOCK_SM:
            self.calls += 1
            return self._next(self.sm)
        return 2619

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return 1980 if kind == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetPowerUsage(self, h):
        raise NotSupported()

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 41

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._next(self.reasons)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p) for p in self.pids]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return []

    def nvmlDeviceGetMigMode(self, h):
        return (self.mig, self.mig)

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        return self.ecc


# ------------------------------------------------------------------ sampler
def test_sampler_finds_the_device_by_uuid_and_summarises_min_median_max():
    nvml = FakeNvml(sm=[1980, 1980, 1965, 1980])
    with telemetry.Sampler("bbbb", interval_s=0.01, nvml=nvml) as s:
        time.sleep(0.1)
    assert nvml.handles_queried == {"handle1"}           # index 1, matched by UUID
    assert nvml.shutdowns == 1
    t = s.summary()
    assert t["samples"] >= 3 and t["interval_s"] == 0.01
    assert t["sm_mhz"] == {"min": 1965, "median": 1980, "max": 1980}
    assert t["mem_mhz"]["median"] == 2619 and t["temperature_c"]["max"] == 41
    assert t["power_w"] is None and t["errors"] == {"power_w": "Not Supported"}   # wrapped, noted once
    assert t["throttle_reasons"] == [] and t["other_processes"] == 0
    assert telemetry.flags(t, None) == ([], [])


def test_sampler_without_gpu_or_nvml_does_nothing_and_says_why(monkeypatch):
    with telemetry.Sampler(None) as s:
        pass
    assert s.summary() is None
    with telemetry.Sampler("cccc", nvml=FakeNvml()) as s:
        pass
    assert s.summary() == {"nvml": "no NVML device with UUID cccc"}

    def no_nvml():
        raise ImportError("No module named 'pynvml'")
    monkeypatch.setattr(telemetry, "_load_nvml", no_nvml)
    with telemetry.Sampler("bbbb") as s:
        pass
    assert s.summary()["nvml"].startswith("NVML unavailable: ImportError")
    with telemetry.Sampler("bbbb", nvml=FakeNvml(fail_init=True)) as s:
        pass
    assert "driver not loaded" in s.summary()["nvml"]


def test_a_throttled_busy_gpu_with_a_neighbour_is_flagged_from_real_samples():
    thermal = FakeNvml.nvmlClocksThrottleReasonSwThermalSlowdown
    nvml = FakeNvml(sm=[1980, 1700], reasons=[0, thermal], pids=[os.getpid(), 4242])
    with telemetry.Sampler("bbbb", interval_s=0.01, nvml=nvml) as s:
        time.sleep(0.05)
    codes, notes = telemetry.flags(s.summary(), None)
    assert codes == ["clock_drop", "thermal_throttle", "other_process"]
    assert notes[0] == "clock_drop: SM clock 1700-1980 MHz"


# ------------------------------------------------------------------ flag rules on fake telemetry
def _samples(*rows):
    """rows of (sm_mhz, reasons, other_processes)."""
    return [{"sm_mhz": sm, "mem_mhz": 2619, "power_w": 300.0, "temperature_c": 50,
             "throttle_reasons": list(reasons), "other_processes": others} for sm, reasons, others in rows]


def test_flag_rules():
    steady = telemetry.summarise(_samples((1980, [], 0), (1975, [], 0), (1980, [], 0)), 0.05)
    assert telemetry.flags(steady, None) == ([], [])
    dropped = telemetry.summarise(_samples((1980, [], 0), (1800, [], 0)), 0.05)
    assert telemetry.flags(dropped, None)[0] == ["clock_drop"]          # 1800 < 95% of 1980
    small = telemetry.summarise(_samples((1980, [], 0), (1890, [], 0)), 0.05)
    assert telemetry.flags(small, None)[0] == []                        # 4.5%: within the band
    idle = telemetry.summarise(_samples((345, ["GpuIdle"], 0), (1980, [], 0)), 0.05)
    assert telemetry.flags(idle, None)[0] == []                         # an idle sample is no drop
    for reason, code in (("SwThermalSlowdown", "thermal_throttle"), ("HwThermalSlowdown", "thermal_throttle"),
                         ("SwPowerCap", "power_throttle"), ("HwPowerBrakeSlowdown", "power_throttle"),
                         ("HwSlowdown", "hw_slowdown")):
        t = telemetry.summarise(_samples((1980, [], 0), (1980, [reason], 0)), 0.05)
        assert telemetry.flags(t, None)[0] == [code], reason
    benign = telemetry.summarise(_samples((1980, ["ApplicationsClocksSetting"], 0)), 0.05)
    assert telemetry.flags(benign, None)[0] == []
    neighbour = telemetry.summarise(_samples((1980, [], 0), (1980, [], 2)), 0.05)
    assert telemetry.flags(neighbour, None) == (["other_process"],
                                               ["other_process: 2 other process(es) on the GPU"])
    wide = {"median": 1.0, "p10": 0.97, "p90": 1.0301, "cv": 0.02}
    assert telemetry.flags(steady, wide)[0] == ["wide_spread"]
    assert telemetry.flags(steady, {**wide, "p90": 1.019})[0] == []                # within 5%
    # one outlier: a CV of 86% with p10-p90 within 2% is not noisy
    assert telemetry.flags(steady, {"median": 1.0, "p10": 0.99, "p90": 1.01, "cv": 0.86})[0] == []
    assert telemetry.flags(None, {"median": 1.0, "p10": 0.9, "p90": 1.1, "cv": 0.2}) == (
        ["wide_spread"], ["wide_spread: p10-p90 20.0% of the median > 5% (CV 20.0%)"])  # CPU case
    assert telemetry.flags({"nvml": "NVML unavailable"}, None) == ([], [])
    memory = telemetry.summarise([{**s, "mem_mhz": m} for s, m in zip(
        _samples((1980, [], 0), (1980, [], 0)), (2619, 1593))], 0.05)
    assert telemetry.flags(memory, None)[1] == ["clock_drop: memory clock 1593-2619 MHz"]


def test_other_processes_are_counted_without_this_one():
    me = os.getpid()
    assert telemetry.count_other_processes([me, 7], me) == 1
    assert telemetry.count_other_processes([me], me) == 0
    # pids from the host's namespace: one of them is this process when it holds a context
    assert telemetry.count_other_processes([123456], me, own_context=True) == 0
    assert telemetry.count_other_processes([123456], me, own_context=False) == 1
    assert telemetry.count_other_processes([], me) == 0
    assert telemetry.count_other_processes(None, me) is None


# ------------------------------------------------------------------ pre-run check
def test_gpu_state_check_lists_each_problem():
    power_cap = FakeNvml.nvmlClocksThrottleReasonSwPowerCap
    bad = telemetry.check_gpu_state("GPU-bbbb", own_context=True,
                                    nvml=FakeNvml(reasons=[power_cap], pids=[os.getpid(), 99], ecc=3, mig=1))
    assert bad["max_sm_mhz"] == 1980 and bad["mig_mode"] == 1 and bad["ecc_uncorrected"] == 3
    assert bad["problems"] == [
        "1 other process(es) hold a context on the GPU",
        "clocks are being slowed now: SwPowerCap",
        "3 uncorrected ECC errors since the driver loaded",
        "MIG is enabled: the numbers are for one GPU instance, not the whole GPU"]
    good = telemetry.check_gpu_state("GPU-bbbb", own_context=False,
                                     nvml=FakeNvml(reasons=[FakeNvml.nvmlClocksThrottleReasonGpuIdle]))
    assert good["problems"] == [] and good["throttle_reasons"] == ["GpuIdle"]
    assert telemetry.check_gpu_state(None, own_context=False) == {"nvml": "no GPU UUID", "problems": []}


@pytest.mark.gpu
def test_real_nvml_sampler_reads_this_gpu():
    import torch

    from suite.measure import env
    uuid = env.gpu_info(0)["uuid"]
    x = torch.randn(4096, 4096, device="cuda")
    with telemetry.Sampler(uuid, interval_s=0.01) as s:
        for _ in range(50):
            x = x @ x / 64
        torch.cuda.synchronize()
    t = s.summary()
    assert "nvml" not in t, t
    assert t["samples"] >= 2 and t["sm_mhz"]["max"] > 0
