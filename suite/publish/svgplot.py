"""Small inline SVG plots for the dashboard: no matplotlib, no JavaScript, the same bytes every time.

Colour says the backend and the marker and dash say the method, the same on every plot
(Okabe-Ito colours, readable by colour-blind readers). Every point may link to its record.
Every plot has a viewBox, so the page's CSS can shrink it to the width of a narrow window.
"""
from __future__ import annotations

import math
from html import escape

BACKEND_COLOURS = {"torch": "#0072B2", "compile": "#E69F00", "triton": "#009E73",
                   "tilelang": "#CC79A7", "liger": "#D55E00", "reference": "#555555"}
EXTRA_COLOURS = ("#56B4E9", "#F0E442", "#000000", "#999999")
METHOD_STYLE = {"residual": ("square", "2,3"), "hc": ("triangle", "7,3"), "mhc": ("circle", "")}
# More lines than this on one plot cannot be told apart: a plot with more is split in parts.
MAX_SERIES = 12


def _frame(width: int, height: int, title: str | None, y_label: str) -> list[str]:
    """The opening of a plot: the svg element, its white ground and its title."""
    out = [(f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title or y_label)}">'),
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>']
    if title:
        out.append(f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-size="13" '
                   f'font-weight="bold">{escape(title)}</text>')
    return out


def colour(backend: str) -> str:
    if backend in BACKEND_COLOURS:
        return BACKEND_COLOURS[backend]
    return EXTRA_COLOURS[sum(map(ord, backend)) % len(EXTRA_COLOURS)]


def style(method: str, backend: str) -> dict:
    marker, dash = METHOD_STYLE.get(method, ("diamond", "1,2"))
    return {"colour": colour(backend), "marker": marker, "dash": dash}


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def tick_labels(ticks: list[float]) -> list[str]:
    """_fmt of each tick, with as many decimals as it takes to tell the ticks apart (a narrow
    range, e.g. 20.40 to 20.45 ms, would read 20, 20, 20)."""
    labels = [_fmt(t) for t in ticks]
    for decimals in range(1, 9):
        if len(set(labels)) == len(set(ticks)):
            break
        labels = [f"{t:.{decimals}f}" for t in ticks]
    return labels


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks covering [lo, hi] on a log axis."""
    ticks = []
    e = math.floor(math.log10(lo))
    while True:
        for m in (1, 2, 5):
            t = m * 10.0 ** e
            if t * 2.5 >= lo and (not ticks or ticks[-1] < hi):
                ticks.append(float(f"{t:.6g}"))
        if ticks and ticks[-1] >= hi:
            return ticks
        e += 1


def _marker(kind: str, x: float, y: float, fill: str, r: float = 4.0, hollow: bool = False) -> str:
    # hollow: white inside, outlined in the series colour (a variant of the same method/backend)
    paint = f'fill="#fff" stroke="{fill}" stroke-width="1.5"' if hollow else f'fill="{fill}"'
    if kind == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" {paint}/>'
    if kind == "triangle":
        return (f'<polygon points="{x:.1f},{y - r - 1:.1f} {x - r - 1:.1f},{y + r:.1f} '
                f'{x + r + 1:.1f},{y + r:.1f}" {paint}/>')
    if kind == "diamond":
        return (f'<polygon points="{x:.1f},{y - r - 1:.1f} {x + r + 1:.1f},{y:.1f} {x:.1f},'
                f'{y + r + 1:.1f} {x - r - 1:.1f},{y:.1f}" {paint}/>')
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {paint}/>'


def shorten(text: str, limit: int) -> str:
    """`text` in at most `limit` characters, cut in the middle: series names differ most at
    their ends (method/backend first, the variant last), so both ends stay."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "\u2026" + text[len(text) - (limit - 1 - head):]


