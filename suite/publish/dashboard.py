"""The static dashboard: `harness.py publish RUN_DIR... --to DIR` writes a self-contained site.

Pages: index.html (overview per GPU model, and the CPU smoke runs apart), scenario-NAME.html
(table and plots of each scenario, per GPU model, from its newest run), hardware.html (same case
ids across GPU models as ratios), history.html (an index of the cases: newest verdict, change,
sparkline) and trend/GPU/CASE.html (one case on one GPU model over runs: medians, p10-p90 band,
verdict of each run), stability.html (the runs with scope stability records) and
stability/RUN.html (a run's training curves: gains over depth, loss, gradient norm, per learning
rate), runs/RUN.html (environment and every record of a run) and r/RUN/CASE.html (one record:
case, environment link, raw samples). data/ holds the tidy CSV, the
github-action-benchmark JSON, Markdown tables and each run's records.jsonl and env.json. Plots
are inline SVG (suite/publish/svgplot.py); the one script is inline (sortable tables). Nothing is
fetched from the network, and the same records give the same bytes: no build time is written
anywhere.

Runs whose environment names no GPU (CPU smoke runs) are listed apart: they are never a GPU
model, never compared with GPUs and never judged for regressions.

A publish draws only the pages whose inputs changed: MANIFEST in the site holds each file's key
(a hash of the suite's code and of the runs and records the file is drawn from), the hash of its
bytes and its size. A file whose key is unchanged is carried over from the current site (hard-
linked) when it is still what the earlier build wrote, so the site is the same, byte for byte, as
a fresh build, and a re-publish with one new run draws that run's pages and the pages that sum
up all runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import stat
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Callable
from html import escape
from pathlib import Path

import suite
from suite.analysis import overhead, predict
from suite.analysis.regression import RULE
from suite.measure import telemetry
from suite.publish import export as publish_export, stability_plots, svgplot
from suite.publish.published import (PublishError, Run, hardware, history,
                                     latest_per_gpu)
from suite.report import stability as stability_report
from suite.report.distributed import STANDIN_MARK, STANDIN_NOTE, link_label
from suite.report.tables import IDENTITY, baseline_backend, ratios_to, sort_key
from suite.store.runs import lock_beside, umask

PAPER_OVERHEAD_PCT = 6.7
# The distributed scenario's case fields: shown where a table's records set them.
DIST_FIELDS = ("gpus", "parallel", "microbatches", "overlap")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1a1a1a;background:#fafafa}
header{background:#143d59;color:#fff;padding:10px 24px}header a{color:#fff;margin-right:18px;text-decoration:none;font-weight:600}
header .brand{font-size:17px;margin-right:28px}
main{padding:8px 24px 40px;max-width:1500px;box-sizing:border-box}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc;padding-bottom:4px}h3{font-size:15px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0;background:#fff}
th,td{border:1px solid #d4d4d4;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#eef2f5;cursor:pointer;position:sticky;top:0}
td.l,th.l{text-align:left}
tr.skipped td{background:#fff8e1}tr.failed td{background:#fdecea}tr.notrun td{background:#f1f1f1;color:#555}
tr.verdict-regression td{background:#fdecea}tr.verdict-improvement td{background:#e8f5e9}
span.verdict-regression{color:#b00020;font-weight:700}span.verdict-improvement{color:#1b7f3a;font-weight:700}
.plots{display:flex;flex-wrap:wrap;gap:10px}.plots>*{min-width:0}.plot{border:1px solid #ddd;background:#fff}
svg.plot{max-width:100%;height:auto}svg.spark{vertical-align:middle}
.legend{margin:6px 0;font-size:12.5px}.key{margin-right:14px;white-space:nowrap}.key svg{vertical-align:middle}
.card{background:#fff;border:1px solid #ddd;padding:10px 16px;margin:12px 0}.card h2{margin-top:6px}
p,li{overflow-wrap:anywhere}.note{color:#444;font-size:13px;max-width:1100px}.bad{color:#b00020}.warn{color:#8a6d00}
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
MANIFEST = ".hcbench-manifest.json"
LOCK_WAIT_S = 600.0       # a publish waits this long for another one into the same folder


def slug(text: str) -> str:
    """A file or anchor name for `text`: a short readable part and a hash of the whole, so two
    texts never share a file, a name stays short, and no text ('../', a very long scenario name)
    can reach outside the site."""
    readable = "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-")[:32] or "x"
    return f"{readable}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _page(title: str, body: str, depth: int = 0) -> str:
    up = "../" * depth
    nav = " ".join(f'<a href="{up}{href}">{label}</a>' for href, label in (
        ("index.html", "Overview"), ("scenarios.html", "Scenarios"), ("hardware.html", "Hardware"),
        ("history.html", "History"), ("stability.html", "Stability"), ("data/index.html", "Data")))
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
    return (f'<div class="scroll"><table class="sortable {cls}"><thead><tr>{th}</tr></thead><tbody>\n'
            + "\n".join(body) + "\n</tbody></table></div>")


def _f(v, fmt: str = "{:.4g}") -> str:
    return "" if v is None else fmt.format(v)


def _rec_href(run_id: str, case_id: str, depth: int = 0) -> str:
    return f"{'../' * depth}r/{slug(run_id)}/{slug(case_id)}.html"


def _link(v: str, href: str) -> str:
    return f'<a href="{escape(href)}">{v}</a>' if v else ""


def _label(r: dict) -> str:
    return _marked(publish_export.case_name(r), r.get("standin"))


def _marked(name: str, standin: bool) -> str:
    """A stand-in's name starts with its mark: a plot's end label keeps a name's first characters,
    so the mark stays visible there too."""
    return f"{STANDIN_MARK} {name}" if standin else name


def _standin_note(records: list[dict]) -> str:
    """The one-line note beside a table or plot that shows a stand-in record."""
    if not any(r.get("standin") for r in records):
        return ""
    return f'<p class="note standin"><b>{escape(STANDIN_MARK)}</b>: {escape(STANDIN_NOTE)}.</p>'


def _with_recompute(c: dict) -> bool:
    return c.get("scope", "site") != "site" and c.get("recompute") not in (None, "none")


def _dist_name(c: dict) -> str:
    """The distributed fields of a case, short ('' for a single-process case): cases that differ
    only in them get distinct series and labels."""
    if not c.get("parallel"):
        return ""
    return (f" {c['parallel']} gpus={c.get('gpus')}"
            + (f" mb={c['microbatches']}" if c.get("microbatches") else "")
            + (f" ov={c['overlap']}" if c.get("overlap") else ""))


def _series_name(r: dict) -> str:
    c = r["case"]
    name = f"{c['method']}/{c['backend']}"
    if _with_recompute(c):
        name += f" recompute={c['recompute']}" + (f" L_r={c['L_r']}" if c.get("L_r") else "")
    return _marked(name + _dist_name(c), r.get("standin"))


def verdict_class(verdict: str) -> str:
    """The CSS class of a verdict, whatever its text: 'environment changed' ->
    'verdict-environment-changed'; the CSS colours regression and improvement only."""
    word = "".join(ch if ch.isalnum() else "-" for ch in verdict.lower())
    return "verdict-" + ("-".join(w for w in word.split("-") if w) or "none")


def _verdict(v: str) -> str:
    return f'<span class="{verdict_class(v)}">{escape(v)}</span>'


def _ok(r: dict) -> bool:
    return r.get("status") == "ok" and bool(r.get("time_ms"))


def _env_rows(run: Run) -> list[tuple[str, str]]:
    env = run.env
    g = (env.get("gpus") or [{}])[0]
    v = env.get("versions") or {}
    mem = g.get("memory_bytes")
    about = [f"{g['sms']} SMs" if g.get("sms") else "", f"{mem / 2**30:.0f} GiB" if mem else "",
             f"capability {g['capability']}" if g.get("capability") else ""]
    about = ", ".join(a for a in about if a)
    rows = [("device" if run.is_cpu else "GPU", escape(run.gpu) + (f" ({escape(about)})" if about else "")),
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
    return ('<div class="scroll"><table class="kv">'
            + "".join(f'<tr><th class="l">{escape(k)}</th><td class="l">{v}</td></tr>' for k, v in rows)
            + "</table></div>")


# ---------------------------------------------------------------- record and run pages
def record_page(run: Run, r: dict, trend: str | None = None) -> str:
    """trend: the site path of the case's trend page, where the record is in the history."""
    t = r.get("time_ms") or {}
    c = r["case"]
    over_runs = f' · <a href="../../{escape(trend)}">this case over runs</a>' if trend else ""
    parts = [(f'<p class="note">Run <a href="../../runs/{slug(run.run_id)}.html">{escape(run.run_id)}</a> '
             f'on {escape(run.gpu)} · <a href="../../runs/{slug(run.run_id)}.html#env">environment</a> · '
             f'<a href="../../data/runs/{slug(run.run_id)}/records.jsonl">records.jsonl</a> · '
             f'<a href="../../data/runs/{slug(run.run_id)}/env.json">env.json</a>{over_runs}</p>')]
    status = r.get("status", "")
    why = f" - {escape(r['reason'])}" if r.get("reason") else ""
    parts.append(f'<p>Status: <b class="{"bad" if status == "failed" else ""}">{escape(status)}</b>{why}</p>')
    parts.append(_standin_note([r]))
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
    # Samples are listed above and kept in records.jsonl; repeated here they made most of the
    # page (and of the site).
    parts.append('<h2>Record</h2><p class="note">Without its samples (in records.jsonl).</p><pre>'
                 + escape(json.dumps(_strip_samples(r), indent=1, sort_keys=True, default=str)) + "</pre>")
    return _page(f"Record {r['case_id']}: {_label(r)}", "\n".join(parts), depth=2)


