"""The static dashboard: `harness.py publish RUN_DIR... --to DIR` writes a self-contained site.

Pages: index.html (overview per GPU model), scenario-NAME.html (table and plots of each scenario,
per GPU model, from its newest run), hardware.html (same case ids across GPU models as ratios),
history.html (each case's median over runs, regressions marked), runs/RUN.html (environment and
every record of a run) and r/RUN/CASE.html (one record: case, environment link, raw samples).
data/ holds the tidy CSV, the github-action-benchmark JSON, Markdown tables and each run's
records.jsonl and env.json. Plots are inline SVG (suite/publish/svgplot.py); the one script is inline
(sortable tables). Nothing is fetched from the network, and the same records give the same bytes:
no build time is written anywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
from collections import defaultdict
from html import escape
from pathlib import Path

from suite.analysis import overhead
from suite.measure import telemetry
from suite.publish import export as publish_export, svgplot
from suite.publish.published import (PublishError, REGRESSION_PCT, Run, hardware, history,
                                     latest_per_gpu)
from suite.report.tables import IDENTITY, baseline_backend, ratios_to, sort_key
from suite.store.runs import lock_beside, umask

PAPER_OVERHEAD_PCT = 6.7

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1a1a1a;background:#fafafa}
header{background:#143d59;color:#fff;padding:10px 24px}header a{color:#fff;margin-right:18px;text-decoration:none;font-weight:600}
header .brand{font-size:17px;margin-right:28px}
main{padding:8px 24px 40px;max-width:1500px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc;padding-bottom:4px}h3{font-size:15px}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0;background:#fff}
th,td{border:1px solid #d4d4d4;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#eef2f5;cursor:pointer;position:sticky;top:0}
td.l,th.l{text-align:left}
tr.skipped td{background:#fff8e1}tr.failed td{background:#fdecea}tr.notrun td{background:#f1f1f1;color:#555}
tr.regression td{background:#fdecea}tr.improvement td{background:#e8f5e9}
.verdict-regression{color:#b00020;font-weight:700}.verdict-improvement{color:#1b7f3a;font-weight:700}
.plots{display:flex;flex-wrap:wrap;gap:10px}.plot{border:1px solid #ddd;background:#fff}
.legend{margin:6px 0;font-size:12.5px}.key{margin-right:14px;white-space:nowrap}.key svg{vertical-align:middle}
.card{background:#fff;border:1px solid #ddd;padding:10px 16px;margin:12px 0}.card h2{margin-top:6px}
.note{color:#444;font-size:13px;max-width:1100px}.bad{color:#b00020}.warn{color:#8a6d00}
pre{background:#fff;border:1px solid #ddd;padding:8px;font-size:12px;overflow:auto;max-height:420px}
a{color:#0b5cad}
"""

# Sortable tables (click a header), and a marker the browser test reads: data-js="ok" once the
# script has run, data-js-error when anything on the page threw.
SCRIPT = """
window.addEventListener('error',function(e){document.body.setAttribute('data-js-error',String(e.message));});
(function(){
function key(td){var t=td.getAttribute('data-v');if(t===null)t=td.textContent.trim();var f=parseFloat(t);return isNaN(f)?t.toLowerCase():f;}
document.querySelectorAll('table.sortable').forEach(function(tb){
 tb.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var body=tb.tBodies[0],rows=Array.prototype.slice.call(body.rows),asc=th.getAttribute('data-asc')!=='1';
  rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);if(x===y)return 0;
   if(typeof x!==typeof y)return (typeof x==='number'?-1:1)*(asc?1:-1);return (x<y?-1:1)*(asc?1:-1);});
  rows.forEach(function(r){body.appendChild(r);});th.setAttribute('data-asc',asc?'1':'0');});});});
document.body.setAttribute('data-js','ok');
})();
"""


MARKER = ".hcbench-site"


def slug(text: str) -> str:
    """A file or anchor name for `text`: a short readable part and a hash of the whole, so two
    texts never share a file, a name stays short, and no text ('../', a very long scenario name)
    can reach outside the site."""
    readable = "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-")[:32] or "x"
    return f"{readable}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _page(title: str, body: str, depth: int = 0) -> str:
    up = "../" * depth
    nav = "".join(f'<a href="{up}{href}">{label}</a>' for href, label in (
        ("index.html", "Overview"), ("scenarios.html", "Scenarios"), ("hardware.html", "Hardware"),
        ("history.html", "History"), ("data/index.html", "Data")))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{escape(title)} - hcbench</title><style>{CSS}</style></head>\n<body>'
            f'<header><span class="brand">hcbench</span>{nav}</header>\n<main>\n<h1>{escape(title)}</h1>\n'
            f'{body}\n</main>\n<script>{SCRIPT}</script>\n</body></html>\n')


