"""The README's claim-by-claim verdict: one row per claim of the mHC paper that the suite tests,
with the paper's figure, ours with its interval or spread, and the setup difference that matters.

Each row is made from the records of the committed run folders named in its table block; a claim
whose scenario is not among them reads "not measured yet", so the table never states a number no
record holds. The claims:
- training overhead (the paper: 6.7% for 27B, n = 4, with recompute and DualPipe): per width of an
  overhead run, mHC with recompute by wall clock against the residual, 95% bootstrap interval;
- composite gain (the paper, 27B, 60 sites, trained: HC up to about 3000, mHC at most about 1.6):
  from a stability run, the largest forward gain over depth at the end of training, the spread
  over the learning rates (and mHC's two initialisations, each named);
- memory access per token (Table 2): from a traffic run, the DRAM bytes Nsight Compute measured
  for the unfused bf16 design (backend `unfused`) over Table 2's total, per width.
"""
from __future__ import annotations

from suite.analysis import overhead, paper_traffic
from suite.core.model_shape import PRESETS

CLAIMS = ("overhead", "gain", "traffic")
HEADER = ["claim", "paper", "ours", "setup difference that matters"]


def _scenario(records: list[dict]) -> str | None:
    return next((r.get("scenario") for r in records if r.get("scenario")), None)


def _gpu(env: dict) -> str:
    return (env.get("gpus") or [{}])[0].get("name", "CPU")


def overhead_rows(records: list[dict], env: dict) -> list[list[str]]:
    out = []
    for row in overhead.verdict(records, env):
        c = row["case"]
        if c.method != "mhc" or c.recompute != "mhc" or c.cuda_graph or c.boundary_fusion is False:
            continue
        depth = f"{c.layers} of {c.depth} layers, extrapolated" if c.depth else f"whole {c.layers}-layer model"
        bound = "host-bound" if (row["record"].get("wall_over_device") or 1.0) > 1.1 else "device-bound"
        dev = row.get("device_overhead")
        ours = (f"{row['overhead']:.1f}% [{row['low']:.1f}, {row['high']:.1f}] by wall clock, "
                f"{row['wording']}" + (f"; {dev:.1f}% on the device alone" if dev is not None else ""))
        size = next((k for k, p in PRESETS.items() if p.C == c.C), None) if c.family == "deepseek" else None
        name = f"{size} (C = {c.C})" if size else f"{c.family or 'dense'} model, C = {c.C}"
        out.append([f"mHC training overhead, {name}",
                    f"{overhead.PAPER_OVERHEAD_PCT}% (27B, n = 4, recompute)", ours,
                    f"one {_gpu(env)}: no DualPipe-overlapped pipeline exchange, no expert all-to-all; "
                    f"{depth}; recompute L_r = {c.L_r}; the step is {bound}"])
    return out


def gain_rows(records: list[dict], env: dict) -> list[list[str]]:
    ok = [r for r in records if r["case"].get("scope") == "stability" and r["status"] == "ok"
          and r.get("stability") and r["case"].get("device") != "cpu"]
    out = []
    for method, paper in (("hc", "up to about 3000"), ("mhc", "at most about 1.6")):
        mine = [r for r in ok if r["case"]["method"] == method]
        if not mine:
            continue
        by_init: dict[str, list[float]] = {}
        for r in mine:
            g = ((r["stability"].get("max_gain") or {}).get("end") or {}).get("forward")
            if g is not None:
                by_init.setdefault(r["case"].get("init") or "paper", []).append(g)
        parts = []
        # the paper's initialisation first; five digits show mHC's departures from 1
        for init, gains in sorted(by_init.items(), key=lambda kv: kv[0] != "paper"):
            span = f"{min(gains):.5g}" if len(gains) == 1 else f"{min(gains):.5g} to {max(gains):.5g}"
            label = "" if method == "hc" else ("b = 0: " if init == "paper" else "identity-leaning b_res: ")
            parts.append(f"{label}{span}")
        c = mine[0]["case"]
        lrs = sorted({r["case"].get("lr") for r in mine})
        diverged = sum(1 for r in mine if r["stability"].get("diverged_at") is not None)
        steps = sorted({r["stability"].get("steps_run") for r in mine})
        out.append([f"{'HC' if method == 'hc' else 'mHC'} composite gain (largest forward, over depth)",
                    f"{paper} (27B, 60 sites, trained)",
                    "; ".join(parts) + f" over lr {', '.join(f'{x:g}' for x in lrs)}"
                    + (f"; {diverged} run(s) diverged" if diverged else ""),
                    f"{c.get('family') or 'dense'} model at C = {c['C']}, {2 * c['layers']} sites, "
                    f"{'/'.join(str(s) for s in steps)} steps of {c['T']} byte tokens; one {_gpu(env)}"])
    return out


def traffic_rows(records: list[dict], env: dict) -> list[list[str]]:
    out = []
    for method, label in (("residual", "residual"), ("hc", "HC")):
        for r in sorted((r for r in records if r["status"] == "ok" and r.get("bytes_measured")
                         and r["case"]["backend"] == "unfused" and r["case"]["method"] == method
                         and r["case"]["op"] == "site"), key=lambda r: r["case"]["C"]):
            c = r["case"]
            fig = paper_traffic.paper_figure(c["method"], c["op"], c["mode"], c["n"], c["C"], c["T"], c["dtype"])
            if fig is None:
                continue
            m = r["bytes_measured"]
            total = m["read"] + m["write"]
            out.append([f"Table 2 memory access, {label} site, C = {c['C']}",
                        f"{fig.total / c['T'] / 1e3:.1f} kB a token ({fig.source})",
                        f"{total / c['T'] / 1e3:.1f} kB a token measured, {total / fig.total:.2f}x the paper's "
                        f"(read {m['read'] / fig.read:.2f}x, write {m['write'] / fig.write:.2f}x)",
                        f"backend unfused (plain bf16 PyTorch, one op per step of MATH.md), "
                        f"DRAM bytes under Nsight Compute, T = {c['T']}; one {_gpu(env)}"])
    return out


ROWS = {"overhead": overhead_rows, "stability": gain_rows, "traffic": traffic_rows}
CLAIM_OF = {"overhead": "overhead", "stability": "gain", "traffic": "traffic"}
MISSING = {"overhead": "mHC training overhead", "gain": "HC and mHC composite gain",
           "traffic": "Table 2 memory access"}
PAPER = {"overhead": f"{overhead.PAPER_OVERHEAD_PCT}%", "gain": "HC about 3000, mHC at most about 1.6",
         "traffic": "Table 2 totals"}


def table(runs: list[tuple[str, list[dict], dict]]) -> list[str]:
    """The verdict table from (run name, records, env) of each named run; claims no run covers
    read "not measured yet"."""
    by_claim: dict[str, list[list[str]]] = {claim: [] for claim in CLAIMS}
    for name, records, env in runs:
        scenario = _scenario(records)
        if scenario not in ROWS:
            raise ValueError(f"{name}: scenario {scenario!r} makes no verdict row "
                             f"(one of {', '.join(ROWS)})")
        by_claim[CLAIM_OF[scenario]] += [row[:2] + [row[2] + f" (`{name}`)"] + row[3:]
                                         for row in ROWS[scenario](records, env)]
    rows = []
    for claim in CLAIMS:
        rows += by_claim[claim] or [[MISSING[claim], PAPER[claim], "not measured yet", ""]]
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return out + ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