def run_page(run: Run) -> str:
    """A CPU run has no scenario page (those are per GPU model): its plots are drawn here."""
    cpu = run.is_cpu
    counts = run.counts()
    parts = [f'<p>{escape(run.gpu)} · started {escape(run.started)} · ' + ", ".join(
        f"{v} {k}" for k, v in counts.items() if v) + "</p>",
        '<h2 id="env">Environment</h2>', _kv(_env_rows(run)),
        '<details><summary>env.json</summary><pre>' + escape(json.dumps(
            _strip_samples(run.env), indent=1, sort_keys=True, default=str)) + "</pre></details>"]
    if _has_stability(run):
        parts.insert(1, f'<p><a href="../{stability_href(run)}">Stability: gains over depth, '
                        "loss and gradient norm curves</a></p>")
    for sc in run.scenarios:
        recs = [r for r in run.records if (r.get("scenario") or "unnamed") == sc]
        missing = [x for x in run.not_run if (x.get("scenario") or "unnamed") == sc]
        if cpu:
            parts.append(f"<h2>Scenario {escape(sc)}</h2>" + scenario_plots(run, recs, depth=1))
        else:
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
    cols = _ident_columns(records + not_run)
    link = any(r.get("link") or r.get("standin") for r in records)
    header = list(cols) + (["link"] if link else []) + ["median ms", "p10-p90 ms", "CV %", "GB/s",
                                                        "% copy", "peak MiB"]
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
        cells = _ident_cells(c, cols) + ([escape(link_label(r))] if link else [])
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
        cells = _ident_cells(c, cols)
        cells += [""] * (len(header) - len(cells) - 2)
        cells += ["not run", "listed in the run's saved scenarios, no record"]
        rows.append(("notrun", cells))
    note = ('<p class="note">Times are medians of single calls (L2 flushed before each on a GPU); '
            "GB/s counts MATH.md's floor bytes; % copy is GB/s over the copy rate measured in the same "
            f"run. A p10-p90 range marked ! is wider than {100 * telemetry.SPREAD_LIMIT:.0f}% of the median. Each number links to its record (case, "
            "environment, raw samples)." + (f" x {base} is the time over backend {base} on the same case."
                                             if base else "") + "</p>")
    return note + _standin_note(records) + _table(header, rows, left=len(cols) + (1 if link else 0))


