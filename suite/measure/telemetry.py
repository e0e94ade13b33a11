"""The GPU's state around the measurements, read through NVML; nothing here changes clocks or power.

- `check_gpu_state`: before a run, the clocks, throttle reasons, other processes, ECC errors and
  MIG mode of the GPU, with the problems found (stored in env.json, printed as warnings).
- `Sampler`: during each timed case, a background thread samples SM and memory clocks, power,
  temperature, throttle reasons and other processes every SAMPLE_INTERVAL_S; `summary()` gives
  min / median / max per quantity (the record's `telemetry`).
- `flags`: the rules that mark a case whose numbers deserve less trust (the record's `flags`).

The NVML device is found by UUID (suite.measure.env.nvml_handle), never by index. Every query is wrapped:
NotSupported is common (MIG slices, virtual GPUs), so a failed query gives None, is noted once in
`errors`, and never stops a run. Without a GPU or NVML the sampler records why and does nothing.

Other processes: NVML lists the processes holding a context on the GPU. In a container their pids
belong to the host's pid namespace, so this process may not find its own pid in the list. When it
does not, and it holds a context itself (always the case while a case is timed), one entry is
taken to be itself and only the rest count as others.
"""
from __future__ import annotations

import os
import statistics
import threading
import time

from suite.measure import env as environment

SAMPLE_INTERVAL_S = 0.05    # a sample costs a few NVML calls; 20 per second keep the timed loop undisturbed
CLOCK_DROP = 0.05           # a clock more than 5% below the case's highest sample is a drop
# (p90 - p10) / median above which a median is noisy (the report's "!"). A robust spread: a few
# outlier samples move the CV (86% was seen with p10-p90 within 2%), not the percentiles.
SPREAD_LIMIT = 0.05
THERMAL = ("SwThermalSlowdown", "HwThermalSlowdown")
POWER = ("SwPowerCap", "HwPowerBrakeSlowdown")
HW_SLOWDOWN = ("HwSlowdown",)
IDLE = "GpuIdle"
QUANTITIES = ("sm_mhz", "mem_mhz", "power_w", "temperature_c")


def _load_nvml():
    import pynvml
    return pynvml


