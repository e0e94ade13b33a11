"""The report section of scope stability (records only): per training run, the largest composite
gain over depth at init and at the end, the final losses, the spikes, and the paper's figure
beside them. The curves themselves stay in the records (`stability`, docs/records.md)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

HEADER = ["method", "backend", "init", "lr", "sites", "C", "steps", "gain fwd init", "gain fwd end",
          "gain bwd init", "gain bwd end", "train loss", "val loss", "spikes", "diverged at",
          "paper (27B)"]
NOTES = (
    "Gain: Amax Gain Magnitude of the composite P_l = H_res(L) ... H_res(l) from site l to the "
    "last (attention and FFN counted separately), forward = largest absolute row sum, backward = "
    "largest absolute column sum, per token and averaged over one sequence; the column is the "
    "largest over depth l.",
    "Train loss: mean of the last steps; val loss: the last validation (the standard library's "
    "sources, bytes; the record's stability.corpus says which). Spikes: runs of steps whose loss "
    "exceeds 1.5x the median of the 50 before it, or is not finite.",
    "Paper: the mHC paper's 27B model (60 sites), trained: HC up to about 3000, mHC at most about 1.6.",
)


def _f(v, fmt="{:.4g}") -> str:
    return "" if v is None else fmt.format(v)


def _g(v) -> str:
    """A gain with the digits that show mHC's departures from 1 (1.00045, not 1)."""
    return _f(v, "{:.6g}")


def _key(r: dict):
    c = r["case"]
    order = {"residual": 0, "hc": 1, "mhc": 2}
    return (c["device"], c["C"], c.get("layers") or 0, c.get("lr") or 0.0,
            order.get(c["method"], 9), c.get("init") or "", c["backend"])


def rows(records: list[dict]) -> list[list[str]]:
    out = []
    # skipped cases are listed with their reason under the main table, not here
    for r in sorted((r for r in records if r["case"].get("scope") == "stability"
                     and r["status"] != "skipped"), key=_key):
        c = r["case"]
        row = [c["method"], c["backend"], c.get("init") or "", _f(c.get("lr"), "{:g}"),
               str(2 * (c.get("layers") or 0)), str(c["C"])]
        st = r.get("stability")
        if r["status"] != "ok" or not st:
            out.append(row + [f"{r['status']}: {r.get('reason') or ''}"] + [""] * (len(HEADER) - 7))
            continue
        gain = st.get("max_gain") or {}
        init, end = gain.get("init") or {}, gain.get("end") or {}
        final = st.get("final") or {}
        paper = (st.get("paper") or {}).get("max_gain")
        row += [f"{st['steps_run']}/{c.get('steps')}",
                _g(init.get("forward")), _g(end.get("forward")),
                _g(init.get("backward")), _g(end.get("backward")),
                _f(final.get("train_loss")), _f(final.get("val_loss")), str(st.get("spikes", "")),
                "" if st.get("diverged_at") is None else str(st["diverged_at"]),
                "" if paper is None else f"<= {paper:g}" if c["method"] == "mhc" else f"~{paper:g}"]
        out.append(row)
    return out


def markdown_lines(records: list[dict]) -> list[str]:
    body = rows(records)
    if not body:
        return []
    lines = ["", "## Stability: composite gain over depth and training loss", ""]
    lines += [f"- {n}" for n in NOTES]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    return lines


def print_table(records: list[dict], console: Console) -> None:
    body = rows(records)
    if not body:
        return
    table = Table(title="stability (max gain over depth; paper: 27B, 60 sites)")
    for h in HEADER:
        table.add_column(h, justify="left" if h in ("method", "backend", "init") else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