def _ident_columns(records: list[dict]) -> list[str]:
    """The case columns of a table: always the site's, the whole-model ones where a record is a
    layer or a step, each distributed field where a record sets it (gpus where a record is
    distributed or runs on more than one GPU)."""
    cases = [r["case"] for r in records]
    cols = ["method", "backend", "op", "n", "C", "T", "dtype", "mode"]
    if any(c.get("scope", "site") != "site" for c in cases):
        cols += ["scope", "layers", "recompute", "L_r"]
    dist = any(c.get("parallel") for c in cases)
    for k in DIST_FIELDS:
        if any(c.get(k) not in (None, 1 if k == "gpus" and not dist else None) for c in cases):
            cols.append(k)
    return cols


def _ident_cells(c: dict, cols: list[str]) -> list[str]:
    return [escape(str(c.get(k) if c.get(k) is not None else "")) for k in cols]


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


def _series(records: list[dict], y, depth: int, run_id: str | None, label=None) -> list[dict]:
    """One series per method, backend, recompute and distributed set-up; a record carrying
    `_run` (several runs on one plot) links into that run."""
    by = defaultdict(list)
    for r in records:
        v = y(r)
        if v is None:
            continue
        by[(r["case"]["method"], r["case"]["backend"], _series_name(r), _with_recompute(r["case"]))].append(
            {"x": r["case"]["C"], "y": v, "href": _rec_href(r.get("_run") or run_id, r["case_id"], depth),
             "title": f"{_label(r)}: {label(v) if label else _f(v)}"})
    order = {"residual": 0, "hc": 1, "mhc": 2}
    out = []
    for (method, backend, name, hollow), pts in sorted(by.items(),
                                                       key=lambda kv: (order.get(kv[0][0], 9), kv[0])):
        out.append({"name": name, **svgplot.style(method, backend), "points": pts, "hollow": hollow})
    return out