def plot(series: list[dict], x_label: str, y_label: str, title: str = "", *,
         lines: bool = True, y_zero: bool = True, hlines: list[tuple[float, str]] = (),
         x_ticks: list[float] | None = None, x_tick_labels: list[str] | None = None,
         width: int = 420, height: int = 280, markers: bool = True, log_y: bool = False,
         end_labels: bool = False) -> str:
    """series: [{"name", "colour", "marker", "dash", "hollow"?, "band"?, "line"?, "markers"?,
    "points": [{"x", "y", "href"?, "title"?, "label"?, "fill"?, "lo"?, "hi"?}]}]. Returns one
    <svg> element; an empty string when no series has a point. A point's label is drawn beside
    it; a hollow series has outlined markers; a band series shades its points' lo-hi range
    instead of drawing a bar at each point. A series' "line" (False: markers alone, no end label)
    and "markers" override the plot's `lines` and `markers` for that series: a long curve drawn
    without markers can carry a few marked events."""
    pts = [p for s in series for p in s["points"] if p.get("y") is not None]
    if not pts:
        return ""
    left, right, top, bottom = 64, 150 if end_labels else 14, 30 if title else 12, 48
    if end_labels:
        width += 136
    w, h = width - left - right, height - top - bottom
    xs = [p["x"] for p in pts]
    ys = [p["y"] for p in pts] + [p[k] for p in pts for k in ("lo", "hi") if p.get(k) is not None]
    ys += [y for y, _ in hlines]
    if log_y and min(ys) > 0:
        yt = log_ticks(min(ys), max(ys))
        ylo, yhi = math.log10(yt[0]), math.log10(yt[-1])
        scale = math.log10
    else:
        log_y = False
        ylo, yhi = (min(0.0, min(ys)) if y_zero else min(ys)), max(ys)
        yt = nice_ticks(ylo, yhi)
        ylo, yhi = yt[0], yt[-1]

        def scale(v):
            return v
    xt = x_ticks if x_ticks is not None else (sorted(set(xs)) if len(set(xs)) <= 8
                                              else nice_ticks(min(xs), max(xs)))
    xlo, xhi = min(xt + xs), max(xt + xs)
    pad = (xhi - xlo) * 0.06 or 1.0
    xlo, xhi = xlo - pad, xhi + pad

    def X(v):
        return left + (v - xlo) / (xhi - xlo) * w

    def Y(v):
        return top + h - (scale(v) - ylo) / ((yhi - ylo) or 1.0) * h

    out = _frame(width, height, title, y_label)
    for t, lab in zip(yt, tick_labels(yt)):
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" font-size="11">{lab}</text>')
    labels = x_tick_labels or tick_labels(xt)
    for t, lab in zip(xt, labels):
        out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top + h}" y2="{top + h + 4}" stroke="#333"/>')
        out.append(f'<text x="{X(t):.1f}" y="{top + h + 16}" text-anchor="middle" font-size="11">'
                   f'{escape(lab)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{left + w / 2:.0f}" y="{height - 8}" text-anchor="middle" font-size="12">'
               f'{escape(x_label)}</text>')
    out.append(f'<text transform="translate(14,{top + h / 2:.0f}) rotate(-90)" text-anchor="middle" '
               f'font-size="12">{escape(y_label)}</text>')
    for y, lab in hlines:
        out.append(f'<line class="ref" x1="{left}" x2="{left + w}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" '
                   f'stroke="#C00" stroke-dasharray="5,4" stroke-width="1.5"/>')
        out.append(f'<text x="{left + w - 4}" y="{Y(y) - 4:.1f}" text-anchor="end" font-size="11" '
                   f'fill="#C00">{escape(lab)}</text>')
    tags = []            # end labels: [baseline y, x, series], spread apart after the loop
    for s in series:
        p_s = sorted((p for p in s["points"] if p.get("y") is not None), key=lambda p: p["x"])
        ranged = [p for p in p_s if p.get("lo") is not None and p.get("hi") is not None]
        if s.get("band") and ranged:
            edge = ([f"{X(p['x']):.1f},{Y(p['hi']):.1f}" for p in ranged]
                    + [f"{X(p['x']):.1f},{Y(p['lo']):.1f}" for p in reversed(ranged)])
            out.append(f'<polygon class="band" points="{" ".join(edge)}" fill="{s["colour"]}" '
                       f'fill-opacity="0.15" stroke="none"/>')
        if lines and s.get("line", True) and len(p_s) > 1:
            d = " ".join(f"{X(p['x']):.1f},{Y(p['y']):.1f}" for p in p_s)
            dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
            out.append(f'<polyline points="{d}" fill="none" stroke="{s["colour"]}" stroke-width="2"{dash}/>')
        if end_labels and s.get("line", True) and p_s:
            tags.append([Y(p_s[-1]["y"]) + 4, X(p_s[-1]["x"]) + 8, s])
        for p in (p_s if s.get("markers", markers) else []):
            if p.get("lo") is not None and p.get("hi") is not None and not s.get("band"):
                out.append(f'<line x1="{X(p["x"]):.1f}" x2="{X(p["x"]):.1f}" y1="{Y(p["lo"]):.1f}" '
                           f'y2="{Y(p["hi"]):.1f}" stroke="{s["colour"]}" stroke-width="1.5"/>')
            mark = _marker(s.get("marker", "circle"), X(p["x"]), Y(p["y"]), p.get("fill") or s["colour"],
                           hollow=bool(s.get("hollow")))
            if p.get("label"):
                out.append(f'<text x="{X(p["x"]) + 6:.1f}" y="{Y(p["y"]) - 6:.1f}" font-size="9" '
                           f'fill="{s["colour"]}">{escape(p["label"])}</text>')
            tip = f"<title>{escape(p.get('title') or s['name'])}</title>"
            if p.get("href"):
                out.append(f'<a href="{escape(p["href"])}">{mark.replace("/>", ">" + tip + "</" + _tag(mark) + ">", 1)}</a>')
            else:
                out.append(mark.replace("/>", ">" + tip + "</" + _tag(mark) + ">", 1))
    for y, x, s in _spread(tags, top + 10, top + h + 4):
        out.append(f'<text class="end" x="{x:.1f}" y="{y:.1f}" font-size="10" fill="{s["colour"]}">'
                   f'{escape(shorten(s["name"], 26))}<title>{escape(s["name"])}</title></text>')
    out.append("</svg>")
    return "\n".join(out)


