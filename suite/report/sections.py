"""Report sections beside the main table, from records and env.json only: measured memory traffic
(analytic vs measured vs the paper's figure) and the GPU's state (the pre-run check, each case's
telemetry and flags). suite/report/tables.py appends them to report.md and to the terminal output.
"""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from suite.analysis.paper_traffic import paper_figure

GB = 1e9


def _case_key(r: dict):
    c = r["case"]
    order = {"residual": 0, "hc": 1, "mhc": 2}
    backends = {"torch": 0, "compile": 1, "triton": 2, "tilelang": 3, "liger": 4}
    return (c["mode"], c["op"] != "post", c["C"], c["T"], c["n"], order.get(c["method"], 9),
            c["op"], backends.get(c["backend"], 9))


def traffic_records(records: list[dict]) -> list[dict]:
    return sorted((r for r in records if r["case"].get("traffic") or "bytes_measured" in r),
                  key=_case_key)


def _gb(nbytes) -> str:
    return f"{nbytes / GB:.4g}"


def _rw(read, write) -> str:
    return f"{_gb(read)} / {_gb(write)}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else ""


TRAFFIC_HEADER = ["method", "backend", "op", "n", "C", "T", "analytic GB r/w", "measured GB r/w",
                  "L2 GB", "kernels", "measured / analytic", "paper GB r/w", "measured / paper",
                  "paper's figure (elements per token)", "note"]


def traffic_rows(records: list[dict]) -> list[list[str]]:
    body = []
    for r in traffic_records(records):
        c = r["case"]
        row = [c["method"], c["backend"], c["op"], str(c["n"]), str(c["C"]), str(c["T"])]
        analytic = r.get("bytes")
        measured = r.get("bytes_measured")
        paper = paper_figure(c["method"], c["op"], c["mode"], c["n"], c["C"], c["T"], c["dtype"])
        row.append(_rw(analytic["read"], analytic["write"]) if analytic else "")
        if measured:
            total = measured["read"] + measured["write"]
            row += [_rw(measured["read"], measured["write"]),
                    _gb(measured["l2"]) if measured.get("l2") is not None else "",
                    str(r.get("kernel_count", "")),
                    f"{r['amplification']:.2f}" if r.get("amplification") is not None else ""]
        else:
            total = None
            row += ["", "", "", ""]
        if paper:
            row += [_rw(paper.read, paper.write), _ratio(total, paper.total), paper.source]
        else:
            row += ["", "", "MATH.md floor only" if c["method"] == "mhc" and c["op"] == "site" else ""]
        if r["status"] != "ok":
            note = f"{r['status']}: {r.get('reason') or ''}"
        else:
            note = r.get("traffic_reason") or ""
        row.append(note)
        body.append(row)
    return body


def traffic_markdown(records: list[dict]) -> list[str]:
    body = traffic_rows(records)
    if not body:
        return []
    lines = ["", "## Memory traffic: analytic, measured, and the paper's figures", "",
             ("Measured bytes come from one extra pass of each case under Nsight Compute (DRAM bytes "
             "read and written by the kernels inside the NVTX range, caches flushed before each "
             "kernel); times always come from the timed run. `measured / analytic` is the "
             "amplification over MATH.md's floor (each input read once, each output written "
             "once). The paper's figure is Table 2 or section 4.3.1 of the mHC paper, per token "
             "times T, C terms at the state dtype's size and coefficients at 4 bytes. DRAM writes "
             "are a lower bound: lines still in L2 when a kernel ends are written back after it "
             "(up to about one L2 per kernel). L2 GB is all traffic through L2."), ""]
    lines.append("| " + " | ".join(TRAFFIC_HEADER) + " |")
    lines.append("|" + "|".join("---" for _ in TRAFFIC_HEADER) + "|")
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    return lines


TERMINAL_COLUMNS = ("method", "backend", "op", "n", "C", "analytic GB r/w", "measured GB r/w",
                    "kernels", "measured / analytic", "measured / paper")