def _table(header: list[str], rows: list[tuple[str, list[str]]], left: int = 0, cls: str = "") -> str:
    """rows: (css class of the row, cells as HTML); the first `left` columns are left-aligned."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for row_cls, cells in rows:
        tds = "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(cells))
        body.append(f'<tr class="{row_cls}">{tds}</tr>')
    return (f'<table class="sortable {cls}"><thead><tr>{th}</tr></thead><tbody>\n'
            + "\n".join(body) + "\n</tbody></table>")


def _f(v, fmt: str = "{:.4g}") -> str:
    return "" if v is None else fmt.format(v)


def _rec_href(run_id: str, case_id: str, depth: int = 0) -> str:
    return f"{'../' * depth}r/{slug(run_id)}/{slug(case_id)}.html"


def _link(v: str, href: str) -> str:
    return f'<a href="{escape(href)}">{v}</a>' if v else ""


def _label(r: dict) -> str:
    return publish_export.case_name(r)


def _with_recompute(c: dict) -> bool:
    return c.get("scope", "site") != "site" and c.get("recompute") not in (None, "none")


def _series_name(r: dict) -> str:
    c = r["case"]
    name = f"{c['method']}/{c['backend']}"
    if _with_recompute(c):
        name += f" recompute={c['recompute']}" + (f" L_r={c['L_r']}" if c.get("L_r") else "")
    return name


def _ok(r: dict) -> bool:
    return r.get("status") == "ok" and bool(r.get("time_ms"))


def _env_rows(run: Run) -> list[tuple[str, str]]:
    env = run.env
    g = (env.get("gpus") or [{}])[0]
    v = env.get("versions") or {}
    mem = g.get("memory_bytes")
    rows = [("GPU", escape(run.gpu) + (f" ({g.get('sms')} SMs, {mem / 2**30:.0f} GiB, capability "
                                       f"{g.get('capability')})" if g else "")),
            ("copy rate", _f(run.copy_gbps, "{:.0f} GB/s (read + write, measured at the start of the run)")),
            ("driver", escape(str(g.get("driver", "")))),
            ("versions", escape(", ".join(f"{k} {val}" for k, val in sorted(v.items()) if val))),
            ("host / CPU", escape(f"{env.get('host', '')} / {(env.get('cpu') or {}).get('model', '')}")),
            ("GPU UUID", escape(str(g.get("uuid", "")))),
            ("environment captured", escape(str(env.get("captured_utc", ""))))]
    check = env.get("gpu_state_check")
    if check:
        problems = check.get("problems") or []
        rows.append(("GPU state before the run", escape("; ".join(problems) if problems else "no problem found")))
    return rows


def _kv(rows: list[tuple[str, str]]) -> str:
    return ('<table class="kv">' + "".join(f'<tr><th class="l">{escape(k)}</th><td class="l">{v}</td></tr>'
                                           for k, v in rows) + "</table>")


# ---------------------------------------------------------------- record and run pages
def record_page(run: Run, r: dict) -> str:
    t = r.get("time_ms") or {}
    c = r["case"]
    parts = [(f'<p class="note">Run <a href="../../runs/{slug(run.run_id)}.html">{escape(run.run_id)}</a> '
             f'on {escape(run.gpu)} · <a href="../../runs/{slug(run.run_id)}.html#env">environment</a> · '
             f'<a href="../../data/runs/{slug(run.run_id)}/records.jsonl">records.jsonl</a> · '
             f'<a href="../../data/runs/{slug(run.run_id)}/env.json">env.json</a></p>')]
    status = r.get("status", "")
    why = f" - {escape(r['reason'])}" if r.get("reason") else ""
    parts.append(f'<p>Status: <b class="{"bad" if status == "failed" else ""}">{escape(status)}</b>{why}</p>')
    parts.append("<h2>Case</h2>" + _kv([(k, escape(str(c[k]))) for k in sorted(c)]
                                       + [("case id", escape(r["case_id"])),
                                          ("scenario", escape(str(r.get("scenario"))))]))
    if t:
        summary = [("median ms", _f(t.get("median"))), ("p10 - p90 ms", f"{_f(t.get('p10'))} - {_f(t.get('p90'))}"),
                   ("CV", _f(t.get("cv"), "{:.2%}")), ("samples", _f(t.get("n"), "{}")),
                   ("GB/s", _f(r.get("gbps"), "{:.0f}")), ("% of copy rate", _f(r.get("pct_of_copy"), "{:.1f}")),
                   ("peak MiB", _f(r.get("peak_mem_bytes") and r["peak_mem_bytes"] / 2**20, "{:.0f}"))]
        parts.append("<h2>Timing</h2>" + _kv(summary))
        samples = t.get("samples") or []
        if samples:
            pts = [{"x": i, "y": s} for i, s in enumerate(samples)]
            parts.append(svgplot.plot([{"name": "samples", "colour": "#0072B2", "marker": "circle",
                                        "dash": "", "points": pts}], "sample index (call order)",
                                      "time per call (ms)", "raw samples", y_zero=True,
                                      width=760, height=260, markers=len(samples) <= 200))
            parts.append('<details><summary>raw samples (ms)</summary><pre class="samples">'
                         + escape(", ".join(f"{s:g}" for s in samples)) + "</pre></details>")
    parts.append("<h2>Record</h2><pre>" + escape(json.dumps(r, indent=1, sort_keys=True, default=str)) + "</pre>")
    return _page(f"Record {r['case_id']}: {_label(r)}", "\n".join(parts), depth=2)


def run_page(run: Run) -> str:
    counts = run.counts()
    parts = [f'<p>{escape(run.gpu)} · started {escape(run.started)} · ' + ", ".join(
        f"{v} {k}" for k, v in counts.items() if v) + "</p>",
        '<h2 id="env">Environment</h2>', _kv(_env_rows(run)),
        '<details><summary>env.json</summary><pre>' + escape(json.dumps(
            _strip_samples(run.env), indent=1, sort_keys=True, default=str)) + "</pre></details>"]
    for sc in run.scenarios:
        recs = [r for r in run.records if (r.get("scenario") or "unnamed") == sc]
        missing = [x for x in run.not_run if (x.get("scenario") or "unnamed") == sc]
        parts.append(f'<h2>Scenario {escape(sc)}</h2><p><a href="../scenario-{slug(sc)}.html">plots</a></p>')
        parts.append(records_table(run, recs, missing, depth=1))
    return _page(f"Run {run.run_id}", "\n".join(parts), depth=1)


def _strip_samples(obj):
    if isinstance(obj, dict):
        return {k: _strip_samples(v) for k, v in obj.items() if k != "samples"}
    if isinstance(obj, list):
        return [_strip_samples(v) for v in obj]
    return obj


# ---------------------------------------------------------------- the records table
def records_table(run: Run, records: list[dict], not_run: list[dict], depth: int = 0) -> str:
    """Every record of a run's scenario; numbers link to the record; optional columns appear when
    some record has the field."""
    base = baseline_backend(records)
    ratio = ratios_to(records, base)
    has = {k: any(r.get(k) not in (None, [], {}) for r in records)
           for k in ("amplification", "flags", "tokens_per_s", "activation_peak_bytes")}
    model = any(r["case"].get("scope", "site") != "site" for r in records)
    header = ["method", "backend", "op", "n", "C", "T", "dtype", "mode"]
    if model:
        header += ["scope", "layers", "recompute", "L_r"]
    header += ["median ms", "p10-p90 ms", "CV %", "GB/s", "% copy", "peak MiB"]
    if base:
        header.append(f"x {base}")
    if has["tokens_per_s"]:
        header.append("tokens/s")
    if has["amplification"]:
        header.append("measured / analytic bytes")
    if has["flags"]:
        header.append("flags")
    header += ["status", "reason"]
    rows = []
    for r in sorted(records, key=sort_key):
        c, t = r["case"], r.get("time_ms") or {}
        href = _rec_href(run.run_id, r["case_id"], depth)
        cells = [escape(str(c.get(k, ""))) for k in ("method", "backend", "op", "n", "C", "T", "dtype", "mode")]
        if model:
            cells += [escape(str(c.get(k) if c.get(k) is not None else "")) for k in ("scope", "layers", "recompute", "L_r")]
        ok = _ok(r)
        spread = telemetry.relative_spread(t) if ok else None
        noisy = " !" if spread is not None and spread > telemetry.SPREAD_LIMIT else ""
        cells += [_link(_f(t.get("median")) if ok else "", href),
                  _link(f"{_f(t.get('p10'))}-{_f(t.get('p90'))}" + noisy if ok else "", href),
                  _link(_f(t.get("cv") and 100 * t["cv"], "{:.1f}") if ok else "", href),
                  _link(_f(r.get("gbps"), "{:.0f}") if ok else "", href),
                  _link(_f(r.get("pct_of_copy"), "{:.1f}") if ok else "", href),
                  _link(_f(r.get("peak_mem_bytes") and r["peak_mem_bytes"] / 2**20, "{:.0f}") if ok else "", href)]
        if base:
            cells.append(_link(_f(ratio.get(r["case_id"]), "{:.2f}"), href))
        if has["tokens_per_s"]:
            cells.append(_link(_f(r.get("tokens_per_s"), "{:.4g}"), href))
        if has["amplification"]:
            cells.append(_link(_f(r.get("amplification"), "{:.2f}"), href))
        if has["flags"]:
            cells.append(escape(", ".join(r.get("flags") or [])))
        cells += [_link(escape(r.get("status", "")), href), escape(r.get("reason") or "")]
        rows.append((r.get("status", ""), cells))
    for x in sorted(not_run, key=lambda x: sort_key(x)):
        c = x["case"]
        cells = [escape(str(c.get(k, ""))) for k in ("method", "backend", "op", "n", "C", "T", "dtype", "mode")]
        if model:
            cells += [escape(str(c.get(k) if c.get(k) is not None else "")) for k in ("scope", "layers", "recompute", "L_r")]
        cells += [""] * (len(header) - len(cells) - 2)
        cells += ["not run", "listed in the run's saved scenarios, no record"]
        rows.append(("notrun", cells))
    note = ('<p class="note">Times are medians of single calls (L2 flushed before each on a GPU); '
            "GB/s counts MATH.md's floor bytes; % copy is GB/s over the copy rate measured in the same "
            f"run. A p10-p90 range marked ! is wider than {100 * telemetry.SPREAD_LIMIT:.0f}% of the median. Each number links to its record (case, "
            "environment, raw samples)." + (f" x {base} is the time over backend {base} on the same case."
                                             if base else "") + "</p>")
    return note + _table(header, rows, left=8 + (4 if model else 0))


# ---------------------------------------------------------------- plots of a scenario
def _panels(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Small multiples: one per (scope, op, mode, n); residual (n = 1) joins each n panel of its
    scope, op and mode as the baseline. T and dtype enter the title only where they vary."""
    ok = [r for r in records if _ok(r)]
    vary = {k: len({r["case"].get(k) for r in ok}) > 1 for k in ("T", "dtype", "layers")}
    # Where each width has one layer count (overhead.yaml: fewer layers at larger C so the models
    # fit), layers do not split the panels: one point per panel would hide the trend over C.
    by_c = defaultdict(set)
    for r in ok:
        by_c[r["case"]["C"]].add(r["case"].get("layers"))
    layers_follow_c = vary["layers"] and all(len(v) == 1 for v in by_c.values())
    groups = defaultdict(list)
    for r in ok:
        c = r["case"]
        layers = None if layers_follow_c else c.get("layers")
        base = (c.get("scope", "site"), c["op"], c["mode"], c["T"], c["dtype"], layers)
        groups[base].append(r)
    out = []
    op_order = {"site": 0, "pre": 1, "coeffs": 2, "post": 3}
    for base, rs in sorted(groups.items(), key=lambda kv: (op_order.get(kv[0][1], 9), str(kv[0]))):
        scope, op, mode, T, dtype, layers = base
        ns = sorted({r["case"]["n"] for r in rs if r["case"]["method"] != "residual"}) or [None]
        for n in ns:
            members = [r for r in rs if n is None or r["case"]["method"] == "residual" or r["case"]["n"] == n]
            title = f"{op if scope == 'site' else scope} · {mode}" + (f" · n={n}" if n else "")
            title += (f" · T={T}" if vary["T"] else "") + (f" · {dtype}" if vary["dtype"] else "")
            title += (f" · L={layers}" if vary["layers"] and layers else "")
            if layers_follow_c and scope != "site":
                title += " · L by C"
            out.append((title, members))
    return out