def _spread(tags: list, lo: float, hi: float, gap: float = 11.0) -> list:
    """End labels ordered by height and pushed apart to at least `gap` px, kept within [lo, hi]
    where there is room: series that end close together stay readable."""
    tags = sorted(tags, key=lambda t: t[0])
    for i in range(1, len(tags)):
        tags[i][0] = max(tags[i][0], tags[i - 1][0] + gap)
    overflow = tags[-1][0] - hi if tags else 0
    if overflow > 0:
        for t in tags:
            t[0] -= overflow
        for i in range(len(tags) - 2, -1, -1):
            tags[i][0] = min(tags[i][0], tags[i + 1][0] - gap)
        shift = lo - tags[0][0]
        if shift > 0:                       # more labels than fit: keep the gap, start at the top
            for t in tags:
                t[0] += shift
    return tags


def _tag(mark: str) -> str:
    return mark[1:mark.index(" ")]


def legend(entries: list[tuple[str, dict]]) -> str:
    """An HTML legend: (label, style) pairs drawn with the plots' markers and dashes."""
    items = []
    for label, st in entries:
        dash = f' stroke-dasharray="{st["dash"]}"' if st.get("dash") else ""
        svg = (f'<svg width="34" height="14" viewBox="0 0 34 14" xmlns="http://www.w3.org/2000/svg">'
               f'<line x1="1" x2="33" '
               f'y1="7" y2="7" stroke="{st["colour"]}" stroke-width="2"{dash}/>'
               f'{_marker(st["marker"], 17, 7, st["colour"], 3.5, bool(st.get("hollow")))}</svg>')
        items.append(f'<span class="key">{svg} {escape(label)}</span>')
    return '<div class="legend">' + " ".join(items) + "</div>"


def bars(values: list[tuple[str, float, str | None]], y_label: str, title: str = "",
         width: int = 420, height: int = 260) -> str:
    """Vertical bars: (label, value, href). Empty string when there is nothing to draw. Where the
    bars are too narrow for their labels, every k-th bar is labelled (each bar's tooltip has its
    own)."""
    if not values:
        return ""
    left, right, top, bottom = 64, 14, 30 if title else 12, 64
    w, h = width - left - right, height - top - bottom
    yt = nice_ticks(0.0, max(v for _, v, _ in values) * 1.1)     # room for the value above the bar
    yhi = yt[-1] or 1.0
    out = _frame(width, height, title, y_label)
    for t in yt:
        y = top + h - t / yhi * h
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_fmt(t)}</text>')
    slot = w / len(values)
    every = max(1, math.ceil(64 / slot))        # a label and a value need about 64 px
    chars = max(4, min(28, int(slot * every / 7)))
    for i, (label, v, href) in enumerate(values):
        bh = v / yhi * h
        x = left + i * slot + slot * 0.2
        rect = (f'<rect x="{x:.1f}" y="{top + h - bh:.1f}" width="{slot * 0.6:.1f}" height="{bh:.1f}" '
                f'fill="#0072B2"><title>{escape(label)}: {_fmt(v)}</title></rect>')
        out.append(f'<a href="{escape(href)}">{rect}</a>' if href else rect)
        if i % every:
            continue
        out.append(f'<text x="{x + slot * 0.3:.1f}" y="{top + h - bh - 4:.1f}" text-anchor="middle" '
                   f'font-size="11">{_fmt(v)}</text>')
        out.append(f'<text class="bar-label" x="{x + slot * 0.3:.1f}" y="{top + h + 14}" '
                   f'text-anchor="middle" font-size="10">{escape(label[:chars])}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#333"/>')
    out.append(f'<text transform="translate(14,{top + h / 2:.0f}) rotate(-90)" text-anchor="middle" '
               f'font-size="12">{escape(y_label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def spark(values: list[float], title: str, *, last: str = "#0072B2", width: int = 120,
          height: int = 26) -> str:
    """A sparkline: the values in order, scaled to their own range, the last one marked in
    `last`. Empty string when there is no value."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or abs(hi) or 1.0
    pad = 4.0
    step = (width - 2 * pad) / max(1, len(values) - 1)
    xs = [pad + i * step if len(values) > 1 else width / 2 for i in range(len(values))]
    ys = [height - pad - (v - lo) / span * (height - 2 * pad) if hi > lo else height / 2 for v in values]
    out = [f'<svg class="spark" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
           f"<title>{escape(title)}</title>"]
    if len(values) > 1:
        out.append('<polyline points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
                   + '" fill="none" stroke="#777" stroke-width="1.3"/>')
    out.append(f'<circle cx="{xs[-1]:.1f}" cy="{ys[-1]:.1f}" r="3" fill="{last}"/>')
    out.append("</svg>")
    return "".join(out)
