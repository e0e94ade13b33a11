"""Tables of docs/results.md made from committed run folders, so that they cannot drift.

A page asks for a table with a block

    <!-- BEGIN table KIND results/RUN_FOLDER [FIELD=VALUE ...] -->
    (written by `python harness.py results-doc`)
    <!-- END table -->

and `render` rewrites what is between the markers from that folder's records.jsonl and env.json,
keeping the records whose case fields equal every FIELD=VALUE given (e.g. C=4096).
KIND is one of TABLES:
- `kernels`: median device ms of every backend per (method, op, mode, C, n), with its share of the
  copy-rate floor, and TileLang over Triton;
- `baseline`: median device ms per (method, n) and width C, one "a / b" cell per backend pair
  present (eager torch / compile); a case that failed on its time limit reads "timed out", one
  that has no record "not run";
- `chain`: op chain, one row per (n, C, mode), one column per backend: the time of one site
  (chain time / sites) with its share of the copy-rate floor of (3n+2)C forward and (8n+6)C
  forward+backward per site, and TE over Triton where both ran;
- `overhead`: the whole-step verdict per width (suite.analysis.overhead.verdict): wall clock per
  step, overhead against the residual with its interval, the device-only and no-optimizer
  overheads, and how far the host bounds the step.
- `verdict`: the README's claim-by-claim verdict (suite.report.verdict) from several run folders,
  comma-separated (`results/A,results/B`): the overhead, stability and traffic runs.
A block naming a folder that is not there, or a kind that is not known, is an error (the page
would cite what does not exist).
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from suite.analysis import overhead
from suite.report import verdict
from suite.store.runs import read_env, read_records

BLOCK = re.compile(r"(<!-- BEGIN table (?P<kind>[\w-]+) (?P<run>\S+)(?P<filters>(?: [\w]+=\S+)*) -->\n)"
                   r"(?P<body>.*?)(<!-- END table -->)", re.S)
BACKENDS = ("torch", "compile", "triton", "tilelang", "liger", "te")
METHOD_ORDER = {"residual": 0, "hc": 1, "mhc": 2}
OP_ORDER = {"site": 0, "coeffs": 1, "pre": 2, "post": 3}


class TableError(Exception):
    pass


def _load(run: Path) -> tuple[list[dict], dict]:
    if not (run / "records.jsonl").is_file():
        raise TableError(f"{run}: no records.jsonl (a table block names a run folder that is not there)")
    records = read_records(run)
    env = read_env(run)
    return records, env


def _cell(r: dict | None, ms=lambda r: r["time_ms"]["median"]) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return r.get("status") or "-"
    pct = r.get("pct_of_copy")
    return f"{ms(r):.3f}" + (f" ({pct:.0f}%)" if pct is not None else "")


def kernels_table(records: list[dict], env: dict) -> list[str]:
    """One row per (method, op, mode, C, n) of scope site, one column per backend present."""
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        c = r["case"]
        if c.get("scope", "site") != "site":
            continue
        cells[(c["method"], c["op"], c["mode"], c["C"], c["n"])][c["backend"]] = r
    present = [b for b in BACKENDS if any(b in row for row in cells.values())]
    ratio = "triton" in present and "tilelang" in present
    head = ["method", "op", "mode", "C", "n", *present] + (["tilelang / triton"] if ratio else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(cells, key=lambda k: (METHOD_ORDER.get(k[0], 9), OP_ORDER.get(k[1], 9),
                                            k[2] != "fwd", k[3], k[4])):
        row = cells[key]
        line = [*map(str, key), *(_cell(row.get(b)) for b in present)]
        if ratio:
            line.append(_ratio(row.get("tilelang"), row.get("triton"), lambda r: r["time_ms"]["median"]))
        out.append("| " + " | ".join(line) + " |")
    gpu = (env.get("gpus") or [{}])[0].get("name", "CPU")
    copy = ((env.get("copy_rate") or {}).get("cuda") or {}).get("gbps")
    return out + ["", f"Median ms of device time, L2 flushed (share of the copy-rate floor); {gpu}"
                  + (f", copy rate {copy:.0f} GB/s." if copy else ".")]


def _ratio(a: dict | None, b: dict | None, ms) -> str:
    """ms(a) / ms(b) where both records are ok, else "-"."""
    ok = a and b and a.get("status") == b.get("status") == "ok"
    return f"{ms(a) / ms(b):.2f}" if ok else "-"


def _ms(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r.get("status") == "ok":
        return f"{r['time_ms']['median']:.2f}"
    return "timed out" if "timed out" in (r.get("reason") or "") else r.get("status", "-")


def baseline_table(records: list[dict], env: dict) -> list[str]:
    """Rows (method, n), columns C; each cell the backends' medians side by side."""
    cells: dict[tuple, dict] = defaultdict(dict)
    for r in records:
        c = r["case"]
        if c.get("scope", "site") == "site" and c.get("op") == "site":
            cells[(c["method"], c["n"])][(c["C"], c["backend"])] = r
    widths = sorted({C for row in cells.values() for C, _ in row})
    present = [b for b in BACKENDS if any(b == be for row in cells.values() for _, be in row)]
    head = ["method", "n", *(f"C = {C}" for C in widths)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(cells, key=lambda k: (METHOD_ORDER.get(k[0], 9), k[1])):
        row = cells[key]
        out.append("| " + " | ".join([key[0], str(key[1]), *(
            " / ".join(_ms(row.get((C, b))) for b in present) for C in widths)]) + " |")
    gpu = (env.get("gpus") or [{}])[0].get("name", "CPU")
    modes = sorted({r["case"]["mode"] for r in records})
    return out + ["", f"{', '.join(modes)}: median ms of device time, L2 flushed "
                  f"({' / '.join(present)}); {gpu}."]


def chain_table(records: list[dict], env: dict) -> list[str]:
    """Rows (n, C, mode) of op chain, columns the backends present: per-site ms (% of floor)."""
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    sites = set()
    for r in records:
        c = r["case"]
        if c.get("op") == "chain":
            cells[(c["n"], c["C"], c["mode"])][c["backend"]] = r
            sites.add(c.get("sites"))
    present = [b for b in BACKENDS if any(b in row for row in cells.values())]
    ratio = "te" in present and "triton" in present
    head = ["n", "C", "mode", *present] + (["te / triton"] if ratio else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(cells, key=lambda k: (k[2] != "fwd", k[0], k[1])):
        row = cells[key]
        line = [*map(str, key), *(_cell(row.get(b), lambda r: r["per_site_ms"]) for b in present)]
        if ratio:
            line.append(_ratio(row.get("te"), row.get("triton"), lambda r: r["per_site_ms"]))
        out.append("| " + " | ".join(line) + " |")
    gpu = (env.get("gpus") or [{}])[0].get("name", "CPU")
    copy = ((env.get("copy_rate") or {}).get("cuda") or {}).get("gbps")
    L = ", ".join(str(s) for s in sorted(x for x in sites if x))
    return out + ["", f"Median ms of device time per site (a chain of {L} sites, L2 flushed, divided "
                  "by its sites; share of the copy-rate floor of (3n+2)C forward, (8n+6)C "
                  f"forward+backward per site); {gpu}" + (f", copy rate {copy:.0f} GB/s." if copy else ".")]


def _pct(v) -> str:
    return "" if v is None else f"{v:.1f}%"


def overhead_table(records: list[dict], env: dict) -> list[str]:
    """The verdict rows of the run, one table per (family, C), the residual first."""
    rows = overhead.verdict(records, env)
    by_width: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_width[(row["case"].family or "dense", row["case"].C)].append(row)
    out: list[str] = []
    for (family, C), group in sorted(by_width.items()):
        res = group[0]["residual_record"]
        c0 = group[0]["case"]
        depth = f"{c0.layers} of {c0.depth} layers" if c0.depth else f"{c0.layers} layers"
        out += [f"{family}, C = {C}, {depth}, accum {c0.accum or 1}:", "",
                "| case | step ms | overhead [95% CI] | reading | device-only | without AdamW "
                "| wall / device | host enqueue / device |", "|---|---|---|---|---|---|---|---|"]
        seen = set()
        # the headline first (mHC with recompute), then mHC, HC; CUDA-graph cases after eager ones
        group = sorted(group, key=lambda row: (bool(row["case"].cuda_graph),
                                               row["case"].method != "mhc",
                                               row["case"].recompute == "none"))
        for row in [None] + group:
            r = res if row is None else row["record"]
            if r is None or r["case_id"] in seen:
                continue
            seen.add(r["case_id"])
            c = r["case"]
            d = r.get("device") or {}
            name = c["method"] + ("" if c["recompute"] in (None, "none")
                                  else f", recompute L_r = {c['L_r']}")
            name += ", CUDA graph" if c.get("cuda_graph") else ""
            name += ", boundaries unfused" if c.get("boundary_fusion") is False else ""
            name += f", {c['backend']} alone" if c.get("backend") not in (None, "auto") else ""
            host = (f"{d['host_step_ms'] / d['step_ms']:.2f}"
                    if d.get("host_step_ms") and d.get("step_ms") else "")
            wod = f"{r['wall_over_device']:.2f}" if r.get("wall_over_device") else ""
            if row is None:
                out.append(f"| {name} | {r['time_ms']['median']:.0f} | | | | | {wod} | {host} |")
            else:
                out.append(f"| {name} | {row['ms']:.0f} | {row['overhead']:.1f}% "
                           f"[{row['low']:.1f}, {row['high']:.1f}] | {row['wording']} | "
                           f"{_pct(row.get('device_overhead'))} | "
                           f"{_pct(row.get('no_optimizer_overhead'))} | {wod} | {host} |")
        out.append("")
    gpu = (env.get("gpus") or [{}])[0].get("name", "CPU")
    return out + [f"Wall clock per whole step, host included; {gpu}. Partial depth is extrapolated "
                  "to the full depth (suite/analysis/overhead.py)."]


TABLES = {"kernels": kernels_table, "baseline": baseline_table, "chain": chain_table,
          "overhead": overhead_table}


def _verdict(m: re.Match, root: Path) -> str:
    runs = []
    for name in m["run"].split(","):
        records, env = _load(Path(root) / name)
        runs.append((name, records, env))
    try:
        return "\n".join(verdict.table(runs))
    except ValueError as e:
        raise TableError(str(e)) from None


def render(doc_text: str, root: Path) -> str:
    """The page with every table block rewritten from its run folder (paths from `root`)."""
    def one(m: re.Match) -> str:
        kind = m["kind"]
        if kind == "verdict":
            return m.group(1) + _verdict(m, root) + "\n" + m.group(6)
        if kind not in TABLES:
            raise TableError(f"table kind {kind!r} is not one of {', '.join([*TABLES, 'verdict'])}")
        records, env = _load(Path(root) / m["run"])
        want = dict(f.split("=", 1) for f in m["filters"].split())
        records = [r for r in records
                   if all(str(r["case"].get(k)) == v for k, v in want.items())]
        if not records:
            raise TableError(f"{m['run']}: no record has {m['filters'].strip()}")
        body = "\n".join(TABLES[kind](records, env))
        return m.group(1) + body + "\n" + m.group(6)
    return BLOCK.sub(one, doc_text)