def _series(records: list[dict], y, depth: int, run_id: str, label=None) -> list[dict]:
    by = defaultdict(list)
    for r in records:
        v = y(r)
        if v is None:
            continue
        by[(r["case"]["method"], r["case"]["backend"], _series_name(r), _with_recompute(r["case"]))].append(
            {"x": r["case"]["C"], "y": v, "href": _rec_href(run_id, r["case_id"], depth),
             "title": f"{_label(r)}: {label(v) if label else _f(v)}"})
    order = {"residual": 0, "hc": 1, "mhc": 2}
    out = []
    for (method, backend, name, hollow), pts in sorted(by.items(),
                                                       key=lambda kv: (order.get(kv[0][0], 9), kv[0])):
        out.append({"name": name, **svgplot.style(method, backend), "points": pts, "hollow": hollow})
    return out


def _legend(records: list[dict]) -> str:
    seen = {}
    order = {"residual": 0, "hc": 1, "mhc": 2}
    for r in records:
        c = r["case"]
        seen[(order.get(c["method"], 9), c["method"], c["backend"])] = svgplot.style(c["method"], c["backend"])
    entries = [(f"{m}/{b}", st) for (_, m, b), st in sorted(seen.items())]
    if any(_with_recompute(r["case"]) for r in records):
        entries.append(("hollow: with recompute", {"colour": "#555", "marker": "circle", "dash": "",
                                                    "hollow": True}))
    return svgplot.legend(entries)


