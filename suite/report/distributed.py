"""Report sections of the distributed cases (records only): p2p bandwidth and the pipeline /
data overlap table. A stand-in row says so in its `link` column, in the terminal and in
report.md alike."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from suite.report import terminal

STANDIN_MARK = "stand-in (H2D/D2H copies)"
# What a stand-in measures, in one line: said beside every table or plot that shows one.
STANDIN_NOTE = ("one GPU; host-device copies over PCIe stand in for the link between GPUs "
                "(not NVLink or a network)")
P2P_HEADER = ["method", "n", "C", "T", "dtype", "gpus", "link", "message MiB", "us / message",
              "algbw GB/s", "rank spread us"]
OVERLAP_HEADER = ["parallel", "method", "n", "C", "T", "L", "gpus", "link", "mb", "recompute",
                  "overlap", "step ms", "compute ms", "comm ms", "exposed ms", "overlap eff",
                  "MiB / step", "algbw GB/s", "busbw GB/s", "rank spread ms"]


def op_label(c: dict) -> str:
    """The `op` column of the main table for a distributed case."""
    if c.get("parallel") == "p2p":
        return "p2p stand-in" if c["gpus"] == 1 else f"p2p gpus={c['gpus']}"
    where = "stand-in" if c["gpus"] == 1 and c["parallel"] == "pipeline" else f"gpus={c['gpus']}"
    mb = f" mb={c['microbatches']}" if c.get("microbatches") else ""
    return f"{c['parallel']} {where} L={c.get('layers')}{mb} ov={c.get('overlap')}"


def link_label(r: dict) -> str:
    """The `link` column of a distributed record: the stand-in mark, or the link's first word."""
    if r.get("standin"):
        return STANDIN_MARK
    return (r.get("link") or "").split(" ")[0]


def _f(v, fmt="{:.3g}", scale=1.0) -> str:
    return "" if v is None else fmt.format(v * scale)


def _key(r):
    c = r["case"]
    order = {"residual": 0, "hc": 1, "mhc": 2}
    return (c.get("parallel"), c["device"], c["C"], c["T"], c["gpus"], c.get("layers") or 0,
            c.get("recompute") or "", order.get(c["method"], 9), c.get("overlap") or "")


def p2p_rows(records: list[dict]) -> list[list[str]]:
    out = []
    for r in sorted((r for r in records if r["status"] == "ok"
                     and r["case"].get("parallel") == "p2p"), key=_key):
        c = r["case"]
        spread = (r.get("rank_spread_ms") or {}).get("message")
        out.append([c["method"], str(c["n"]), str(c["C"]), str(c["T"]), c["dtype"],
                    str(c["gpus"]), link_label(r), _f(r["message_bytes"], "{:.2f}", 2**-20),
                    _f(r["time_ms"]["median"], "{:.1f}", 1e3), _f(r["algbw_gbps"], "{:.1f}"),
                    _f(spread, "{:.1f}", 1e3)])
    return out


def overlap_rows(records: list[dict]) -> list[list[str]]:
    out = []
    for r in sorted((r for r in records if r["status"] == "ok"
                     and r["case"].get("parallel") in ("pipeline", "data")), key=_key):
        c = r["case"]
        nbytes = r.get("bytes_per_step") or r.get("allreduce_bytes")
        spread = (r.get("rank_spread_ms") or {}).get("step")
        out.append([c["parallel"], c["method"], str(c["n"]), str(c["C"]), str(c["T"]),
                    str(c.get("layers")), str(c["gpus"]), link_label(r),
                    str(c.get("microbatches") or ""), str(c.get("recompute")),
                    str(c.get("overlap")), _f(r["t_step_ms"], "{:.4g}"),
                    _f(r["t_compute_ms"], "{:.4g}"), _f(r["t_comm_ms"], "{:.4g}"),
                    _f(r["exposed_comm_ms"], "{:.3g}"), _f(r["overlap_efficiency"], "{:.2f}"),
                    _f(nbytes, "{:.1f}", 2**-20), _f(r.get("algbw_gbps", r.get("gbps")), "{:.1f}"),
                    # nccl-tests' busbw: all-reduce algbw * 2 (G-1) / G; a pipeline link's is its algbw
                    _f(r.get("busbw_gbps", r.get("algbw_gbps", r.get("gbps"))), "{:.1f}"),
                    _f(spread, "{:.3g}")])
    return out


NOTES = [
    ("Every time is the maximum over the case's ranks of each sample (a barrier before each), "
     "then the median; `rank spread` is the largest minus the smallest per-rank median."),
    ("p2p: algbw as nccl-tests defines it for sendrecv: message bytes / time of one message "
     "(busbw = algbw); n = 4 messages are 4 times a residual model's."),
    ("pipeline / data: `compute` is the same step with one-element messages (pipeline: every "
     "dependency kept) or without the all-reduce (data: DDP no_sync); `comm` the messages or "
     "all-reduces alone; exposed = step - compute; overlap eff = (compute + comm - step) / "
     "min(compute, comm): 1 fully hidden, 0 not hidden at all, below 0 worse than serial."),
    (f"Rows whose link reads `{STANDIN_MARK}` ran on one GPU: host-device copies on a copy engine "
     "(pinned memory, PCIe) stand in for the link between stages; the pipeline stand-in is one "
     "middle stage (stage 1 of 3) holding all L layers. They show what hiding a copy of n times "
     "the bytes costs on one GPU, not NVLink or InfiniBand numbers. The copies run on copy "
     "engines, not on SMs, so there the high-priority post stream has nothing to preempt."),
]


def markdown_lines(records: list[dict]) -> list[str]:
    p2p, ov = p2p_rows(records), overlap_rows(records)
    if not p2p and not ov:
        return []
    lines = ["", "## Many GPUs: pipeline messages and how much of them is hidden", ""]
    lines += [f"- {n}" for n in NOTES]
    for header, body in ((P2P_HEADER, p2p), (OVERLAP_HEADER, ov)):
        if body:
            lines += ["", "| " + " | ".join(header) + " |",
                      "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


# Columns said once under a narrow terminal's table when every row shares them, and columns left
# out (least needed first) while it is still too wide; report.md keeps them all.
SHARED = ("parallel", "method", "n", "C", "T", "dtype", "L", "gpus", "link", "mb", "recompute")
LEAST_NEEDED = ("rank spread us", "rank spread ms", "MiB / step", "message MiB", "busbw GB/s",
                "compute ms", "comm ms", "recompute", "mb", "T", "link")


def print_tables(records: list[dict], console: Console) -> None:
    for title, header, body in (("p2p (algbw, nccl-tests sendrecv)", P2P_HEADER,
                                 p2p_rows(records)),
                                ("pipeline / data overlap", OVERLAP_HEADER,
                                 overlap_rows(records))):
        if not body:
            continue
        columns, note = terminal.fit(header, body, console, SHARED, LEAST_NEEDED)
        table = Table(title=title)
        for name, _ in columns:
            table.add_column(name, no_wrap=True)
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console.print(table)
        if note:
            console.print(note, highlight=False, markup=False, soft_wrap=False)
    if any(r.get("standin") for r in records):
        console.print(f"rows with link `{STANDIN_MARK}`: {STANDIN_NOTE}", highlight=False,
                      markup=False)