def _plots(series: list[dict], x_label: str, y_label: str, title: str, **kw) -> list[str]:
    """One plot, or parts of at most svgplot.MAX_SERIES series each (in the series' order, so the
    methods stay together): the lines of one part can still be told apart."""
    if len(series) <= svgplot.MAX_SERIES:
        return [svgplot.plot(series, x_label, y_label, title, **kw)]
    parts = math.ceil(len(series) / svgplot.MAX_SERIES)
    size = math.ceil(len(series) / parts)
    return [svgplot.plot(series[i * size:(i + 1) * size], x_label, y_label,
                         f"{title} ({i + 1}/{parts})", **kw) for i in range(parts)]


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
    out = [_legend(ok), _standin_note(ok)]
    C_label = "C (hidden size)"
    for subset, what in ((site, "site"), (whole, "whole step")):
        if not subset:
            continue
        panels = _panels(subset)
        # Distributed variants share method and backend, so their colour and marker: their names
        # at the line ends tell them apart.
        named = any(r["case"].get("parallel") for r in subset)
        out.append(_section(
            f"Time against C ({what})", "Median time per call; each point links to its record.",
            [p for t, rs in panels for p in _plots(
                _series(rs, lambda r: r["time_ms"]["median"], depth, rid), C_label,
                "median time (ms, log scale)", t, log_y=True, end_labels=named or what != "site")],
            "plot-time"))
        out.append(_section(
            f"GB/s against C ({what})", "Floor bytes of MATH.md over the median time.",
            [p for t, rs in panels for p in _plots(_series(rs, lambda r: r.get("gbps"), depth, rid),
                                                   C_label, "GB/s", t, end_labels=named)], "plot-gbps"))
        copy = _f(run.copy_gbps, "{:.0f} GB/s")
        out.append(_section(
            f"% of the copy rate ({what})", f"GB/s over the copy rate of this run ({copy}); the red "
            "line is the copy rate itself.",
            [p for t, rs in panels if any(r.get("pct_of_copy") is not None for r in rs)
             for p in _plots(_series(rs, lambda r: r.get("pct_of_copy"), depth, rid), C_label,
                             "% of copy rate", t, hlines=[(100.0, "copy rate")], end_labels=named)],
            "plot-copy"))
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
                            [p for t, rs in _panels(amp)
                             for p in _plots(_series(rs, lambda r: r.get("amplification"), depth, rid),
                                             C_label, "measured / analytic bytes (x)", t,
                                             hlines=[(1.0, "floor")])], "plot-traffic"))
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
    return [p for t, rs in _panels(pairs)
            for p in _plots(_series(rs, lambda r: r["_ratio"], depth, rid, label=lambda v: f"{v:.2f}x"),
                            "C (hidden size)", "fwd+bwd time / fwd time (x)", t.replace(" · fwd+bwd", ""))]


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
            by[(c.scope, c.method, c.backend, c.recompute, c.L_r, _dist_name(r["case"]),
                bool(r.get("standin")))].append(
                {"x": c.C, "y": row["overhead"], "lo": row["low"], "hi": row["high"],
                 "href": _rec_href(rid, r["case_id"], depth),
                 "title": f"{_label(r)}: {row['overhead']:.1f}% [{row['low']:.1f}, {row['high']:.1f}]"})
        plots = []
        for scope in sorted({k[0] for k in by}):
            series = [{"name": _marked(f"{m}/{b}" + (f" rc={rc}" if rc not in (None, "none") else "")
                                       + (f" L_r={lr}" if lr else "") + dist, standin),
                       **svgplot.style(m, b), "points": pts, "hollow": rc not in (None, "none")}
                      for (s, m, b, rc, lr, dist, standin), pts in sorted(by.items(), key=str)
                      if s == scope]
            plots += _plots(series, "C (hidden size)", "overhead over residual (%)",
                            f"{scope}: overhead %", y_zero=True, end_labels=True,
                            hlines=[(PAPER_OVERHEAD_PCT, f"paper {PAPER_OVERHEAD_PCT}%")])
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
        standins = {r["case_id"] for r in records if r.get("standin")}
        by = defaultdict(list)
        for x in rc:
            c = x["case"]
            by[(c.method, c.backend, c.recompute, c.C, c.layers, _dist_name(c.to_dict()),
                c.case_id in standins)].append(
                {"x": x["time_cost_pct"], "y": x["activation_bytes"] / 2**20,
                 "label": ("full" if c.recompute == "full" else f"L_r={c.L_r}")
                          if len({y["case"].C for y in rc}) == 1 else f"C={c.C}",
                 "title": f"{c.method} recompute={c.recompute} L_r={c.L_r} C={c.C}: "
                          f"{x['time_cost_pct']:.1f}% time, {x['activation_bytes'] / 2**20:.0f} MiB"})
        series = [{"name": _marked(f"{m}/{b} {r} C={C} L={L}{dist}", standin),
                   **svgplot.style(m, b), "points": pts}
                  for (m, b, r, C, L, dist, standin), pts in sorted(by.items(), key=str)]
        out.append(_section("Recompute: memory against time",
                            "Each point is one L_r: activation memory of the step against its time cost "
                            "over the same method without recompute.",
                            _plots(series, "time cost over no recompute (%)", "activation memory (MiB)",
                                   "recompute", lines=False, y_zero=True), "plot-recompute"))
    ov = [r for r in records if _ok(r) and r.get("overlap_efficiency") is not None]
    if ov:
        out.append(_section("Overlap efficiency",
                            "The records' overlap_efficiency: the fraction of communication hidden "
                            "behind compute (1 = fully hidden).",
                            [p for t, rs in _panels(ov)
                             for p in _plots(_series(rs, lambda r: r["overlap_efficiency"], depth, rid),
                                             "C (hidden size)", "overlap efficiency (fraction)", t,
                                             end_labels=True)], "plot-overlap"))
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
    for run in sorted(_gpu_runs(runs), key=lambda r: (r.started, r.run_id)):
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
        if stability_plots.curves(recs):
            parts.append(f'<p><a href="{stability_href(run)}">Stability: gains over depth, loss and '
                         "gradient norm curves of this run</a></p>")
        parts.append(_problems(run, recs, missing, 0))
        parts.append(scenario_plots(run, recs))
        parts.append(f"<h3>Table</h3>{records_table(run, recs, missing)}")
    return _page(f"Scenario {name}", "\n".join(parts))


# ---------------------------------------------------------------- overview, hardware, history
def _gpu_runs(runs: list[Run]) -> list[Run]:
    return [r for r in runs if not r.is_cpu]


def overview_page(runs: list[Run], hist) -> str:
    """hist: the history of the GPU runs."""
    cpu_runs = [r for r in runs if r.is_cpu]
    runs = _gpu_runs(runs)
    by_gpu = defaultdict(list)
    for run in runs:
        by_gpu[run.gpu].append(run)
    cpu_note = (f' {len(cpu_runs)} CPU smoke run(s) are listed <a href="#cpu">apart</a>.' if cpu_runs else "")
    parts = [(f'<p class="note">{len(runs)} runs on {len(by_gpu)} GPU model(s). Each GPU shows its newest '
             f"run; every run is listed below. Numbers link to the records they come from.{cpu_note}</p>")]
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
                           width=min(760, max(300, 120 * len(rs) + 80)))
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
    if cpu_runs:
        rows = []
        for run in sorted(cpu_runs, key=lambda r: (r.started, r.run_id), reverse=True):
            c = run.counts()
            rows.append(("", [_link(escape(run.run_id), f"runs/{slug(run.run_id)}.html"),
                              escape((run.env.get("cpu") or {}).get("model") or run.gpu),
                              escape(run.started), escape(", ".join(run.scenarios)), str(c["ok"]),
                              str(c["skipped"]), str(c["failed"]), str(c["not run"])]))
        parts.append(
            '<section class="cpu card"><h2 id="cpu">CPU smoke runs</h2><p class="note">Runs whose '
            "environment names no GPU: the CPU cases that check every layer runs, not measurements "
            "of a GPU. They are listed here only: never a GPU model, never compared with one, never "
            "judged for regressions. Each run's page has its tables and plots.</p>"
            + _table(["run", "CPU", "started (UTC)", "scenarios", "ok", "skipped", "failed", "not run"],
                     rows, left=4) + "</section>")
    return _page("Overview", "\n".join(parts))