def _section(title: str, explain: str, plots: list[str], cls: str) -> str:
    plots = [p for p in plots if p]
    if not plots:
        return ""
    return (f'<section class="{cls}"><h3>{escape(title)}</h3><p class="note">{explain}</p>'
            f'<div class="plots">{"".join(plots)}</div></section>')


def scenario_plots(run: Run, records: list[dict], depth: int = 0) -> str:
    ok = [r for r in records if _ok(r)]
    if not ok:
        return '<p class="note">No case of this scenario finished in this run: nothing to plot.</p>'
    site = [r for r in ok if r["case"].get("scope", "site") == "site"]
    whole = [r for r in ok if r["case"].get("scope", "site") != "site"]
    rid = run.run_id
    out = [_legend(ok)]
    C_label = "C (hidden size)"
    for subset, what in ((site, "site"), (whole, "whole step")):
        if not subset:
            continue
        panels = _panels(subset)
        out.append(_section(
            f"Time against C ({what})", "Median time per call; each point links to its record.",
            [svgplot.plot(_series(rs, lambda r: r["time_ms"]["median"], depth, rid), C_label,
                          "median time (ms, log scale)", t, log_y=True, end_labels=what != "site")
             for t, rs in panels], "plot-time"))
        out.append(_section(
            f"GB/s against C ({what})", "Floor bytes of MATH.md over the median time.",
            [svgplot.plot(_series(rs, lambda r: r.get("gbps"), depth, rid), C_label, "GB/s", t)
             for t, rs in panels], "plot-gbps"))
        copy = _f(run.copy_gbps, "{:.0f} GB/s")
        out.append(_section(
            f"% of the copy rate ({what})", f"GB/s over the copy rate of this run ({copy}); the red "
            "line is the copy rate itself.",
            [svgplot.plot(_series(rs, lambda r: r.get("pct_of_copy"), depth, rid), C_label,
                          "% of copy rate", t, hlines=[(100.0, "copy rate")])
             for t, rs in panels if any(r.get("pct_of_copy") is not None for r in rs)], "plot-copy"))
    fb = _fwd_bwd(ok, depth, rid)
    if fb:
        out.append(_section("Forward against forward+backward",
                            "Time of fwd+bwd over time of fwd for the same case (x): how much the backward adds.",
                            fb, "plot-fwdbwd"))
    out += _model_sections(run, records, depth)
    amp = [r for r in ok if r.get("amplification") is not None]
    if amp:
        out.append(_section("Measured memory traffic", "DRAM bytes measured under Nsight Compute over "
                            "MATH.md's floor bytes (1 = no extra traffic).",
                            [svgplot.plot(_series(rs, lambda r: r.get("amplification"), depth, rid), C_label,
                                          "measured / analytic bytes (x)", t, hlines=[(1.0, "floor")])
                             for t, rs in _panels(amp)], "plot-traffic"))
    return "\n".join(x for x in out if x)


