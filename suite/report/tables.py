"""Reports, from records only: the terminal table, report.md, and comparisons of two runs."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from suite.analysis import overhead, regression
from suite.core.scenario import sinkhorn_label
from suite.measure import telemetry
from suite.report import (distributed as dist_report, sections as report_sections,
                          stability as stability_report, terminal)
from suite.store.runs import atomic_write, device_model, not_run, read_env, read_records

COLUMNS = ("method", "backend", "op", "n", "C", "T", "dtype", "mode", "device", "sinkhorn_iters")
# Every field that changes what is measured, so a ratio joins exactly the same case.
IDENTITY = tuple(c for c in COLUMNS if c != "backend") + ("scope", "gpus")
IDENTITY += ("layers", "heads", "mlp_ratio", "seq", "vocab", "recompute", "L_r")
IDENTITY += ("parallel", "microbatches", "overlap")
HEADER = {"sinkhorn_iters": "iters"}
ORDER = {"residual": 0, "hc": 1, "mhc": 2}
BACKEND_ORDER = {"torch": 0, "compile": 1, "triton": 2, "tilelang": 3, "liger": 4}


def sort_key(r: dict):
    c = r["case"]
    return (c["device"], c["mode"], c["op"], c["C"], c["T"], c["n"], ORDER.get(c["method"], 9),
            BACKEND_ORDER.get(c["backend"], 9), c["dtype"])


def baseline_backend(records: list[dict]) -> str | None:
    """The backend other backends are shown as a ratio to: triton if it ran, else torch."""
    ran = {r["case"]["backend"] for r in records if r["status"] == "ok"}
    if len(ran) < 2:
        return None
    for name in ("triton", "torch"):
        if name in ran:
            return name
    return None


def ratios_to(records: list[dict], base: str | None) -> dict[str, float]:
    """case_id -> median time over the same case's time with backend `base`."""
    if base is None:
        return {}
    ref = {tuple(r["case"].get(k) for k in IDENTITY): r["time_ms"]["median"]
           for r in records if r["status"] == "ok" and r["case"]["backend"] == base}
    out = {}
    for r in records:
        key = tuple(r["case"].get(k) for k in IDENTITY)
        if r["status"] == "ok" and key in ref:
            out[r["case_id"]] = r["time_ms"]["median"] / ref[key]
    return out


def rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    base = baseline_backend(records)
    ratio = ratios_to(records, base)
    header = [HEADER.get(c, c) for c in COLUMNS] + ["median ms", "p10-p90 ms", "cv %", "GB/s", "% copy", "peak MiB"]
    if base:
        header.append(f"x {base}")
    header.append("status")
    body = []
    for r in sorted(records, key=sort_key):
        c, t = r["case"], r.get("time_ms")
        row = ["" if c.get(k) is None else str(c.get(k)) for k in COLUMNS]
        if c.get("scope", "site") != "site":   # a whole layer or step: say so where op would be
            lr = f"/{c['L_r']}" if c.get("L_r") else ""
            row[COLUMNS.index("op")] = f"{c['scope']} L={c.get('layers')} rc={c.get('recompute')}{lr}"
        if c.get("op") == "chain":             # a chain: its sites; the time is the whole chain's
            row[COLUMNS.index("op")] = f"chain L={c.get('sites')}"
        if c.get("parallel"):
            row[COLUMNS.index("op")] = dist_report.op_label(c)
        if r["status"] == "ok":
            spread = telemetry.relative_spread(t)
            noisy = " !" if spread is not None and spread > telemetry.SPREAD_LIMIT else ""
            row += [f"{t['median']:.4g}", f"{t['p10']:.4g}-{t['p90']:.4g}{noisy}", f"{100 * t['cv']:.1f}",
                    _fmt(r.get("gbps"), "{:.0f}"), _fmt(r.get("pct_of_copy"), "{:.1f}"),
                    _fmt(r.get("peak_mem_bytes"), "{:.0f}", scale=2**-20)]
        else:
            row += [""] * 6
        if base:
            row.append(_fmt(ratio.get(r["case_id"]), "{:.2f}"))
        row.append(r["status"])
        body.append(row)
    return header, body


def _fmt(value, fmt, scale=1.0):
    return "" if value is None else fmt.format(value * scale)


