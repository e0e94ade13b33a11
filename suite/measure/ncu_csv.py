"""Nsight Compute's `--csv` output, parsed into one entry per profiled kernel launch.

What ncu prints is not a clean CSV file: its banner, `==PROF==` / `==WARNING==` / `==ERROR==` lines
and the profiled program's own stdout come mixed with the table. The table starts at the header
line whose first field is "ID"; a data line is one that parses into exactly as many fields as the
header and whose ID is an integer, anything else is skipped.

Values carry thousands separators ("421,963,520") and a unit column; with the default
`--print-units auto` a value may be given in Kbyte, Mbyte, usecond... Every value is converted to
its base unit (bytes, nanoseconds) here, so callers never see a unit. An unknown unit is an error
rather than a silent factor of 1000.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field

# ncu scales decimally (Kbyte = 1000 bytes); the binary forms are accepted in case a version prints them.
UNIT_SCALE = {
    "byte": 1, "bytes": 1, "b": 1,
    "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
    "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
    "kibyte": 2**10, "mibyte": 2**20, "gibyte": 2**30, "tibyte": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "ns": 1, "nsecond": 1, "nsecs": 1, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6,
    "s": 1e9, "second": 1e9,
    "": 1, "%": 1, "cycle": 1, "cycles": 1,
}
REQUIRED_COLUMNS = ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")


class NcuParseError(ValueError):
    """The output has a table that cannot be read (unknown unit, unreadable value)."""


@dataclass
class KernelMetrics:
    """One profiled kernel launch: its name and its metrics in base units (bytes, ns)."""
    launch_id: int
    name: str
    process_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def to_base_unit(value: str, unit: str, metric: str = "") -> float:
    """'268,446,976' 'byte' -> 268446976.0; '1.5' 'Mbyte' -> 1.5e6; '222.02' 'usecond' -> 222020 ns."""
    text = value.strip().replace(",", "")
    try:
        number = float(text)
    except ValueError:
        raise NcuParseError(f"metric {metric or '?'}: value {value!r} is not a number") from None
    key = unit.strip().lower()
    if key not in UNIT_SCALE:
        raise NcuParseError(f"metric {metric or '?'}: unknown unit {unit!r}; known: "
                            f"{', '.join(sorted(k for k in UNIT_SCALE if k))}")
    return number * UNIT_SCALE[key]


def parse(text: str) -> list[KernelMetrics]:
    """Every profiled kernel launch in ncu's CSV output, in launch order; [] if there is no table."""
    header = None
    kernels: dict[tuple[str, int], KernelMetrics] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith('"'):
            continue                     # banner, ==PROF== lines, the program's own output
        try:
            fields = next(csv.reader([stripped]))
        except (csv.Error, StopIteration):
            continue
        if fields and fields[0] == "ID":
            missing = [c for c in REQUIRED_COLUMNS if c not in fields]
            if missing:
                raise NcuParseError(f"ncu CSV header lacks column(s) {', '.join(missing)}")
            header = {name: i for i, name in enumerate(fields)}
            continue
        if header is None or len(fields) != len(header):
            continue
        try:
            launch_id = int(fields[header["ID"]])
        except ValueError:
            continue
        pid = fields[header["Process ID"]] if "Process ID" in header else ""
        metric = fields[header["Metric Name"]]
        key = (pid, launch_id)
        if key not in kernels:
            kernels[key] = KernelMetrics(launch_id, fields[header["Kernel Name"]], pid)
        value = fields[header["Metric Value"]]
        if value.strip().lower() in ("n/a", ""):
            continue
        kernels[key].metrics[metric] = to_base_unit(value, fields[header["Metric Unit"]], metric)
    return list(kernels.values())


def short_kernel_name(name: str, limit: int = 100) -> str:
    """A demangled kernel name without its leading 'void ' and its argument list, at most `limit` chars."""
    name = name.strip().removeprefix("void ")
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i] if i > 0 else name
                break
    return name if len(name) <= limit else name[: limit - 3] + "..."
