"""The plots of the dashboard's stability pages, from scope stability's records alone (their
`stability` field, docs/records.md): per training set-up (one learning rate), the composite gain
over depth forward and backward with the paper's figures as reference lines, the training loss
with its spikes and divergence marked, and the gradient norm.

Colour and marker say the method and, for mHC, its init; on the gain plots the dash says when in
training the gains were measured. A per-step curve longer than MAX_POINTS steps is thinned for
drawing (`thin`); spike and divergence markers are placed from every step.
"""
from __future__ import annotations

import math
from collections import defaultdict

from suite.publish import svgplot

MAX_POINTS = 400
CURVE_WIDTH = 760           # px before the end labels: a per-step curve needs the width
# The case fields of one training set-up: its methods are drawn on the same plots.
SETUP = ("device", "family", "dtype", "C", "layers", "heads", "seq", "T", "steps", "seed", "lr")
VARIANT_COLOURS = {"residual": "#555555", "hc": "#D55E00", "mhc paper init": "#0072B2",
                   "mhc identity init": "#009E73"}
METHOD_ORDER = {"residual": 0, "hc": 1, "mhc": 2}
INIT_ORDER = {"paper": 0, "identity": 1}
INIT_DASH, END_DASH, MID_DASHES = "2,3", "", ("8,4", "4,3", "10,3,2,3")
DIVERGED_FILL = "#C00"
GAIN_TITLES = {"forward": "forward: largest |row sum| of P_l",
               "backward": "backward: largest |column sum| of P_l"}

THINNED = (f"A curve of more than {MAX_POINTS} steps is drawn thinned: {MAX_POINTS // 2} runs of "
           "consecutive steps, each drawn by its lowest and its highest value in step order, so a "
           "spike stays on the line; the markers are placed from every step.")
CAPTIONS = {
    "gain": ("Amax gain of the composite P_l = H_res(L) ... H_res(l) from site l to the last "
             "(attention and FFN sites counted apart), per token and averaged over one sequence, "
             "on a log axis. Dotted: at init; solid: at the end of training; dashed: measurements "
             "between, as many as keep a plot at {max} lines. Red lines: {paper}."),
    "loss": ("Training loss of every step. Markers: loss spikes (a loss above {factor}x the "
             "median of the {window} steps before it); a red marker labelled 'diverged at step N' "
             "is the last finite loss of a run stopped at step N by a loss or gradient norm that "
             "was not finite. " + THINNED),
    "grad": ("Gradient norm of every step before clipping, on a log axis; the red line is the "
             "clipping threshold. " + THINNED),
}


def curves(records: list[dict]) -> list[dict]:
    """The records of scope stability that carry their curves."""
    return [r for r in records if r["case"].get("scope") == "stability" and r.get("stability")]


def _setup_key(v):
    # a field a case leaves unset sorts last, never compared with a set one
    return (v is None, v if v is not None else 0)