def scenarios_index(runs: list[Run]) -> str:
    runs = _gpu_runs(runs)
    names = sorted({s for run in runs for s in run.scenarios})
    rows = []
    for s in names:
        have = [r for r in runs if s in r.scenarios]
        rows.append(("", [_link(escape(s), f"scenario-{slug(s)}.html"),
                          escape(", ".join(sorted({r.gpu for r in have}))), str(len(have))]))
    return _page("Scenarios", _table(["scenario", "GPU models", "runs"], rows, left=2))


def _kernel_prediction(row: dict, ref: str, gpu: str) -> float | None:
    """The time predicted on `gpu` from the reference GPU's record, for a kernel case measured
    on both (scopes model and step are left out: their matmuls do not scale with bandwidth)."""
    if ref not in row["per_gpu"] or gpu not in row["per_gpu"]:
        return None
    r = row["per_gpu"][ref][1]
    if r["case"].get("scope", "site") != "site":
        return None
    return predict.memory_bound_ms(r["time_ms"]["median"], ref, gpu)


def hardware_page(runs: list[Run]) -> str:
    runs = _gpu_runs(runs)
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
            h = [(copy[ref] / copy[g], "copy-rate ratio")] if copy.get(ref) and copy.get(g) else []
            plots += _plots(_series(rs, lambda r: r["_ratio"], 0, None, label=lambda v: f"{v:.3f}"),
                            "C (hidden size)", "time / time on reference (x)", f"{g[:30]}: {title}",
                            hlines=h, width=460)
    parts.append(_legend(list(recs_by_id.values())))
    parts.append(_standin_note(list(recs_by_id.values())))
    parts.append(_section("Time ratio against C", f"Reference: {escape(ref)}. One panel per GPU model, op, "
                          "mode and n; each point links to the record on that GPU.", plots, "plot-hardware"))
    predicted = [g for g in gpus[1:] if predict.memory_bound_ms(1.0, ref, g) is not None]
    header = (["case"] + [f"{g} ms" for g in gpus] + [f"{g} / {ref}" for g in gpus[1:]]
              + [h for g in predicted for h in (f"{g} predicted ms", f"{g} error")]
              + [f"{g} % copy" for g in gpus])
    body = []
    errors: dict[str, list[float]] = defaultdict(list)
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
        for g in predicted:
            guess = _kernel_prediction(row, ref, g)
            if guess is None:
                cells += ["", ""]
                continue
            err = row["per_gpu"][g][1]["time_ms"]["median"] / guess - 1
            errors[g].append(err)
            cells += [_f(guess), f"{100 * err:+.1f}%"]
        for g in gpus:
            cells.append(_f(row["per_gpu"][g][1].get("pct_of_copy"), "{:.1f}") if g in row["per_gpu"] else "")
        body.append(("", cells))
    for g in predicted:
        e = sorted(errors[g])
        if e:
            parts.append(f'<p class="note">{escape(g)} predicted from {escape(ref)} alone, for kernel '
                         "cases (the connection is memory-bound): time there x the datasheets' "
                         "bandwidth ratio (suite/analysis/predict.py memory_bound_ms). Error = "
                         f"measured / predicted - 1 over {len(e)} cases: median {100 * statistics.median(e):+.1f}%, "
                         f"range {100 * e[0]:+.1f}% to {100 * e[-1]:+.1f}%. Whole models and steps "
                         "are not predicted here (their matmuls scale with another rate).</p>")
    parts.append("<h3>Table</h3>" + _table(header, body, left=1))
    return _page("Hardware comparison", "\n".join(parts))


def _judged(p, zs: bool, envs: bool) -> list[str]:
    """The cells of a point's judgement: its z-score where the table has the column, the noise
    band, the verdict and the environment change where the table has that column."""
    cells = [_f(p.z, "{:+.2f}")] if zs else []
    cells += [f"{_f(p.band[0])}-{_f(p.band[1])}" if p.band else "", _verdict(p.verdict)]
    if envs:
        cells.append(escape("; ".join(p.env_change)))
    return cells


def history_page(runs: list[Run], hist) -> str:
    parts = [f'<p class="note">Each case\'s median over runs on the same GPU model, in time order. '
             f"{escape(RULE)}</p>"]
    for gpu in sorted(hist):
        cases = hist[gpu]
        parts.append(f'<h2 id="{slug(gpu)}">{escape(gpu)}</h2>')
        verdicts = defaultdict(int)
        for pts in cases.values():
            verdicts[pts[-1].verdict] += 1
        several = sum(1 for pts in cases.values() if len(pts) > 1)
        parts.append("<p>Newest run of each case: " + ", ".join(
            f'<span class="{verdict_class(k)}">{v} {escape(k)}</span>' for k, v in sorted(verdicts.items()))
            + f" ({len(cases)} cases, {several} in more than one run). Each case opens its page: its "
            "median in every run with the p10-p90 band and each run's verdict.</p>")
        # What needs a look first: regressions, improvements, then cases with a history.
        order = sorted(cases.items(), key=lambda kv: (kv[1][-1].verdict != "regression",
                                                      kv[1][-1].verdict != "improvement",
                                                      len(kv[1]) == 1, sort_key(kv[1][-1].record), kv[0]))
        envs = any(getattr(pts[-1], "env_change", ()) for pts in cases.values())
        zs = any(getattr(pts[-1], "z", None) is not None for pts in cases.values())
        header = (["case", "runs", "trend", "newest run", "median ms", "earlier median ms", "change %"]
                  + (["z"] if zs else []) + ["noise band ms", "verdict"]
                  + (["environment change"] if envs else []))
        body = []
        for jk, pts in order:
            p = pts[-1]
            href = _rec_href(p.run_id, p.record["case_id"])
            fill = {"regression": "#C00", "improvement": "#1b7f3a"}.get(p.verdict, "#0072B2")
            spark = svgplot.spark([q.median for q in pts], f"median of {_label(p.record)} over "
                                  f"{len(pts)} run(s)", last=fill)
            cells = [_link(escape(_label(p.record)), trend_href(gpu, jk)), str(len(pts)),
                     _link(spark, trend_href(gpu, jk)), _link(escape(p.run_id), href),
                     _link(_f(p.median), href), _f(p.baseline), _f(p.change_pct, "{:+.1f}")]
            body.append((verdict_class(p.verdict), cells + _judged(p, zs, envs)))
        parts.append('<section class="history-index"><h3>Cases</h3>'
                     + _standin_note([pts[-1].record for pts in cases.values()])
                     + _table(header, body, left=2)
                     + "</section>")
    if not hist:
        parts.append('<p class="note">No ok record to follow over time.</p>')
    return _page("History", "\n".join(parts))