def reasons(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    grouped = defaultdict(list)
    for r in records:
        if r["status"] != "ok":
            grouped[(r["status"], r.get("reason") or "no reason given")].append(r)
    return grouped


def case_label(r: dict) -> str:
    c = r["case"]
    n = "" if c["method"] == "residual" else f" n={c['n']}"
    n += sinkhorn_label(c.get("sinkhorn_iters"))
    op = "" if c["op"] == "site" else f" {c['op']}"
    op += f" L={c.get('sites')}" if c["op"] == "chain" else ""
    if c.get("scope", "site") != "site":
        lr = f" L_r={c['L_r']}" if c.get("L_r") else ""
        op = f" {c['scope']} L={c.get('layers')} recompute={c.get('recompute')}{lr}"
        if c.get("boundary_fusion") is False:
            op += " unfused-boundaries"
        if c["scope"] == "stability":
            op += f" lr={c.get('lr'):g}" + (f" init={c['init']}" if c.get("init") else "")
    if c.get("parallel"):
        op = " " + dist_report.op_label(c)
    return f"{c['method']}/{c['backend']}{op}{n} C={c['C']} T={c['T']} {c['dtype']} {c['mode']} {c['device']}"


def print_run(run_dir: Path, console: Console | None = None) -> None:
    console = console or Console()
    records = read_records(run_dir)
    env = read_env(run_dir)
    header, body = rows(records)
    columns, notes = _fit(header, body, console)
    excess = terminal.table_width(columns, console) - console.width
    table = Table(title=f"{Path(run_dir).name}  ({_device_line(env)})", show_lines=False)
    for name, values in columns:
        text = name.split("/")[0] in TEXT_COLUMNS
        # Only the op label wraps (at its spaces, or inside a word): a number cut to "0.0…" reads
        # as another number, so every other column keeps its full width. The op column is given
        # its width, as rich would otherwise squeeze a wrapping column down to nothing.
        width = max(OP_MIN_WIDTH, max(map(len, [name, *values])) - excess) \
            if name == "op" and excess > 0 else None
        table.add_column(name, justify="left" if text else "right", no_wrap=name != "op",
                         overflow="fold" if name == "op" else "ellipsis", width=width)
    style = {"ok": None, "skipped": "yellow", "failed": "red"}
    for i, row in enumerate(body):
        table.add_row(*[values[i] for _, values in columns], style=style.get(row[-1]))
    console.print(table)
    if notes:
        console.print(notes, highlight=False, markup=False)
    for (status, why), recs in reasons(records).items():
        # escaped: a reason is text from an exception ("[enforce fail ...]"), never markup
        console.print(f"[{'red' if status == 'failed' else 'yellow'}]{status} ({len(recs)}): "
                      f"{escape(why)}[/]", highlight=False)
        for r in recs[:50]:
            console.print(f"    {case_label(r)}", highlight=False, markup=False)
    report_sections.print_traffic(records, console)
    stability_report.print_table(records, console)
    dist_report.print_tables(records, console)
    flags = report_sections.flags_line(records)
    if flags:
        console.print(flags, highlight=False, markup=False)
    console.print(_summary(records, len(not_run(run_dir, records)), run_dir), highlight=False, markup=False)


# The terminal table, narrowed to the console by priority; report.md keeps every column.
TEXT_COLUMNS = ("method", "backend", "op", "dtype", "mode", "device", "status", "method/backend",
                "dtype/mode/device")
OP_MIN_WIDTH = 12
SHORT_HEADER = {"median ms": "median", "p10-p90 ms": "p10-p90", "% copy": "%copy", "peak MiB": "MiB"}


def _fit(header: list[str], body: list[list[str]], console: Console) -> tuple[list, str]:
    """The columns (name, values) of the run table that fit the console, and a line saying what
    went out of the table. Each step is taken only while the table is still too wide, least needed
    first; the median, its noise mark, the ratio and the status stay to the end."""
    cols = [(h, [row[i] for row in body]) for i, h in enumerate(header)]
    if terminal.table_width(cols, console) <= console.width:
        return cols, ""
    long_name = {short: name for name, short in SHORT_HEADER.items()}
    identity = [HEADER.get(c, c) for c in COLUMNS]
    left_out, fixed = [], []

    def get(name):
        return dict(cols).get(name)

    def drop(name, why=None):
        if get(name) is not None:
            cols[:] = [c for c in cols if c[0] != name]
            left_out.append(long_name.get(name, name) if why is None else why)

    def merge(*parts):
        have = [h for h, _ in cols if h in parts]
        if len(have) > 1:
            at = [h for h, _ in cols].index(have[0])
            merged = ("/".join(have), ["/".join(cells) for cells in zip(*map(get, have))])
            cols[:] = [c for c in cols if c[0] not in have]
            cols.insert(at, merged)

    def constant_identity():
        # a field every row shares says nothing per row: said once, below the table
        for name, values in list(cols):
            if name in identity and len(set(values)) == 1 and values[0]:
                fixed.append(f"{name} {values[0]}")
                cols.remove((name, values))

    def short_headers():
        cols[:] = [(SHORT_HEADER.get(h, h), v) for h, v in cols]

    def into_median(source, cell):
        median, other = get("median"), get(source)
        if median is not None and other is not None:
            joined = [cell(m, o) for m, o in zip(median, other)]
            cols[:] = [(h, joined if h == "median" else v) for h, v in cols]
            drop(source, "p10-p90 ms (a median marked ! has a wide one)" if source == "p10-p90" else "")

    steps = [constant_identity, short_headers, lambda: drop("cv %"), lambda: drop("MiB"),
             # a row that was not timed has no median: its status takes that cell
             lambda: into_median("status", lambda m, st: m or st),
             lambda: merge("method", "backend"), lambda: merge("n", "C", "T"),
             lambda: merge("dtype", "mode", "device"), lambda: drop("GB/s"),
             # the p10-p90 range goes; its verdict (wider than the noise limit) stays on the median
             lambda: into_median("p10-p90", lambda m, p: m + (" !" if p.endswith("!") else ""))]
    for step in steps:
        step()
        if terminal.table_width(cols, console) <= console.width:
            break
    notes = [f"every row: {', '.join(fixed)}"] if fixed else []
    if get("median") is not None:
        notes.append("times in ms")
    left_out = [n for n in left_out if n]
    if left_out:
        notes.append(f"left out at {console.width} columns, all in report.md: {', '.join(left_out)}")
    return cols, "; ".join(notes)


def _summary(records: list[dict], not_run: int = 0, run_dir: Path | None = None) -> str:
    counts = defaultdict(int)
    for r in records:
        counts[r["status"]] += 1
    line = ", ".join(f"{counts[s]} {s}" for s in ("ok", "skipped", "failed")) + f" of {len(records)} cases"
    if not_run:
        line += (f"; {not_run} {'case' if not_run == 1 else 'cases'} not run (interrupted; "
                 f"`python harness.py run --resume {run_dir}` runs {'it' if not_run == 1 else 'them'})")
    return line


def _device_line(env: dict) -> str:
    parts = []
    if env.get("gpus"):
        g = env["gpus"][0]
        parts.append(f"{g['name']}, {g['sms']} SMs")
    else:
        parts.append(f"CPU {env.get('cpu', {}).get('model', '?')}")
    for device, rate in (env.get("copy_rate") or {}).items():
        parts.append(f"copy {device} {rate['gbps']:.0f} GB/s")
    return "; ".join(parts)


def markdown(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    env = read_env(run_dir)
    v = env.get("versions", {})
    lines = [f"# Run {run_dir.name}", ""]
    lines.append(f"- Device: {_device_line(env)}")
    if env.get("gpus"):
        g = env["gpus"][0]
        clocks = g.get("clocks") or {}
        lines.append(f"- GPU state at start: SM {clocks.get('sm_mhz')} MHz, memory "
                     f"{clocks.get('mem_mhz')} MHz, power {g.get('power_w')} W, throttle "
                     f"{g.get('throttle_reasons')}, driver {g.get('driver')}, UUID {g.get('uuid')}")
    lines.append(f"- CPU: {env.get('cpu', {}).get('model')}; host {env.get('host')}")
    lines.append("- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    lines.append(f"- {_summary(records, len(not_run(run_dir, records)), run_dir)}")
    lines += ["", "Times are medians over >= 30 samples (L2 flushed before each call on a GPU); "
              "GB/s counts the floor bytes of MATH.md (each input read once, each output written "
              "once), so % copy is the fraction of the copy-rate roofline reached. "
              + ("`x B` is the time relative to backend B on the same case. "
                 if baseline_backend(records) else "")
              + f"A p10-p90 range marked `!` is wider than {100 * telemetry.SPREAD_LIMIT:.0f}% of "
                "the median: that median is noisy (the CV is shown as information; a few outliers "
                "move it alone).", ""]
    header, body = rows(records)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in body]
    variants = sorted({(r["case"]["backend"], r["check"]["reference"]) for r in records
                       if r.get("check") and r["check"].get("reference", "MATH.md") != "MATH.md"})
    if variants:
        lines += ["", "## Backends checked against a declared variant of MATH.md", ""]
        lines += [f"- **{backend}**: {what}" for backend, what in variants]
    lines += report_sections.traffic_markdown(records)
    lines += stability_report.markdown_lines(records)
    lines += report_sections.state_markdown(records, env)
    lines += overhead.markdown_lines(records, env)
    lines += dist_report.markdown_lines(records)
    grouped = reasons(records)
    if grouped:
        lines += ["", "## Skipped and failed cases", ""]
        for (status, why), recs in grouped.items():
            lines.append(f"- **{status}** ({len(recs)}): {why}")
            lines += [f"  - {case_label(r)}" for r in recs]
    return "\n".join(lines) + "\n"


def write_markdown(run_dir: Path) -> Path:
    path = Path(run_dir) / "report.md"
    atomic_write(path, markdown(run_dir))
    return path


@dataclass
class Comparison:
    joined: int                    # cases ok in both runs with the same kernel settings
    regressions: list[str]         # one line per regression of B against A


def compare(run_a: Path, run_b: Path, console: Console | None = None,
            pct: float = regression.REGRESSION_PCT) -> Comparison:
    """Joins two runs by case id; prints B's time over A's and the regression rule's verdict of B
    against A (suite/analysis/regression.py, with A as the only earlier run)."""
    console = console or Console()
    a = {r["case_id"]: r for r in read_records(run_a) if r["status"] == "ok"}
    b = {r["case_id"]: r for r in read_records(run_b) if r["status"] == "ok"}
    env_a, env_b = read_env(run_a), read_env(run_b)
    # A case timed with other kernel settings is another measurement: never joined.
    tuned = [k for k in b if k in a
             and (a[k].get("kernel_settings") or {}) != (b[k].get("kernel_settings") or {})]
    both = [k for k in b if k in a and k not in tuned]
    same_gpu = device_model(env_a) == device_model(env_b)
    table = Table(title=f"B / A   A = {Path(run_a).name} ({_device_line(env_a)})   "
                        f"B = {Path(run_b).name} ({_device_line(env_b)})")
    for h in [HEADER.get(c, c) for c in COLUMNS] + ["A ms", "B ms", "B/A", "A % copy", "B % copy",
                                                    "verdict"]:
        table.add_column(h)
    found = []
    for k in sorted(both, key=lambda k: sort_key(b[k])):
        ra, rb = a[k], b[k]
        ta, tb = ra["time_ms"]["median"], rb["time_ms"]["median"]
        verdict, style = "other GPU model", None
        if same_gpu:
            j = regression.judge(tb, regression.environment(env_b),
                                 [(ta, ra["time_ms"].get("p10", ta), ra["time_ms"].get("p90", ta),
                                   regression.environment(env_a))], pct)
            verdict = j.verdict if not j.env_change else f"{j.verdict}: {'; '.join(j.env_change)}"
            style = {"regression": "red", "improvement": "green"}.get(j.verdict)
            if j.verdict == "regression":
                found.append(f"{device_model(env_b)} | {case_label(rb)} [{k}]: {tb:.4g} ms, "
                             f"{regression.describe(j, tb)}")
        table.add_row(*["" if rb["case"].get(c) is None else str(rb["case"][c]) for c in COLUMNS],
                      f"{ta:.4g}", f"{tb:.4g}",
                      f"{tb / ta:.3f}", _fmt(ra.get("pct_of_copy"), "{:.1f}"),
                      _fmt(rb.get("pct_of_copy"), "{:.1f}"), escape(verdict), style=style)
    console.print(table)
    padded = {name: any("launch_pad_ms" in r["time_ms"] for r in run.values())
              for name, run in (("A", a), ("B", b))}
    if padded["A"] != padded["B"]:
        old = "A" if not padded["A"] else "B"
        console.print(f"warning: run {old} was timed before the launch pad (suite/measure/timing.py): its "
                      "samples include host launch overhead, so short ops read slower there")
    only = len(set(a) ^ set(b))
    if tuned:
        ka, kb = a[tuned[0]].get("kernel_settings"), b[tuned[0]].get("kernel_settings")
        console.print(f"{len(tuned)} cases not joined: their kernel settings differ "
                      f"(A: {ka or 'default'}; B: {kb or 'default'})", markup=False)
    if not same_gpu:
        console.print(f"A and B ran on different devices ({device_model(env_a)}, {device_model(env_b)}): "
                      "ratios only, no regression verdict", markup=False)
    console.print(f"{len(both)} cases in both runs; {only} ok in only one of them; "
                  f"{len(found)} regression(s) of B against A "
                  f"(> {pct:g}% slower and above A's p10-p90 band)", markup=False)
    return Comparison(len(both), found)