def _fwd_bwd(ok: list[dict], depth: int, rid: str) -> list[str]:
    fwd = {tuple(r["case"].get(k) for k in IDENTITY if k != "mode") + (r["case"]["backend"],): r
           for r in ok if r["case"]["mode"] == "fwd"}
    pairs = []
    for r in ok:
        if r["case"]["mode"] != "fwd+bwd":
            continue
        f = fwd.get(tuple(r["case"].get(k) for k in IDENTITY if k != "mode") + (r["case"]["backend"],))
        if f:
            pairs.append({**r, "_ratio": r["time_ms"]["median"] / f["time_ms"]["median"]})
    if not pairs:
        return []
    return [svgplot.plot(_series(rs, lambda r: r["_ratio"], depth, rid, label=lambda v: f"{v:.2f}x"),
                         "C (hidden size)", "fwd+bwd time / fwd time (x)", t.replace(" · fwd+bwd", ""))
            for t, rs in _panels(pairs)]


def _model_sections(run: Run, records: list[dict], depth: int) -> list[str]:
    """Overhead % against C, recompute memory against time, overlap efficiency: from the records
    that carry the fields (scope layer and model, distributed runs); nothing otherwise."""
    out = []
    rid = run.run_id
    try:
        rows = overhead.verdict(records, run.env)
    except (KeyError, TypeError, ValueError):
        rows = []
    if rows:
        by = defaultdict(list)
        for row in rows:
            c, r = row["case"], row["record"]
            by[(c.scope, c.method, c.backend, c.recompute, c.L_r)].append(
                {"x": c.C, "y": row["overhead"], "lo": row["low"], "hi": row["high"],
                 "href": _rec_href(rid, r["case_id"], depth),
                 "title": f"{_label(r)}: {row['overhead']:.1f}% [{row['low']:.1f}, {row['high']:.1f}]"})
        plots = []
        for scope in sorted({k[0] for k in by}):
            series = [{"name": f"{m}/{b}" + (f" rc={rc}" if rc not in (None, "none") else "")
                       + (f" L_r={lr}" if lr else ""), **svgplot.style(m, b), "points": pts,
                       "hollow": rc not in (None, "none")}
                      for (s, m, b, rc, lr), pts in sorted(by.items(), key=str) if s == scope]
            plots.append(svgplot.plot(series, "C (hidden size)", "overhead over residual (%)",
                                      f"{scope}: overhead %", y_zero=True, end_labels=True,
                                      hlines=[(PAPER_OVERHEAD_PCT, f"paper {PAPER_OVERHEAD_PCT}%")]))
        out.append(_section("Overhead % against C",
                            "(t_method - t_residual) / t_residual of cases timed interleaved in this run; "
                            "bars: 95% paired bootstrap interval; red line: the paper's 6.7%.",
                            plots, "plot-overhead"))
    try:
        rc = overhead.recompute_rows(records)
    except (KeyError, TypeError, ValueError):
        rc = []
    rc = [x for x in rc if x["activation_bytes"] is not None]
    if rc:
        by = defaultdict(list)
        for x in rc:
            c = x["case"]
            by[(c.method, c.backend, c.recompute, c.C, c.layers)].append(
                {"x": x["time_cost_pct"], "y": x["activation_bytes"] / 2**20,
                 "label": ("full" if c.recompute == "full" else f"L_r={c.L_r}")
                          if len({y["case"].C for y in rc}) == 1 else f"C={c.C}",
                 "title": f"{c.method} recompute={c.recompute} L_r={c.L_r} C={c.C}: "
                          f"{x['time_cost_pct']:.1f}% time, {x['activation_bytes'] / 2**20:.0f} MiB"})
        series = [{"name": f"{m}/{b} {r} C={C} L={L}", **svgplot.style(m, b), "points": pts}
                  for (m, b, r, C, L), pts in sorted(by.items(), key=str)]
        out.append(_section("Recompute: memory against time",
                            "Each point is one L_r: activation memory of the step against its time cost "
                            "over the same method without recompute.",
                            [svgplot.plot(series, "time cost over no recompute (%)", "activation memory (MiB)",
                                          "recompute", lines=False, y_zero=True)], "plot-recompute"))
    ov = [r for r in records if _ok(r) and r.get("overlap_efficiency") is not None]
    if ov:
        out.append(_section("Overlap efficiency",
                            "The records' overlap_efficiency: the fraction of communication hidden "
                            "behind compute (1 = fully hidden).",
                            [svgplot.plot(_series(rs, lambda r: r["overlap_efficiency"], depth, rid),
                                          "C (hidden size)", "overlap efficiency (fraction)", t)
                             for t, rs in _panels(ov)], "plot-overlap"))
    return out


def _problems(run: Run, records: list[dict], not_run: list[dict], depth: int) -> str:
    grouped = defaultdict(list)
    for r in records:
        if r.get("status") != "ok":
            grouped[(r["status"], r.get("reason") or "no reason given")].append(r)
    if not_run:
        grouped[("not run", "listed in the run's saved scenarios, no record (stopped or filtered out)")] = not_run
    if not grouped:
        return ""
    items = []
    for (status, why), rs in sorted(grouped.items()):
        links = ", ".join(_link(escape(_label(r)), _rec_href(run.run_id, r["case_id"], depth))
                          if status != "not run" else escape(_label({**r, "status": "not run"}))
                          for r in sorted(rs, key=sort_key))
        cls = "bad" if status == "failed" else "warn"
        items.append(f'<li><b class="{cls}">{escape(status)}</b> ({len(rs)}): {escape(why)}<br>'
                     f'<span class="note">{links}</span></li>')
    return '<h3>Failed, skipped and not run</h3><ul class="problems">' + "".join(items) + "</ul>"