class NvmlDevice:
    """One NVML device, found by UUID, with every query wrapped."""

    def __init__(self, nvml, handle):
        self.nvml = nvml
        self.handle = handle
        self.errors: dict[str, str] = {}
        self._decoded: dict[int, list[str] | None] = {}   # mask -> names: decoding scans pynvml's names

    def query(self, label: str, fn_name: str, *args):
        fn = getattr(self.nvml, fn_name, None)
        if fn is None:
            self.errors.setdefault(label, f"{fn_name} missing in this nvidia-ml-py")
            return None
        try:
            return fn(self.handle, *args)
        except Exception as exc:  # noqa: BLE001 - any NVML error (NotSupported...) means "no value"
            self.errors.setdefault(label, str(exc) or type(exc).__name__)
            return None

    def _const(self, name: str):
        return getattr(self.nvml, name, None)

    def throttle_reasons(self) -> list[str] | None:
        mask = self.query("throttle_reasons", "nvmlDeviceGetCurrentClocksEventReasons")
        if mask is None:
            self.errors.pop("throttle_reasons", None)
            mask = self.query("throttle_reasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
        if mask not in self._decoded:
            self._decoded[mask] = environment.decode_reasons(self.nvml, mask)
        return self._decoded[mask]

    def process_pids(self) -> list[int] | None:
        compute = self.query("processes", "nvmlDeviceGetComputeRunningProcesses")
        if compute is None:
            return None
        graphics = self.query("graphics_processes", "nvmlDeviceGetGraphicsRunningProcesses") or []
        return sorted({p.pid for p in list(compute) + list(graphics)})

    def sample(self, own_context: bool = True) -> dict:
        power = self.query("power_w", "nvmlDeviceGetPowerUsage")
        pids = self.process_pids()
        return {
            "t": time.monotonic(),
            "sm_mhz": self.query("sm_mhz", "nvmlDeviceGetClockInfo", self._const("NVML_CLOCK_SM")),
            "mem_mhz": self.query("mem_mhz", "nvmlDeviceGetClockInfo", self._const("NVML_CLOCK_MEM")),
            "power_w": power / 1000 if power is not None else None,
            "temperature_c": self.query("temperature_c", "nvmlDeviceGetTemperature",
                                        self._const("NVML_TEMPERATURE_GPU")),
            "throttle_reasons": self.throttle_reasons(),
            "other_processes": count_other_processes(pids, os.getpid(), own_context),
        }

    def static_state(self) -> dict:
        mig = self.query("mig_mode", "nvmlDeviceGetMigMode")
        return {
            "max_sm_mhz": self.query("max_sm_mhz", "nvmlDeviceGetMaxClockInfo",
                                     self._const("NVML_CLOCK_SM")),
            "max_mem_mhz": self.query("max_mem_mhz", "nvmlDeviceGetMaxClockInfo",
                                      self._const("NVML_CLOCK_MEM")),
            "mig_mode": mig[0] if isinstance(mig, (list, tuple)) else mig,
            "ecc_uncorrected": self.query("ecc_uncorrected", "nvmlDeviceGetTotalEccErrors",
                                          self._const("NVML_MEMORY_ERROR_TYPE_UNCORRECTED"),
                                          self._const("NVML_VOLATILE_ECC")),
        }


def count_other_processes(pids: list[int] | None, own_pid: int, own_context: bool = True) -> int | None:
    """Processes on the GPU besides this one (see the module docstring for `own_context`)."""
    if pids is None:
        return None
    if own_pid in pids:
        return len(pids) - 1
    return max(0, len(pids) - 1) if own_context else len(pids)


def open_device(uuid: str | None, nvml=None) -> tuple[NvmlDevice | None, str | None]:
    """(device, None), or (None, why not). `nvml` replaces the pynvml module (tests)."""
    if not uuid:
        return None, "no GPU UUID"
    try:
        nvml = nvml or _load_nvml()
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no pynvml, no driver: telemetry is optional
        return None, f"NVML unavailable: {type(exc).__name__}: {exc}"
    handle = environment.nvml_handle(nvml, uuid)
    if handle is None:
        _shutdown(nvml)
        return None, f"no NVML device with UUID {uuid}"
    return NvmlDevice(nvml, handle), None


def _shutdown(nvml) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001, S110 - nothing to do if NVML cannot shut down
        pass


class Sampler:
    """Samples the GPU in a background thread while the `with` block runs (one sample at each end)."""

    def __init__(self, uuid: str | None, interval_s: float = SAMPLE_INTERVAL_S, nvml=None):
        self.uuid = uuid
        self.interval_s = interval_s
        self._nvml = nvml
        self.samples: list[dict] = []
        self.device: NvmlDevice | None = None
        self.status: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.uuid is None:
            return self
        self.device, self.status = open_device(self.uuid, self._nvml)
        if self.device is not None:
            self.samples.append(self.device.sample())
            self._thread = threading.Thread(target=self._loop, name="hcbench-telemetry", daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.device.sample())

    def __exit__(self, *exc):
        if self.device is not None:
            self._stop.set()
            self._thread.join()
            self.samples.append(self.device.sample())
            _shutdown(self.device.nvml)
        return False

    def summary(self) -> dict | None:
        """None without a GPU; {"nvml": why} when NVML could not be read; else the statistics."""
        if self.uuid is None:
            return None
        if self.device is None:
            return {"nvml": self.status}
        return summarise(self.samples, self.interval_s, self.device.errors)


def summarise(samples: list[dict], interval_s: float, errors: dict | None = None) -> dict:
    """min / median / max per quantity, the throttle reasons seen, the most other processes seen."""
    out = {"samples": len(samples), "interval_s": interval_s}
    for q in QUANTITIES:
        values = [s[q] for s in samples if s.get(q) is not None]
        out[q] = ({"min": min(values), "median": statistics.median(values), "max": max(values)}
                  if values else None)
    busy = [s["sm_mhz"] for s in samples
            if s.get("sm_mhz") is not None and IDLE not in (s.get("throttle_reasons") or [])]
    out["sm_mhz_busy"] = ({"min": min(busy), "max": max(busy)} if busy else None)
    reasons = [r for s in samples for r in (s.get("throttle_reasons") or [])]
    out["throttle_reasons"] = sorted(set(reasons))
    others = [s["other_processes"] for s in samples if s.get("other_processes") is not None]
    out["other_processes"] = max(others) if others else None
    out["errors"] = dict(errors or {})
    return out


def relative_spread(time_ms: dict | None) -> float | None:
    """(p90 - p10) / median of a record's time_ms, or None without them."""
    t = time_ms or {}
    if not t.get("median") or t.get("p10") is None or t.get("p90") is None:
        return None
    return (t["p90"] - t["p10"]) / t["median"]


def flags(telemetry: dict | None, time_ms: dict | None) -> tuple[list[str], list[str]]:
    """(flag codes, one explanation per flag) for a case's telemetry summary and its time_ms.

    clock_drop        the SM clock, in samples where the GPU was not idle, or the memory clock fell
                      more than CLOCK_DROP below its highest sample in the same case
    thermal_throttle  a thermal slowdown reason was active in a sample
    power_throttle    a power cap or power brake reason was active in a sample
    hw_slowdown       the hardware slowdown reason was active (thermal or power, not told apart)
    other_process     another process held a context on the GPU in a sample
    wide_spread       the samples' p10-p90 range is more than SPREAD_LIMIT of the median (the
                      CV is in the note and in time_ms, as information: outliers move it alone)
    """
    codes, notes = [], []

    def add(code, note):
        codes.append(code)
        notes.append(f"{code}: {note}")

    t = telemetry or {}
    for label, stats in (("SM", t.get("sm_mhz_busy")), ("memory", t.get("mem_mhz"))):
        if stats and stats["max"] and stats["min"] < (1 - CLOCK_DROP) * stats["max"]:
            if "clock_drop" not in codes:
                add("clock_drop", f"{label} clock {stats['min']:g}-{stats['max']:g} MHz")
            else:
                notes[codes.index("clock_drop")] += f"; {label} clock {stats['min']:g}-{stats['max']:g} MHz"
    reasons = t.get("throttle_reasons") or []
    for code, names in (("thermal_throttle", THERMAL), ("power_throttle", POWER),
                        ("hw_slowdown", HW_SLOWDOWN)):
        seen = [r for r in reasons if r in names]
        if seen:
            add(code, ", ".join(seen))
    if t.get("other_processes"):
        add("other_process", f"{t['other_processes']} other process(es) on the GPU")
    spread = relative_spread(time_ms)
    if spread is not None and spread > SPREAD_LIMIT:
        cv = (time_ms or {}).get("cv")
        add("wide_spread", f"p10-p90 {100 * spread:.1f}% of the median > {100 * SPREAD_LIMIT:.0f}%"
            + (f" (CV {100 * cv:.1f}%)" if cv is not None else ""))
    return codes, notes


def check_gpu_state(uuid: str | None, own_context: bool, nvml=None) -> dict:
    """The GPU's state before a run, and the problems found in it (an empty list when none).

    own_context: whether this process already holds a CUDA context on the GPU (it does once it
    has measured the copy rate there), which decides how NVML's process list is read.
    """
    device, why = open_device(uuid, nvml)
    if device is None:
        return {"nvml": why, "problems": []}
    try:
        state = {**device.sample(own_context), **device.static_state()}
    finally:
        _shutdown(device.nvml)
    state.pop("t", None)
    state["errors"] = dict(device.errors)
    state["problems"] = state_problems(state)
    return state


def state_problems(state: dict) -> list[str]:
    """One line per thing about the GPU's state that makes its numbers less trustworthy."""
    problems = []
    if state.get("other_processes"):
        problems.append(f"{state['other_processes']} other process(es) hold a context on the GPU")
    reasons = state.get("throttle_reasons") or []
    active = [r for r in reasons if r in THERMAL + POWER + HW_SLOWDOWN]
    if active:
        problems.append(f"clocks are being slowed now: {', '.join(active)}")
    if state.get("ecc_uncorrected"):
        problems.append(f"{state['ecc_uncorrected']} uncorrected ECC errors since the driver loaded")
    if state.get("mig_mode") == 1:
        problems.append("MIG is enabled: the numbers are for one GPU instance, not the whole GPU")
    return problems