def trend_href(gpu: str, join_key: str) -> str:
    """The site path of one case's page on one GPU model."""
    return f"trend/{slug(gpu)}/{slug(join_key)}.html"


def trend_page(gpu: str, join_key: str, pts: list) -> str:
    """One case on one GPU model over runs: median and p10-p90 band of each run, its verdict
    against the runs before it, links to the records."""
    last = pts[-1]
    label = _label(last.record)
    when = [_hours(p.record.get("started_utc") or p.started) for p in pts]
    t0 = min(when)
    xt = svgplot.nice_ticks(0.0, (max(when) - t0) or 1.0, 4)
    colour = {"regression": "#C00", "improvement": "#1b7f3a"}
    st = svgplot.style(last.record["case"]["method"], last.record["case"]["backend"])
    series = [{"name": label, **st, "band": True, "points": [
        {"x": w - t0, "y": p.median, "lo": p.p10, "hi": p.p90, "fill": colour.get(p.verdict),
         "href": _rec_href(p.run_id, p.record["case_id"], 2),
         "title": f"{p.run_id}: {p.median:.4g} ms, p10-p90 {p.p10:.4g}-{p.p90:.4g} ({p.verdict}"
                  + (f", {p.change_pct:+.1f}%" if p.change_pct is not None else "") + ")"}
        for w, p in zip(when, pts)]}]
    plot = svgplot.plot(series, "record start (UTC)", "median time (ms)", f"{label[:60]}", y_zero=False,
                        x_ticks=xt, x_tick_labels=[_clock(t0 + x) for x in xt], width=760, height=320)
    envs = any(getattr(p, "env_change", ()) for p in pts)
    zs = any(getattr(p, "z", None) is not None for p in pts)
    header = (["run", "record start (UTC)", "median ms", "p10-p90 ms", "earlier median ms", "change %"]
              + (["z"] if zs else []) + ["noise band ms", "verdict"] + (["environment change"] if envs else []))
    body = []
    for p in reversed(pts):
        href = _rec_href(p.run_id, p.record["case_id"], 2)
        cells = [_link(escape(p.run_id), f"../../runs/{slug(p.run_id)}.html"),
                 escape(p.record.get("started_utc") or p.started), _link(_f(p.median), href),
                 _link(f"{_f(p.p10)}-{_f(p.p90)}", href), _f(p.baseline), _f(p.change_pct, "{:+.1f}")]
        body.append((verdict_class(p.verdict), cells + _judged(p, zs, envs)))
    parts = [f'<p>{escape(gpu)} · {len(pts)} run(s) · newest: {_verdict(last.verdict)} · '
             f'<a href="../../history.html#{slug(gpu)}">all cases on this GPU model</a> '
             f"(the rule is explained there) · case id {escape(join_key)}</p>",
             _standin_note([last.record]),
             _section("Median over runs", "Each point is one run's median, the shaded band its "
                      "p10-p90 of single calls; red: regression, green: improvement; each point "
                      "links to its record.", [plot], "plot-trend"),
             "<h3>Runs, newest first</h3>" + _table(header, body, left=2)]
    return _page(f"{label} on {gpu}", "\n".join(parts), depth=2)


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
             ("site.json", "runs, their GPU (cpu: true for a CPU smoke run), start and counts")]
    lis = "".join(f'<li><a href="{f}">{f}</a>: {escape(d)}</li>' for f, d in items)
    lis += "".join(f'<li><a href="runs/{slug(r.run_id)}/records.jsonl">{escape(r.run_id)}/records.jsonl</a>, '
                   f'<a href="runs/{slug(r.run_id)}/env.json">env.json</a></li>' for r in runs)
    return _page("Data", f"<ul>{lis}</ul>", depth=1)


# ---------------------------------------------------------------- stability runs
def _has_stability(run: Run) -> bool:
    return bool(stability_report.rows(run.records))


def stability_href(run: Run) -> str:
    """The site path of a run's stability page."""
    return f"stability/{slug(run.run_id)}.html"