def scenario_page(name: str, runs: list[Run]) -> str:
    """The newest run on each GPU model that has this scenario: its table and plots."""
    latest: dict[str, Run] = {}
    older = defaultdict(list)
    for run in sorted(runs, key=lambda r: (r.started, r.run_id)):
        if name in run.scenarios:
            if run.gpu in latest:
                older[run.gpu].append(latest[run.gpu])
            latest[run.gpu] = run
    parts = []
    for gpu in sorted(latest):
        run = latest[gpu]
        recs = [r for r in run.records if (r.get("scenario") or "unnamed") == name]
        missing = [x for x in run.not_run if (x.get("scenario") or "unnamed") == name]
        c = defaultdict(int)
        for r in recs:
            c[r["status"]] += 1
        prev = (f' Earlier runs of it on this GPU: {len(older[gpu])} (see <a href="history.html">history</a>).'
                if older[gpu] else "")
        parts.append(f'<h2>{escape(gpu)}</h2><p>Run <a href="runs/{slug(run.run_id)}.html">{escape(run.run_id)}</a>, '
                     f'started {escape(run.started)}, copy rate {_f(run.copy_gbps, "{:.0f}")} GB/s: '
                     f'{c["ok"]} ok, {c["skipped"]} skipped, {c["failed"]} failed, {len(missing)} not run.{prev}</p>')
        parts.append(_problems(run, recs, missing, 0))
        parts.append(scenario_plots(run, recs))
        parts.append(f"<h3>Table</h3>{records_table(run, recs, missing)}")
    return _page(f"Scenario {name}", "\n".join(parts))


# ---------------------------------------------------------------- overview, hardware, history
def overview_page(runs: list[Run], hist) -> str:
    by_gpu = defaultdict(list)
    for run in runs:
        by_gpu[run.gpu].append(run)
    parts = [(f'<p class="note">{len(runs)} runs on {len(by_gpu)} GPU model(s). Each GPU shows its newest '
             "run; every run is listed below. Numbers link to the records they come from.</p>")]
    for gpu in sorted(by_gpu):
        rs = sorted(by_gpu[gpu], key=lambda r: (r.started, r.run_id))
        last = rs[-1]
        regs = sum(1 for pts in hist.get(gpu, {}).values() if pts and pts[-1].verdict == "regression")
        counts = last.counts()
        summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        scen = ", ".join(f'<a href="scenario-{slug(s)}.html">{escape(s)}</a>' for s in last.scenarios)
        newest = {}
        for r in rs:
            for sc in r.scenarios:
                newest[sc] = r
        per_sc = "; ".join(f'<a href="scenario-{slug(sc)}.html">{escape(sc)}</a>: '
                           f'<a href="runs/{slug(r.run_id)}.html">{escape(r.run_id)}</a> '
                           f'({r.counts()["ok"]} ok, {r.counts()["skipped"]} skipped, '
                           f'{r.counts()["failed"]} failed, {r.counts()["not run"]} not run)'
                           for sc, r in sorted(newest.items()))
        reg = (f'<span class="bad">{regs} case(s) regressed in their newest run</span>' if regs
               else "no regression in the newest runs")
        parts.append(
            f'<section class="gpu card"><h2>{escape(gpu)}</h2>'
            f'<p>Latest run: <a href="runs/{slug(last.run_id)}.html">{escape(last.run_id)}</a> '
            f'(started {escape(last.started)}; scenarios {scen}): {summary}. '
            f'{len(rs)} run(s) on this GPU model; <a href="history.html#{slug(gpu)}">history</a>: {reg}.</p>'
            f'<p>Newest run of each scenario: {per_sc}.</p>'
            + _kv(_env_rows(last))
            + svgplot.bars([(r.run_id[:16], r.copy_gbps, f"runs/{slug(r.run_id)}.html#env")
                            for r in rs if r.copy_gbps], "copy rate (GB/s)", "copy rate of each run",
                           width=max(300, 120 * len(rs) + 80))
            + "</section>")
    rows = []
    for run in sorted(runs, key=lambda r: (r.started, r.run_id), reverse=True):
        c = run.counts()
        rows.append(("", [_link(escape(run.run_id), f"runs/{slug(run.run_id)}.html"), escape(run.gpu),
                          escape(run.started), escape(", ".join(run.scenarios)),
                          _f(run.copy_gbps, "{:.0f}"), str(c["ok"]), str(c["skipped"]),
                          str(c["failed"]), str(c["not run"])]))
    parts.append("<h2>All runs</h2>" + _table(["run", "GPU", "started (UTC)", "scenarios", "copy GB/s",
                                               "ok", "skipped", "failed", "not run"], rows, left=4))
    return _page("Overview", "\n".join(parts))


def scenarios_index(runs: list[Run]) -> str:
    names = sorted({s for run in runs for s in run.scenarios})
    rows = []
    for s in names:
        have = [r for r in runs if s in r.scenarios]
        rows.append(("", [_link(escape(s), f"scenario-{slug(s)}.html"),
                          escape(", ".join(sorted({r.gpu for r in have}))), str(len(have))]))
    return _page("Scenarios", _table(["scenario", "GPU models", "runs"], rows, left=2))


