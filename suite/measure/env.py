"""The environment a run measured on: GPU (through torch and NVML), CPU, library versions.

NVML devices are matched to CUDA devices by UUID, never by index, and every NVML query is wrapped:
NotSupported is common (MIG, virtual GPUs) and must not stop a run.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]   # the repository root
# Environment variables that change what a kernel does (its tiling, its path, its target): a run
# records their values, and runs with different values never join (suite.report.tables.compare, resume).
KERNEL_KNOB_PREFIXES = ("HCBENCH_MHC_PRE_", "HCBENCH_HC_PRE", "HCBENCH_POST_", "HCBENCH_TL_",
                        "HCBENCH_TILELANG_")
# Knob names used before every knob took the HCBENCH_ prefix: a run refuses to start with them
# set, rather than silently ignore them.
RETIRED_KNOBS = {"MHC_PRE_": "HCBENCH_MHC_PRE_", "HC_PRE_CONFIG": "HCBENCH_HC_PRE"}


def kernel_settings(environ=None) -> dict:
    """The kernel knobs set in the environment, by name (empty: every kernel at its default)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in sorted(environ.items()) if k.startswith(KERNEL_KNOB_PREFIXES)}


def retired_knobs(environ=None) -> list[str]:
    """One line per retired kernel knob set in the environment, naming its new name."""
    environ = os.environ if environ is None else environ
    return [f"{k}: kernel knobs are named {new}* now; rename it (it would be ignored)"
            for k in sorted(environ) for old, new in RETIRED_KNOBS.items() if k.startswith(old)]


def code_provenance() -> dict:
    """The code commit the suite runs from and whether its tracked files differ from it; None
    where git or the repository is not there."""
    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "tilelang", "liger-kernel", "transformer-engine", "nvidia-ml-py",
                 "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["cuda"] = torch.version.cuda
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvml_call(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None


def nvml_state(uuid: str) -> dict:
    """Clocks, power, temperature and throttle reasons of the NVML device with this UUID."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as exc:
        return {"nvml": f"unavailable: {type(exc).__name__}"}
    try:
        handle = nvml_handle(pynvml, uuid)
        if handle is None:
            return {"nvml": f"no NVML device with UUID {uuid}"}
        g = lambda fn, *a: _nvml_call(getattr(pynvml, fn), handle, *a)  # noqa: E731
        clocks = {name: g("nvmlDeviceGetClockInfo", getattr(pynvml, const))
                  for name, const in (("sm_mhz", "NVML_CLOCK_SM"), ("mem_mhz", "NVML_CLOCK_MEM"))}
        max_clocks = {name: g("nvmlDeviceGetMaxClockInfo", getattr(pynvml, const))
                      for name, const in (("sm_mhz", "NVML_CLOCK_SM"), ("mem_mhz", "NVML_CLOCK_MEM"))}
        power = g("nvmlDeviceGetPowerUsage")
        limit = g("nvmlDeviceGetEnforcedPowerLimit")
        reasons = g("nvmlDeviceGetCurrentClocksEventReasons") or g(
            "nvmlDeviceGetCurrentClocksThrottleReasons")
        procs = g("nvmlDeviceGetComputeRunningProcesses")
        mig = g("nvmlDeviceGetMigMode")
        return {
            "driver": _nvml_call(pynvml.nvmlSystemGetDriverVersion),
            "clocks": clocks, "max_clocks": max_clocks,
            "power_w": power / 1000 if power is not None else None,
            "power_limit_w": limit / 1000 if limit is not None else None,
            "temperature_c": g("nvmlDeviceGetTemperature", pynvml.NVML_TEMPERATURE_GPU),
            "throttle_reasons": decode_reasons(pynvml, reasons),
            "other_processes": [p.pid for p in procs if p.pid != os.getpid()] if procs else [],
            "mig_mode": mig[0] if isinstance(mig, (list, tuple)) else mig,
            "ecc_uncorrected": g("nvmlDeviceGetTotalEccErrors",
                                 pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC),
        }
    finally:
        _nvml_call(pynvml.nvmlShutdown)


def nvml_handle(pynvml, uuid: str):
    """The NVML device handle whose UUID is `uuid` (CUDA's and NVML's indices may differ), or None."""
    for i in range(_nvml_call(pynvml.nvmlDeviceGetCount) or 0):
        h = _nvml_call(pynvml.nvmlDeviceGetHandleByIndex, i)
        u = _nvml_call(pynvml.nvmlDeviceGetUUID, h) if h is not None else None
        u = u.decode() if isinstance(u, bytes) else u
        if u and _norm_uuid(u) == _norm_uuid(uuid):
            return h
    return None


def _norm_uuid(u: str) -> str:
    return u.lower().removeprefix("gpu-").removeprefix("mig-")


def decode_reasons(pynvml, mask) -> list[str] | None:
    if mask is None:
        return None
    names = []
    for attr in dir(pynvml):
        m = re.fullmatch(r"nvmlClocksThrottleReason(\w+)", attr)
        if m and m.group(1) not in ("All", "None", "Unknown"):
            bit = getattr(pynvml, attr)
            if isinstance(bit, int) and bit and mask & bit:
                names.append(m.group(1))
    return sorted(set(names))


def gpu_info(index: int = 0) -> dict:
    props = torch.cuda.get_device_properties(index)
    uuid = str(getattr(props, "uuid", "")) or None
    info = {
        "index": index, "name": props.name, "uuid": uuid,
        "sms": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "capability": f"{props.major}.{props.minor}",
    }
    if uuid:
        info.update(nvml_state(uuid))
    return info


def capture() -> dict:
    env = {
        "captured_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": {"model": cpu_model(), "cores": os.cpu_count()},
        "versions": versions(),
        "code": code_provenance(),
        "kernel_settings": kernel_settings(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        env["gpus"] = [gpu_info(i) for i in range(torch.cuda.device_count())]
    return env


def device_label(env: dict) -> str:
    """A short name for the run folder: the first GPU's name, or 'cpu'."""
    name = env["gpus"][0]["name"] if env["gpus"] else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name.replace("NVIDIA ", "")).strip("-").lower() or "gpu"