def stability_index(runs: list[Run]) -> str:
    """The runs with scope stability records, newest first, each linking to its page."""
    rows = []
    for run in sorted(runs, key=lambda r: (r.started, r.run_id), reverse=True):
        recs = stability_plots.curves(run.records)
        device = escape(run.gpu) + (" (CPU smoke run)" if run.is_cpu else "")
        lrs = sorted({r["case"].get("lr") for r in recs} - {None})
        rows.append(("", [_link(escape(run.run_id), stability_href(run)), device, escape(run.started),
                          str(len(recs)), escape(", ".join(f"{lr:g}" for lr in lrs)),
                          str(sum(r["stability"].get("spikes") or 0 for r in recs)),
                          str(sum(r["stability"].get("diverged_at") is not None for r in recs))]))
    if not rows:
        body = ('<p class="note">No published run has records of scope stability (training runs '
                "of scenarios/stability.yaml).</p>")
    else:
        body = ('<p class="note">Runs with records of scope stability: each trains residual, HC '
                "and mHC and records the loss, the gradient norm and the composite gain over depth "
                "during training. Each run opens its page of curves.</p>"
                + _table(["run", "device", "started (UTC)", "training runs", "learning rates",
                          "spikes", "diverged"], rows, left=3))
    return _page("Stability", body)


def stability_page(run: Run) -> str:
    """A run's stability records: the report's table, then per training set-up (one learning
    rate) the gains over depth, the loss and the gradient norm."""
    recs = [r for r in run.records if r["case"].get("scope") == "stability"]
    rid = slug(run.run_id)
    parts = [f'<p class="note">Run <a href="../runs/{rid}.html">{escape(run.run_id)}</a> on '
             f'{escape(run.gpu)} · started {escape(run.started)} · '
             f'<a href="../data/runs/{rid}/records.jsonl">records.jsonl</a> (every curve in full, '
             "in each record's <code>stability</code>)</p>",
             "<h2>Table</h2><ul class=\"note\">"
             + "".join(f"<li>{escape(n)}</li>" for n in stability_report.NOTES) + "</ul>"
             + _table(stability_report.HEADER,
                      [("", [escape(cell) for cell in row]) for row in stability_report.rows(recs)],
                      left=3)]
    for title, rs in stability_plots.setups(recs):
        parts.append(f'<h2 id="{slug(title)}">{escape(title)}</h2>' + stability_plots.legend(rs))
        parts += [_section(head, escape(caption), plots, cls)
                  for head, caption, plots, cls in stability_plots.sections(rs)]
    return _page(f"Stability: run {run.run_id}", "\n".join(parts), depth=1)


# ---------------------------------------------------------------- the site
def build(runs: list[Run], out: Path) -> list[Path]:
    """Writes the site to `out` whole: built in a new folder beside it, then put in its place, so a
    reader (or another publish) never sees half a site, and the folder is these runs only. `out`
    must be new, empty or an earlier site (its MARKER file): a folder of anything else is refused,
    never emptied, and a file a user put into an earlier site is carried into the new one.
    Publishes into one folder take turns (a lock beside it; a publish waits up to LOCK_WAIT_S). Files whose inputs are
    those of the site already there are carried over from it, not drawn again. Returns the files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PublishError(f"{out}: --to names a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise PublishError(f"{out}: not empty and not a site this suite wrote (no {MARKER}); give "
                           "a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_beside(out, wait_s=LOCK_WAIT_S)
    try:
        return _build_into(runs, out)
    finally:
        os.close(lock)


def _code_version() -> str:
    """A hash of the suite's source: a page drawn by other code is drawn again."""
    h = hashlib.sha256()
    root = Path(suite.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode() + b"\0")
    return h.hexdigest()


def _site_json(runs: list[Run]) -> str:
    return json.dumps([{"run_id": r.run_id, "gpu": r.gpu, "cpu": r.is_cpu, "started": r.started,
                        "scenarios": r.scenarios, "counts": r.counts(), "copy_gbps": r.copy_gbps}
                       for r in runs], indent=1) + "\n"