def hardware_page(runs: list[Run]) -> str:
    gpus, rows = hardware(runs)
    latest = latest_per_gpu(runs)
    if len(gpus) < 2 or not rows:
        only = ", ".join(gpus) or "none"
        body = (f'<p class="note">The published runs cover one GPU model ({escape(only)}), or no case id '
                "ran on two of them: there is nothing to compare yet. Publish runs of the same "
                "scenario from another GPU model next to these and this page shows each case's time "
                "there over its time here.</p>")
        return _page("Hardware comparison", body)
    ref = gpus[0]
    copy = {}
    for g in gpus:
        runs_g = [run for run, _ in latest[g].values()]
        rates = [r.copy_gbps for r in runs_g if r.copy_gbps]
        copy[g] = statistics.median(rates) if rates else None
    parts = [(f'<p class="note">Same case ids (same method, backend, op, shape, dtype, mode) on each GPU '
             f"model, newest ok record each; ratio = time on that GPU over time on {escape(ref)} "
             "(below 1: faster). The red line is the copy-rate ratio: a memory-bound case scales "
             "with it.</p>")]
    recs_by_id = {row["join_key"]: next(iter(row["per_gpu"].values()))[1] for row in rows}
    plots = []
    for g in gpus[1:]:
        pts = []
        for row in rows:
            if g in row["per_gpu"] and row["ratio"].get(g) is not None:
                run, r = row["per_gpu"][g]
                pts.append({**r, "_ratio": row["ratio"][g], "_run": run.run_id})
        for title, rs in _panels(pts):
            by = defaultdict(list)
            for r in rs:
                by[(r["case"]["method"], r["case"]["backend"])].append(
                    {"x": r["case"]["C"], "y": r["_ratio"], "href": _rec_href(r["_run"], r["case_id"]),
                     "title": f"{_label(r)}: {r['_ratio']:.3f}"})
            series = [{"name": f"{m}/{b}", **svgplot.style(m, b), "points": p} for (m, b), p in sorted(by.items())]
            h = [(copy[ref] / copy[g], "copy-rate ratio")] if copy.get(ref) and copy.get(g) else []
            plots.append(svgplot.plot(series, "C (hidden size)", "time / time on reference (x)",
                                      f"{g[:30]}: {title}", hlines=h, width=460))
    parts.append(_legend(list(recs_by_id.values())))
    parts.append(_section("Time ratio against C", f"Reference: {escape(ref)}. One panel per GPU model, op, "
                          "mode and n; each point links to the record on that GPU.", plots, "plot-hardware"))
    header = ["case"] + [f"{g} ms" for g in gpus] + [f"{g} / {ref}" for g in gpus[1:]] + [f"{g} % copy" for g in gpus]
    body = []
    for row in sorted(rows, key=lambda row: sort_key(next(iter(row["per_gpu"].values()))[1])):
        first = next(iter(row["per_gpu"].values()))[1]
        cells = [escape(_label(first))]
        for g in gpus:
            if g in row["per_gpu"]:
                run, r = row["per_gpu"][g]
                cells.append(_link(_f(r["time_ms"]["median"]), _rec_href(run.run_id, r["case_id"])))
            else:
                cells.append("")
        for g in gpus[1:]:
            v = row["ratio"].get(g)
            cells.append(_link(_f(v, "{:.3f}"), _rec_href(row["per_gpu"][g][0].run_id, row["case_id"]))
                         if g in row["per_gpu"] else "")
        for g in gpus:
            cells.append(_f(row["per_gpu"][g][1].get("pct_of_copy"), "{:.1f}") if g in row["per_gpu"] else "")
        body.append(("", cells))
    parts.append("<h3>Table</h3>" + _table(header, body, left=1))
    return _page("Hardware comparison", "\n".join(parts))


def history_page(runs: list[Run], hist) -> str:
    parts = [(f'<p class="note">Each case\'s median over runs on the same GPU model, in time order. A run is a '
             f"<b>regression</b> when its median is more than {REGRESSION_PCT:.0f}% slower than the median "
             "of the previous runs' medians <i>and</i> above the noise band; an <b>improvement</b> is the "
             f"mirror image. Noise band: the previous runs' p10-p90 of single-call times (median of their "
             "p10 and of their p90), so a change inside what the calls already spread over is not called "
             "a regression however large the ratio.</p>")]
    for gpu in sorted(hist):
        cases = {cid: pts for cid, pts in hist[gpu].items() if len(pts) > 1}
        parts.append(f'<h2 id="{slug(gpu)}">{escape(gpu)}</h2>')
        if not cases:
            parts.append(f'<p class="note">No case ran in more than one run on this GPU model '
                         f"({len(hist[gpu])} cases, one run each).</p>")
            continue
        verdicts = defaultdict(int)
        for pts in cases.values():
            verdicts[pts[-1].verdict] += 1
        parts.append("<p>Newest run of each case: " + ", ".join(
            f'<span class="verdict-{slug(k)}">{v} {escape(k)}</span>' for k, v in sorted(verdicts.items()))
            + f" ({len(cases)} cases with more than one run).</p>")
        when = {id(p): _hours(p.record.get("started_utc") or p.started) for pts in cases.values() for p in pts}
        t0 = min(when.values())
        span = max(when.values()) - t0
        xt = svgplot.nice_ticks(0.0, span or 1.0, 4)
        labels = [_clock(t0 + x) for x in xt]
        series = []
        for cid, pts in sorted(cases.items(), key=lambda kv: sort_key(kv[1][-1].record)):
            first = pts[0].median
            c = pts[-1].record["case"]
            st = svgplot.style(c["method"], c["backend"])
            series.append({"name": _label(pts[-1].record), **st, "points": [
                {"x": when[id(p)] - t0, "y": p.median / first,
                 "href": _rec_href(p.run_id, p.record["case_id"]), "fill": "#C00" if p.verdict == "regression" else None,
                 "title": f"{_label(p.record)} in {p.run_id}: {p.median:.4g} ms ({p.verdict}"
                          + (f", {p.change_pct:+.1f}%" if p.change_pct is not None else "") + ")"}
                for p in pts]})
        parts.append(_legend([pts[-1].record for pts in cases.values()]))
        parts.append(_section("Median over runs", "Each line is one case, its median over the first run's "
                              "median; red points are regressions; each point links to its record.",
                              [svgplot.plot(series, "record start (UTC)", "median / first run's median",
                                            f"{gpu}", y_zero=False, x_ticks=xt,
                                            x_tick_labels=labels, width=760,
                                            height=320, hlines=[(1.0 + REGRESSION_PCT / 100, f"+{REGRESSION_PCT:.0f}%")])],
                              "plot-history"))
        header = ["case", "runs", "newest run", "median ms", "previous median ms", "change %",
                  "noise band ms", "verdict"]
        body = []
        for cid, pts in sorted(cases.items(), key=lambda kv: (kv[1][-1].verdict != "regression",
                                                               sort_key(kv[1][-1].record))):
            p = pts[-1]
            href = _rec_href(p.run_id, p.record["case_id"])
            trail = " → ".join(_link(_f(q.median), _rec_href(q.run_id, q.record["case_id"]))
                               for q in pts)
            body.append((p.verdict if p.verdict in ("regression", "improvement") else "",
                         [escape(_label(p.record)), trail, _link(escape(p.run_id), href),
                          _link(_f(p.median), href), _f(p.baseline), _f(p.change_pct, "{:+.1f}"),
                          f"{_f(p.band[0])}-{_f(p.band[1])}" if p.band else "",
                          f'<span class="verdict-{slug(p.verdict)}">{escape(p.verdict)}</span>']))
        parts.append("<h3>Cases</h3>" + _table(header, body, left=3))
    if not hist:
        parts.append('<p class="note">No ok record to follow over time.</p>')
    return _page("History", "\n".join(parts))