def print_traffic(records: list[dict], console: Console) -> None:
    """A narrower table than report.md's; the reasons for unmeasured rows are listed below it."""
    body = traffic_rows(records)
    if not body:
        return
    keep = [TRAFFIC_HEADER.index(h) for h in TERMINAL_COLUMNS]
    table = Table(title="memory traffic (GB = 1e9 bytes; x = measured over analytic or paper)")
    for h in TERMINAL_COLUMNS:
        table.add_column(h.replace("measured / ", "x "), justify="left" if h in (
            "method", "backend", "op") else "right")
    notes: dict[str, int] = {}
    for row in body:
        table.add_row(*[row[i] for i in keep])
        if row[-1]:
            notes[row[-1]] = notes.get(row[-1], 0) + 1
    console.print(table)
    for note, count in notes.items():
        console.print(f"traffic not measured ({count}): {note}", highlight=False, markup=False)


def _mmm(stats: dict | None, fmt: str = "{:.0f}") -> str:
    if not stats:
        return ""
    return "/".join(fmt.format(stats[k]) for k in ("min", "median", "max") if k in stats)


def _label(r: dict) -> str:
    c = r["case"]
    n = "" if c["method"] == "residual" else f" n={c['n']}"
    op = "" if c["op"] == "site" else f" {c['op']}"
    return f"{c['method']}/{c['backend']}{op}{n} C={c['C']} T={c['T']} {c['mode']}"


def state_markdown(records: list[dict], env: dict) -> list[str]:
    """The pre-run GPU check, the telemetry of each GPU case and the flags raised."""
    check = env.get("gpu_state_check")
    sampled = [r for r in records if isinstance(r.get("telemetry"), dict)
               and r["telemetry"].get("samples")]
    flagged = [r for r in records if r.get("flags")]
    if not (check or sampled or flagged):
        return []
    lines = ["", "## GPU state and flagged cases", ""]
    if check:
        if check.get("nvml"):
            lines.append(f"- Before the run: not read ({check['nvml']})")
        else:
            lines.append(
                f"- Before the run: SM {check.get('sm_mhz')} MHz (max {check.get('max_sm_mhz')}), "
                f"memory {check.get('mem_mhz')} MHz (max {check.get('max_mem_mhz')}), "
                f"{check.get('power_w')} W, {check.get('temperature_c')} C, throttle reasons "
                f"{check.get('throttle_reasons')}, other processes {check.get('other_processes')}, "
                f"uncorrected ECC errors {check.get('ecc_uncorrected')}, MIG mode {check.get('mig_mode')}")
            problems = check.get("problems") or []
            lines.append("- Problems found before the run: " + ("; ".join(problems) if problems else "none"))
    if sampled:
        lines += ["", ("Sampled by NVML during each timed case (min/median/max); flags: "
                       "clock_drop, thermal_throttle, power_throttle, hw_slowdown, other_process, "
                       "wide_spread (p10-p90 wider than 5% of the median; records before it: high_cv, CV > 5%)."), "",
                  "| case | samples | SM MHz | memory MHz | power W | temperature C | throttle reasons | flags |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(sampled, key=_case_key):
            t = r["telemetry"]
            lines.append(f"| {_label(r)} | {t['samples']} | {_mmm(t.get('sm_mhz'))} | "
                         f"{_mmm(t.get('mem_mhz'))} | {_mmm(t.get('power_w'))} | "
                         f"{_mmm(t.get('temperature_c'))} | {', '.join(t.get('throttle_reasons') or [])} | "
                         f"{', '.join(r.get('flags') or [])} |")
    if flagged:
        lines += ["", f"Flagged cases ({len(flagged)}):", ""]
        lines += [f"- {_label(r)} ({r['case']['device']}): {'; '.join(r.get('flag_notes') or r['flags'])}"
                  for r in sorted(flagged, key=_case_key)]
    return lines


def flags_line(records: list[dict]) -> str | None:
    flagged = [r for r in records if r.get("flags")]
    if not flagged:
        return None
    counts: dict[str, int] = {}
    for r in flagged:
        for f in r["flags"]:
            counts[f] = counts.get(f, 0) + 1
    return (f"flagged: {len(flagged)} cases (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + "); see report.md")
