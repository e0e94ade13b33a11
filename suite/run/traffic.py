"""Measured memory traffic: one extra pass of a case under Nsight Compute (ncu), in a child process.

    ncu --nvtx --nvtx-include hcbench/ --metrics <DRAM read, DRAM write, L2, duration> --csv
        --print-units base --cache-control all --clock-control none
        --target-processes application-only  <python> -m suite.run.traffic_probe <case JSON>

The probe (suite/run/traffic_probe.py) builds the case's inputs through suite/workload, runs the op once
outside the NVTX range (compilation, autotuning and allocation stay out of the counts) and once
inside it. This module builds the command, runs it with a time limit, parses the CSV
(suite/measure/ncu_csv.py) and returns the record fields:

    bytes_measured  {read, write, l2, per_kernel: [{name, read, write, l2, time_ns}]}
    kernel_count    kernels launched inside the range
    amplification   (measured read + write) / (analytic read + write)
    traffic_reason  None when measured; otherwise why not (no ncu, ERR_NVGPUCTRPERM, timeout ...)
    traffic_tool    the ncu version and the options the numbers depend on

Times never come from this pass: ncu replays and serialises kernels.

Why these options:
- `--cache-control all` flushes and invalidates the caches before every profiled kernel, so a
  kernel's DRAM bytes are its own, not the write-back of lines a previous kernel (or the timer's
  writing L2 flush) left dirty. The probe therefore does not flush L2 itself. The price: two
  kernels of one op cannot share data through L2 here. At this suite's sizes (tensors of
  hundreds of MB against an L2 of 50 MB) that sharing is small.
- A kernel's output lines still in L2 when it ends are written back after it, outside its count
  (the sample in tests/data: a 134 MB add wrote 118 MB to DRAM inside the kernel). DRAM writes are
  therefore a lower bound, short by at most about one L2 per kernel; `l2` (lts__t_bytes) is all
  traffic through L2, reads and writes.
- `--clock-control none`: ncu locks clocks to base by default; this project never changes clocks.
- Push/pop NVTX ranges are per thread and autograd launches backward kernels from its own device
  thread, so a fwd+bwd case would count its forward only: such cases are not profiled (reason).
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from suite.analysis.cost import Cost
from suite.measure import ncu_csv

ROOT = Path(__file__).resolve().parents[2]   # the repository root
NVTX_RANGE = "hcbench"                       # must not contain '/': ncu reads it as a separator
READ, WRITE, L2, DURATION = ("dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_bytes.sum",
                             "gpu__time_duration.sum")
METRICS = (READ, WRITE, L2, DURATION)
NCU_OPTIONS = ("--cache-control", "all", "--clock-control", "none",
               "--target-processes", "application-only")
DEFAULT_NCU = "/usr/local/cuda/bin/ncu"
TIMEOUT_S = 600.0
PROBE_ERROR = "hcbench-probe-error:"          # the probe's last line when the op raised


class TrafficUnavailable(Exception):
    """Counters could not be read for this case; `reason` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def find_ncu(explicit: str | None = None) -> str | None:
    """$HCBENCH_NCU, then ncu on PATH, then CUDA's default install path."""
    for candidate in (explicit, os.environ.get("HCBENCH_NCU"), shutil.which("ncu"), DEFAULT_NCU):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def unavailable(case, ncu: str | None) -> str | None:
    """Why this case's traffic cannot be measured here (before starting anything), or None."""
    if case.device != "cuda":
        return "traffic is measured on a CUDA GPU only (case device is cpu)"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if ncu is None:
        return ("Nsight Compute (ncu) not found: set HCBENCH_NCU or put ncu on PATH "
                f"(looked at PATH and {DEFAULT_NCU})")
    return None


def command(ncu: str, case, python: str | None = None) -> list[str]:
    """The profiler command line for one case (the case travels as JSON, run-control included)."""
    return [ncu, "--nvtx", "--nvtx-include", f"{NVTX_RANGE}/", "--metrics", ",".join(METRICS),
            "--csv", "--print-units", "base", *NCU_OPTIONS,
            python or sys.executable, "-m", "suite.run.traffic_probe", json.dumps(case.to_dict())]