def _hours(stamp: str) -> float:
    import datetime as dt
    try:
        t = dt.datetime.fromisoformat(stamp)
    except ValueError:
        return 0.0
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp() / 3600.0


def _clock(hours: float) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(hours * 3600.0, dt.UTC).strftime("%m-%d %H:%M")


def data_index(runs: list[Run]) -> str:
    items = [("records.csv", "tidy CSV, one row per record (and per case not run)"),
             ("benchmark.json", "github-action-benchmark, customSmallerIsBetter, one entry per case"),
             ("tables.md", "Markdown tables for pasting in reviews"),
             ("site.json", "runs, their GPU, start and counts")]
    lis = "".join(f'<li><a href="{f}">{f}</a>: {escape(d)}</li>' for f, d in items)
    lis += "".join(f'<li><a href="runs/{slug(r.run_id)}/records.jsonl">{escape(r.run_id)}/records.jsonl</a>, '
                   f'<a href="runs/{slug(r.run_id)}/env.json">env.json</a></li>' for r in runs)
    return _page("Data", f"<ul>{lis}</ul>", depth=1)


# ---------------------------------------------------------------- the site
def build(runs: list[Run], out: Path) -> list[Path]:
    """Writes the site to `out` whole: built in a new folder beside it, then put in its place, so a
    reader (or another publish) never sees half a site, and the folder is these runs only. `out`
    must be new, empty or an earlier site (its MARKER file): a folder of anything else is refused,
    never emptied. Publishes into one folder take turns (a lock beside it). Returns the files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PublishError(f"{out}: --to names a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise PublishError(f"{out}: not empty and not a site this suite wrote (no {MARKER}); give "
                           "a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_beside(out)
    try:
        return _build_into(runs, out)
    finally:
        os.close(lock)


def _build_into(runs: list[Run], out: Path) -> list[Path]:
    files: dict[str, str] = {MARKER: "a site written by `harness.py publish`; publish replaces it whole\n"}
    hist = history(runs)
    files["index.html"] = overview_page(runs, hist)
    files["scenarios.html"] = scenarios_index(runs)
    for s in sorted({s for run in runs for s in run.scenarios}):
        files[f"scenario-{slug(s)}.html"] = scenario_page(s, runs)
    files["hardware.html"] = hardware_page(runs)
    files["history.html"] = history_page(runs, hist)
    for run in runs:
        rid = slug(run.run_id)
        files[f"runs/{rid}.html"] = run_page(run)
        for r in run.records:
            files[f"r/{rid}/{slug(r['case_id'])}.html"] = record_page(run, r)
        files[f"data/runs/{rid}/records.jsonl"] = "".join(
            json.dumps(r, sort_keys=True, default=str) + "\n" for r in run.records)
        files[f"data/runs/{rid}/env.json"] = json.dumps(run.env, indent=2, sort_keys=True, default=str) + "\n"
    files["data/index.html"] = data_index(runs)
    files["data/records.csv"] = publish_export.tidy_csv(runs)
    files["data/benchmark.json"] = publish_export.benchmark_json(runs)
    files["data/tables.md"] = publish_export.markdown(runs)
    files["data/site.json"] = json.dumps([{"run_id": r.run_id, "gpu": r.gpu, "started": r.started,
                                           "scenarios": r.scenarios, "counts": r.counts(),
                                           "copy_gbps": r.copy_gbps} for r in runs], indent=1) + "\n"
    new = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        for rel, text in sorted(files.items()):
            path = new / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        os.chmod(new, 0o777 & ~umask())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "site")
        os.replace(new, out)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)     # the earlier site (it had the marker)
    return [out / rel for rel in sorted(files)]