def setups(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """(title, records) of each training set-up with curves, ordered by the set-up's fields."""
    by = defaultdict(list)
    for r in curves(records):
        by[tuple(r["case"].get(k) for k in SETUP)].append(r)
    out = []
    for key in sorted(by, key=lambda k: [_setup_key(v) for v in k]):
        c = dict(zip(SETUP, key))
        sites = 2 * (c["layers"] or 0)
        title = (f"lr {c['lr']:g} · {sites} sites · C={c['C']} · {c['steps']} steps of {c['T']} "
                 f"tokens · {c['family']} {c['dtype']} · {c['device']}")
        out.append((title, sorted(by[key], key=_order)))
    return out


def _order(r: dict):
    c = r["case"]
    return (METHOD_ORDER.get(c["method"], 9), INIT_ORDER.get(c.get("init"), 9), c["backend"],
            c.get("n") or 0)


def variant(r: dict) -> str:
    """What the reader tells the lines by: the method, and mHC's init."""
    c = r["case"]
    return f"mhc {c.get('init') or 'paper'} init" if c["method"] == "mhc" else c["method"]


def names(records: list[dict]) -> list[str]:
    """Each record's line name: its variant, with the backend and n where they vary in the set-up,
    so no two records share a name."""
    backends = len({r["case"]["backend"] for r in records}) > 1
    ns = len({r["case"].get("n") for r in records if r["case"]["method"] != "residual"}) > 1
    out = []
    for r in records:
        c = r["case"]
        out.append(variant(r) + (f"/{c['backend']}" if backends else "")
                   + (f" n={c.get('n')}" if ns and c["method"] != "residual" else ""))
    return out


def style(r: dict, name: str) -> dict:
    marker = svgplot.METHOD_STYLE.get(r["case"]["method"], ("diamond", ""))[0]
    return {"colour": VARIANT_COLOURS.get(variant(r)) or svgplot.colour(name), "marker": marker,
            "dash": ""}


def legend(records: list[dict]) -> str:
    return svgplot.legend([(n, style(r, n)) for r, n in zip(records, names(records))])


def thin(values: list, limit: int = MAX_POINTS) -> list[tuple[int, float]]:
    """(step, value) of a per-step curve for drawing, steps whose value is not finite (None) left
    out. A curve longer than `limit` is cut into limit // 2 runs of consecutive steps, each kept
    as its lowest and its highest value in step order: a spike, or a dip, stays on the line."""
    if len(values) <= limit:
        return [(t, v) for t, v in enumerate(values) if v is not None]
    size = math.ceil(len(values) / (limit // 2))
    out = []
    for start in range(0, len(values), size):
        run = [(t, values[t]) for t in range(start, min(start + size, len(values)))
               if values[t] is not None]
        if run:
            out += sorted({min(run, key=lambda p: p[1]), max(run, key=lambda p: p[1])})
    return out


def pick(items: list, k: int) -> list:
    """At most k of the items, evenly spaced, the first and the last always among them."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def _parts(groups: list[list[dict]], title: str) -> list[tuple[str, list[dict]]]:
    """The series of each record, in plots of at most svgplot.MAX_SERIES lines; a record's series
    stay on one plot (markers alone are no line)."""
    parts, current, lines = [], [], 0
    for group in groups:
        n = sum(1 for s in group if s.get("line", True))
        if current and lines + n > svgplot.MAX_SERIES:
            parts.append(current)
            current, lines = [], 0
        current += group
        lines += n
    parts += [current] if current else []
    if len(parts) == 1:
        return [(title, parts[0])]
    return [(f"{title} ({i + 1}/{len(parts)})", p) for i, p in enumerate(parts)]


def _when(step: int, steps: int) -> str:
    return "init" if step == 0 else "end" if step == steps else f"step {step}"


def paper_lines(records: list[dict]) -> list[tuple[float, str]]:
    """The paper's largest gain per method among the records, each labelled with its source."""
    out = {}
    for r in records:
        paper = r["stability"].get("paper") or {}
        v = paper.get("max_gain")
        if v is None:
            continue
        who = "mHC" if r["case"]["method"] == "mhc" else r["case"]["method"].upper()
        source = (paper.get("source") or "paper").split(" (")[0]
        out[v] = f"{who} {'<=' if r['case']['method'] == 'mhc' else '~'} {v:g} ({source})"
    return sorted(out.items())


def paper_sources(records: list[dict]) -> str:
    found = sorted({(r["stability"].get("paper") or {}).get("source") or "" for r in records} - {""})
    return "; ".join(found) or "no paper figure in the records"


def gain_plots(records: list[dict]) -> list[str]:
    """Forward and backward composite gain over depth, one line per record and measurement."""
    measured = [(r, n) for r, n in zip(records, names(records)) if r["stability"].get("gains")]
    if not measured:
        return []
    per_record = max(2, svgplot.MAX_SERIES // len(measured))
    refs = paper_lines([r for r, _ in measured])
    out = []
    for direction in ("forward", "backward"):
        groups = []
        for r, name in measured:
            chosen = pick(r["stability"]["gains"], per_record)
            group = []
            for i, g in enumerate(chosen):
                dash = (INIT_DASH if g["step"] == 0 else END_DASH if i == len(chosen) - 1
                        else MID_DASHES[(i - 1) % len(MID_DASHES)])
                when = _when(g["step"], r["case"].get("steps"))
                group.append({**style(r, name), "name": f"{name} · {when}", "dash": dash,
                              "points": [{"x": site + 1, "y": v}
                                         for site, v in enumerate(g[direction]) if v is not None]})
            groups.append(group)
        for title, series in _parts(groups, GAIN_TITLES[direction]):
            out.append(svgplot.plot(series, "site l (from l to the last site)",
                                    "composite gain (log scale)", title, log_y=True, y_zero=False,
                                    markers=False, end_labels=True, hlines=refs))
    return out


def _last_finite(values: list, at: int) -> int | None:
    return next((t for t in range(min(at, len(values) - 1), -1, -1) if values[t] is not None), None)


def loss_plots(records: list[dict]) -> list[str]:
    """The training loss per record, its spikes and its divergence marked."""
    groups = []
    for r, name in zip(records, names(records)):
        st = r["stability"]
        loss = st.get("loss") or []
        look = style(r, name)
        line = {**look, "name": name, "markers": False,
                "points": [{"x": t, "y": v} for t, v in thin(loss)]}
        events = [{"x": t, "y": loss[t], "title": f"{name}: spike at step {t}, loss {loss[t]:.4g}"}
                  for t in st.get("spike_steps") or [] if t < len(loss) and loss[t] is not None]
        stop = st.get("diverged_at")
        last = None if stop is None else _last_finite(loss, stop)
        if last is not None:
            events.append({"x": stop, "y": loss[last], "fill": DIVERGED_FILL,
                           "label": f"diverged at step {stop}",
                           "title": f"{name}: diverged at step {stop} (last finite loss "
                                    f"{loss[last]:.4g} at step {last})"})
        groups.append([line] + ([{**look, "name": f"{name} spikes", "line": False, "points": events}]
                                if events else []))
    return [svgplot.plot(series, "step", "training loss (cross-entropy)", title, y_zero=False,
                         end_labels=True, width=CURVE_WIDTH)
            for title, series in _parts(groups, "training loss")]


def grad_plots(records: list[dict]) -> list[str]:
    groups = [[{**style(r, name), "name": name,
                "points": [{"x": t, "y": v} for t, v in thin(r["stability"].get("grad_norm") or [])
                           if v > 0]}]
              for r, name in zip(records, names(records))]
    clips = {(r["stability"].get("optimizer") or {}).get("clip_grad_norm") for r in records} - {None}
    return [svgplot.plot(series, "step", "gradient norm before clipping (log scale)", title,
                         log_y=True, y_zero=False, markers=False, end_labels=True,
                         width=CURVE_WIDTH, hlines=[(c, f"clip {c:g}") for c in sorted(clips)])
            for title, series in _parts(groups, "gradient norm")]


def sections(records: list[dict]) -> list[tuple[str, str, list[str], str]]:
    """(title, caption, plots, css class) of one set-up's sections; captions are plain text."""
    rule = next((r["stability"].get("spike_rule") for r in records
                 if r["stability"].get("spike_rule")), None) or {}
    return [("Composite gain over depth",
             CAPTIONS["gain"].format(max=svgplot.MAX_SERIES, paper=paper_sources(records)),
             gain_plots(records), "plot-gain"),
            ("Training loss", CAPTIONS["loss"].format(factor=rule.get("factor", "?"),
                                                      window=rule.get("window", "?")),
             loss_plots(records), "plot-loss"),
            ("Gradient norm", CAPTIONS["grad"], grad_plots(records), "plot-gradnorm")]