def run_profiler(cmd: list[str], timeout_s: float) -> str:
    """Runs the command in its own process group; returns stdout+stderr or raises TrafficUnavailable.

    On a timeout, or if the caller is interrupted (the case's own deadline, Ctrl-C), the whole
    group is killed: ncu and the profiled python under it.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)
    except OSError as exc:
        raise TrafficUnavailable(f"cannot start ncu: {exc.strerror or exc}") from None
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        raise TrafficUnavailable(f"ncu pass timed out after {timeout_s:g} s") from None
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    diagnose(out, proc.returncode)
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def diagnose(out: str, returncode: int) -> None:
    """Raises TrafficUnavailable with the cause when the output holds no usable table."""
    if "ERR_NVGPUCTRPERM" in out:
        raise TrafficUnavailable("no permission to read GPU performance counters (ERR_NVGPUCTRPERM); "
                                 "see https://developer.nvidia.com/ERR_NVGPUCTRPERM")
    lines = out.splitlines()
    probe_error = [ln for ln in lines if ln.startswith(PROBE_ERROR)]
    if probe_error:
        raise TrafficUnavailable("profiled run failed: " + probe_error[-1][len(PROBE_ERROR):].strip())
    errors = [ln.split("==ERROR==", 1)[1].strip() for ln in lines if "==ERROR==" in ln]
    unsupported = [e for e in errors if re.search(r"not supported|unsupported", e, re.IGNORECASE)]
    if unsupported:
        raise TrafficUnavailable(f"ncu: {unsupported[0]}")
    if any(re.search(r"No kernels were profiled", ln) for ln in lines):
        raise TrafficUnavailable(f"ncu profiled no kernel inside the NVTX range '{NVTX_RANGE}'")
    if errors:   # e.g. a kernel it failed to profile: a table without it would undercount
        raise TrafficUnavailable(f"ncu reported an error: {errors[0]}")
    if returncode != 0 and not any(ln.startswith('"ID"') for ln in lines):
        detail = lines[-1].strip() if lines else "no output"
        raise TrafficUnavailable(f"ncu exited with status {returncode}: {detail}")


@functools.lru_cache(maxsize=4)
def ncu_version(ncu: str) -> str | None:
    """'2025.3.1.0' from `ncu --version`, or None if it does not say."""
    try:
        out = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=60,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"Version (\d[\w.]*)", out)
    return m.group(1) if m else None


def summarise(kernels: list[ncu_csv.KernelMetrics], analytic: Cost) -> dict:
    """Record fields from parsed kernels: per-kernel and summed bytes, kernel count, amplification."""
    if not kernels:
        raise TrafficUnavailable(f"no kernel in ncu's output for the NVTX range '{NVTX_RANGE}'")
    missing = sorted({m for k in kernels for m in (READ, WRITE) if m not in k.metrics})
    if missing:
        raise TrafficUnavailable(f"ncu gave no value for {', '.join(missing)}")
    per_kernel = [{"name": ncu_csv.short_kernel_name(k.name),
                   "read": int(k.metrics[READ]), "write": int(k.metrics[WRITE]),
                   "l2": _int_or_none(k.metrics.get(L2)),
                   "time_ns": _int_or_none(k.metrics.get(DURATION))} for k in kernels]
    read = sum(k["read"] for k in per_kernel)
    write = sum(k["write"] for k in per_kernel)
    l2 = (sum(k["l2"] for k in per_kernel) if all(k["l2"] is not None for k in per_kernel)
          else None)
    return {"bytes_measured": {"read": read, "write": write, "l2": l2, "per_kernel": per_kernel},
            "kernel_count": len(per_kernel),
            "amplification": amplification(read + write, analytic.total)}


def amplification(measured: float, analytic: float) -> float | None:
    """measured / analytic; None when the analytic count is zero (nothing to compare with)."""
    return measured / analytic if analytic > 0 else None


def _int_or_none(v):
    return None if v is None else int(v)


def empty_fields(reason: str | None) -> dict:
    return {"bytes_measured": None, "kernel_count": None, "amplification": None,
            "traffic_reason": reason}


def measure(case, analytic: Cost, timeout_s: float = TIMEOUT_S, ncu: str | None = None) -> dict:
    """The record fields for one case; never raises for a profiler problem (the reason says it)."""
    ncu = find_ncu(ncu)
    reason = unavailable(case, ncu)
    if reason:
        return empty_fields(reason)
    if timeout_s < 1:
        return empty_fields("no time left for the ncu pass within the case's timeout_s")
    t0 = time.perf_counter()
    try:
        out = run_profiler(command(ncu, case), timeout_s)
        fields = summarise(ncu_csv.parse(out), analytic)
    except TrafficUnavailable as exc:
        return empty_fields(exc.reason)
    except ncu_csv.NcuParseError as exc:
        return empty_fields(f"cannot read ncu's output: {exc}")
    fields["traffic_reason"] = None
    fields["traffic_tool"] = {"ncu": ncu_version(ncu), "metrics": list(METRICS),
                              "options": " ".join(NCU_OPTIONS), "nvtx_range": NVTX_RANGE,
                              "wall_s": round(time.perf_counter() - t0, 1)}
    return fields