def _plan(runs: list[Run]) -> dict[str, tuple[str, Callable[[], str]]]:
    """Every file of the site: its key (a hash of the code and of everything the file is drawn
    from) and how to draw it. Drawing is left for later, so a file whose key is unchanged is never
    drawn."""
    code = _code_version()
    gpu_runs = _gpu_runs(runs)
    hist = history(gpu_runs)
    run_key = {r.run_id: _digest(r.run_id, r.env, r.records, r.not_run) for r in runs}
    every = [run_key[r.run_id] for r in runs]
    out: dict[str, tuple[str, Callable[[], str]]] = {}

    def add(path: str, inputs, draw: Callable[[], str]) -> None:
        out[path] = (_digest(code, path, inputs), draw)

    add(MARKER, None, lambda: "a site written by `harness.py publish`; publish replaces it whole\n")
    add("index.html", every, lambda: overview_page(runs, hist))
    add("scenarios.html", every, lambda: scenarios_index(runs))
    for s in sorted({s for run in gpu_runs for s in run.scenarios}):
        add(f"scenario-{slug(s)}.html", [s] + [run_key[r.run_id] for r in gpu_runs if s in r.scenarios],
            lambda s=s: scenario_page(s, runs))
    add("hardware.html", every, lambda: hardware_page(runs))
    add("history.html", every, lambda: history_page(runs, hist))
    trained = [r for r in runs if _has_stability(r)]
    add("stability.html", [run_key[r.run_id] for r in trained], lambda: stability_index(trained))
    for run in trained:
        add(stability_href(run), run_key[run.run_id], lambda run=run: stability_page(run))
    trend = {}
    for gpu, cases in hist.items():
        for jk, pts in cases.items():
            # Every field of every point, whatever fields the history's points carry.
            add(trend_href(gpu, jk), [gpu, jk, [{f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
                                                for p in pts]],
                lambda gpu=gpu, jk=jk, pts=pts: trend_page(gpu, jk, pts))
            for p in pts:
                trend[(p.run_id, p.record["case_id"])] = trend_href(gpu, jk)
    for run in runs:
        rid = slug(run.run_id)
        add(f"runs/{rid}.html", run_key[run.run_id], lambda run=run: run_page(run))
        for r in run.records:
            t = trend.get((run.run_id, r["case_id"]))
            add(f"r/{rid}/{slug(r['case_id'])}.html", [run.run_id, run.gpu, t, r],
                lambda run=run, r=r, t=t: record_page(run, r, t))
        add(f"data/runs/{rid}/records.jsonl", run_key[run.run_id], lambda run=run: "".join(
            json.dumps(r, sort_keys=True, default=str) + "\n" for r in run.records))
        add(f"data/runs/{rid}/env.json", run_key[run.run_id],
            lambda run=run: json.dumps(run.env, indent=2, sort_keys=True, default=str) + "\n")
    add("data/index.html", every, lambda: data_index(runs))
    add("data/records.csv", every, lambda: publish_export.tidy_csv(runs))
    # CPU smoke runs stay in the raw data (the CSV, site.json, their records.jsonl), not in the
    # per-GPU-model exports.
    add("data/benchmark.json", every, lambda: publish_export.benchmark_json(gpu_runs))
    add("data/tables.md", every, lambda: publish_export.markdown(gpu_runs))
    add("data/site.json", every, lambda: _site_json(runs))
    return out


# The suite's own names: with no readable manifest to say which files the suite wrote (a site
# written before the manifest existed, or a damaged one), these are taken for its own and
# everything else for a user's.
_SUITE_TOP = ("index.html", "scenarios.html", "hardware.html", "history.html", "stability.html")
_SUITE_FOLDERS = ("runs", "r", "trend", "stability", "data")


def _theirs(site: Path, earlier: dict) -> list[str]:
    """Files (and links) in the current site that the suite did not write: a re-publish carries
    them into the new site, so publishing deletes nothing it did not create."""
    if not (site / MARKER).is_file():
        return []
    out = []
    for folder, dirs, names in os.walk(site):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            rel = os.path.relpath(os.path.join(folder, name), site)
            if rel in (MARKER, MANIFEST):
                continue
            if earlier:
                mine = rel in earlier
            else:
                top = rel.split(os.sep, 1)[0]
                mine = (rel in _SUITE_TOP or top in _SUITE_FOLDERS
                        or (os.sep not in rel and rel.startswith("scenario-") and rel.endswith(".html")))
            if not mine:
                out.append(rel)
    return sorted(out)


def _carry(src: Path, dst: Path) -> None:
    """A user's file into the new site: the same inode where it can be (nothing is copied or lost
    when the earlier site is removed), else a copy; a link stays a link."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _earlier(site: Path) -> tuple[dict[str, tuple[str, str, int]], int]:
    """(path -> (key, hash of its bytes, size), when the manifest was written) of the current
    site; empty where there is none or it is unreadable (then every page is drawn)."""
    try:
        doc = json.loads((site / MANIFEST).read_text())
        pages = {p: (k, h, n) for p, (k, h, n) in doc["pages"].items()
                 if isinstance(k, str) and isinstance(h, str) and isinstance(n, int)}
        return pages, os.stat(site / MANIFEST).st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, 0


def _read_same(path: Path, sha: str) -> bytes | None:
    """The bytes of an earlier page if it is a plain file holding the bytes it was written with."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    finally:
        os.close(fd)
    return data if hashlib.sha256(data).hexdigest() == sha else None


def _reuse(src: Path, dst: Path, sha: str, size: int, since: int) -> bool:
    """Puts the earlier page `src` at `dst`; False when it cannot be trusted to be what the
    earlier build wrote (then it is drawn again). A page is hard-linked (writing thousands of
    files costs more than drawing them) when it is a plain file of the size written and was not
    changed after the earlier build ended; else its bytes are read and checked against the hash.
    An edited page, or one replaced by a link to somewhere else, is never carried over."""
    try:
        st = os.lstat(src)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return False
    if st.st_mtime_ns <= since:
        try:
            os.link(src, dst, follow_symlinks=False)
            if stat.S_ISREG(os.lstat(dst).st_mode):
                return True
            os.unlink(dst)
        except OSError:
            pass
    data = _read_same(src, sha)
    if data is None:
        return False
    dst.write_bytes(data)
    return True


def _build_into(runs: list[Run], out: Path) -> list[Path]:
    files = _plan(runs)
    earlier, since = _earlier(out) if (out / MARKER).is_file() else ({}, 0)
    manifest = {}
    new = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        for rel, (key, draw) in sorted(files.items()):
            path = new / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            prev = earlier.get(rel)
            if prev and prev[0] == key and _reuse(out / rel, path, prev[1], prev[2], since):
                manifest[rel] = list(prev)
                continue
            data = draw().encode()
            path.write_bytes(data)
            manifest[rel] = [key, hashlib.sha256(data).hexdigest(), len(data)]
        for rel in _theirs(out, earlier):
            if rel in files:
                raise PublishError(f"{out / rel}: a file this suite did not write is where the site "
                                   "now puts a page; move it, then publish again")
            _carry(out / rel, new / rel)
        # Written last: a page changed after this moment is checked before it is reused.
        (new / MANIFEST).write_text(json.dumps({"pages": manifest}, indent=0, sort_keys=True) + "\n")
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
    return [out / rel for rel in sorted([*files, MANIFEST])]
