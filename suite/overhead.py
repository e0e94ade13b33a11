"""Overhead arithmetic and the verdict: how much a connection adds to a training step.

overhead % = 100 * (t_method - t_residual) / t_residual, from median step times of cases timed
in the same run and the same interleaved group (suite.steps). Its interval is a paired bootstrap
over measurement rounds: a resample draws rounds with replacement and takes, for both cases, the
median of the samples of the drawn rounds. Drawing whole rounds keeps what both cases saw in a
round (clock, temperature) together, so slow drift widens the interval instead of biasing it.
"""
from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from dataclasses import replace

from suite import predict, recompute
from suite.scenario import Case

PAPER_OVERHEAD_PCT = 6.7
BOOTSTRAP = 2000
LEVEL = 0.95


def overhead_pct(t_method: float, t_residual: float) -> float:
    return 100.0 * (t_method - t_residual) / t_residual


def _by_round(samples: list[float], rounds: list[int]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = defaultdict(list)
    for s, r in zip(samples, rounds):
        out[r].append(s)
    return out


def bootstrap_overhead(method: tuple[list, list], residual: tuple[list, list],
                       resamples: int = BOOTSTRAP, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high) overhead in percent from (samples, round indices) of both cases."""
    m, r = _by_round(*method), _by_round(*residual)
    shared = sorted(set(m) & set(r))
    if not shared:
        raise ValueError("the two cases share no measurement round: they were not interleaved")
    point = overhead_pct(statistics.median(method[0]), statistics.median(residual[0]))
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        pick = [rng.choice(shared) for _ in shared]
        tm = statistics.median([s for k in pick for s in m[k]])
        tr = statistics.median([s for k in pick for s in r[k]])
        stats.append(overhead_pct(tm, tr))
    stats.sort()
    lo = stats[math.floor((1 - level) / 2 * (resamples - 1))]
    hi = stats[math.ceil((1 + level) / 2 * (resamples - 1))]
    return point, lo, hi


def crossing_width(points: list[tuple[int, float]], threshold: float = PAPER_OVERHEAD_PCT):
    """The narrowest measured width from which the overhead stays below `threshold`, or None."""
    found = None
    for C, pct in sorted(points, reverse=True):
        if pct < threshold:
            found = C
        else:
            break
    return found


# ---------------------------------------------------------------- from records
def _case(r: dict) -> Case:
    return Case(**r["case"])


def _site_efficiency(records: list[dict], case: Case) -> float | None:
    """Fraction of the copy rate the run's own site cases of this method reached (fwd+bwd)."""
    for r in records:
        c = r["case"]
        if (r["status"] == "ok" and c["scope"] == "site" and c["op"] == "site"
                and c["mode"] == "fwd+bwd" and c["method"] == case.method
                and c["backend"] == case.backend and c["C"] == case.C and c["n"] == case.n
                and r.get("pct_of_copy")):
            return min(1.0, r["pct_of_copy"] / 100.0)
    return None


def _residual_case(c: Case) -> Case:
    return replace(c, method="residual", backend=c.backend, n=1, sinkhorn_iters=None,
                   recompute="none", L_r=None)


def _peer(record: dict, **want):
    """The samples of a case timed interleaved with `record` that matches `want`, or None."""
    for case_id, peer in (record.get("interleaved_with") or {}).items():
        if all(peer.get(k) == v for k, v in want.items()):
            return case_id, peer
    return None


def verdict(records: list[dict], env: dict) -> list[dict]:
    """One row per hc/mhc layer or model case, against the residual it was timed with."""
    gpu = (env.get("gpus") or [{}])[0].get("name")
    rows = []
    for r in records:
        if r["status"] != "ok" or r["case"]["scope"] == "site" or not r.get("rounds"):
            continue
        c = _case(r)
        found = None if c.method == "residual" else _peer(r, method="residual", recompute="none")
        if found is None:
            continue
        peer = found[1]
        point, lo, hi = bootstrap_overhead((r["time_ms"]["samples"], r["rounds"]),
                                           (peer["samples"], peer["rounds"]))
        row = {"case": c, "record": r, "overhead": point, "low": lo, "high": hi,
               "residual_ms": statistics.median(peer["samples"]), "ms": r["time_ms"]["median"]}
        copy, mm = r.get("copy_gbps"), r.get("matmul_tflops_measured")
        if copy and mm:
            res_case = _residual_case(c)
            row["predicted_floor"] = predict.predicted_overhead(c, res_case, copy, mm)
            eff = _site_efficiency(records, c)
            row["site_efficiency"] = eff
            if eff:
                row["predicted_at_eff"] = predict.predicted_overhead(c, res_case, copy, mm, eff)
            row["other_gpus"] = {}
            for name in predict.PUBLISHED:
                rates = predict.rates_for(name, gpu, copy, mm)
                row["other_gpus"][name] = predict.predicted_overhead(
                    c, res_case, rates["copy_gbps"], rates["matmul_tflops"], eff or 1.0)
        rows.append(row)
    rows.sort(key=lambda x: (x["case"].scope, x["case"].method, x["case"].recompute,
                             x["case"].L_r or 0, x["case"].C))
    return rows


def recompute_rows(records: list[dict]) -> list[dict]:
    """Recompute cases against the same method without recompute, timed together."""
    by_id = {r["case_id"]: r for r in records if r["status"] == "ok"}
    rows = []
    for r in by_id.values():
        c = _case(r)
        if c.scope != "model" or c.recompute in (None, "none"):
            continue
        found = _peer(r, method=c.method, backend=c.backend, n=c.n, recompute="none")
        if found is None:
            continue
        case_id, peer = found
        base = by_id.get(case_id, {})
        s = predict.ELEMENT_BYTES[c.dtype]
        act, act0 = r.get("activation_peak_bytes"), base.get("activation_peak_bytes")
        rows.append({"case": c, "time_cost_pct": overhead_pct(r["time_ms"]["median"],
                                                              statistics.median(peer["samples"])),
                     "saved_bytes": None if act is None or act0 is None else act0 - act,
                     "activation_bytes": act,
                     "model_bytes": recompute.memory_model(c.n, c.C, c.layers, c.L_r) * c.T * s})
    rows.sort(key=lambda x: (x["case"].C, x["case"].layers, x["case"].method,
                             x["case"].recompute, x["case"].L_r))
    return rows


def best_lr_rows(rows: list[dict]) -> list[dict]:
    """Per (method, C, layers) with mhc recompute: the L_r of least activation memory, and of
    least time, next to sqrt(nL/(n+2)) and Eq. 20's integer optimum."""
    grouped = defaultdict(list)
    for row in rows:
        c = row["case"]
        if c.recompute == "mhc" and row["activation_bytes"] is not None:
            grouped[(c.method, c.C, c.layers, c.n)].append(row)
    out = []
    for (method, C, L, n), rs in sorted(grouped.items()):
        out.append({"method": method, "C": C, "layers": L, "n": n,
                    "best_memory_lr": min(rs, key=lambda x: x["activation_bytes"])["case"].L_r,
                    "best_time_lr": min(rs, key=lambda x: x["time_cost_pct"])["case"].L_r,
                    "formula": recompute.lr_star(n, L), "model_best": recompute.best_lr(n, L)})
    return out


def _mib(b) -> str:
    return "" if b is None else f"{b / 2**20:.0f}"


def markdown_lines(records: list[dict], env: dict) -> list[str]:
    """The report's overhead, recompute and prediction sections (empty without such cases)."""
    rows = verdict(records, env)
    lines: list[str] = []
    if rows:
        lines += ["", "## Overhead verdict (whole steps, interleaved in this run)", "",
                  (f"Overhead = (t_method - t_residual) / t_residual of median step times; interval: "
                  f"{100 * LEVEL:.0f}% paired bootstrap over measurement rounds. The paper's figure "
                  f"is {PAPER_OVERHEAD_PCT}% (n = 4, fused kernels, recompute, pipeline overlap; "
                  "setup not disclosed). Predicted: the overhead model (suite/predict.py) at this "
                  "run's copy and bf16 matmul rates, at the bytes floor and at the connection "
                  "kernels' measured fraction of the copy rate (the run's site cases)."), "",
                  ("| scope | method | backend | recompute | L_r | C | layers | residual ms | "
                  "method ms | overhead % [95% CI] | paper % | predicted % floor | predicted % at "
                  "site eff. | tokens/s | peak MiB |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            c, r = row["case"], row["record"]
            eff = row.get("predicted_at_eff")
            at_eff = "" if eff is None else f"{eff:.1f} (eff {row['site_efficiency']:.2f})"
            lines.append(
                f"| {c.scope} | {c.method} | {c.backend} | {c.recompute} | {c.L_r or ''} | {c.C} | "
                f"{c.layers} | {row['residual_ms']:.3g} | {row['ms']:.3g} | {row['overhead']:.1f} "
                f"[{row['low']:.1f}, {row['high']:.1f}] | {PAPER_OVERHEAD_PCT} | "
                f"{_fmt(row.get('predicted_floor'))} | "
                f"{at_eff} | "
                f"{r['tokens_per_s']:.3g} | {_mib(r.get('peak_mem_bytes'))} |")
        lines += ["", ("Width from which the measured overhead stays below the paper's "
                  f"{PAPER_OVERHEAD_PCT}% (model scope, measured widths only):"), ""]
        series = defaultdict(list)
        for row in rows:
            c = row["case"]
            if c.scope == "model":
                series[(c.method, c.backend, c.recompute, c.L_r)].append((c.C, row["overhead"]))
        for (method, backend, rc, lr), pts in sorted(series.items(), key=str):
            w = crossing_width(pts)
            lines.append(f"- {method}/{backend}, recompute {rc}{f' L_r={lr}' if lr else ''}: "
                         + (f"C >= {w}" if w else "not below it at any measured width"))
        preds = [row for row in rows if row.get("other_gpus") and row["case"].scope == "model"]
        if preds:
            names = list(predict.PUBLISHED)
            lines += ["", ("**Prediction, not measurement**: the same overhead model evaluated for "
                      "other GPUs, this run's rates scaled by their published bandwidth and dense "
                      "bf16 rates (suite/predict.py cites the datasheets; a run on a GPU outside "
                      "that table uses the datasheets at typical fractions instead), at the "
                      "measured kernel efficiency where the run has it."), "",
                      "| method | recompute | C | " + " | ".join(f"{n} predicted %" for n in names)
                      + " |", "|---|---|---|" + "---|" * len(names)]
            for row in preds:
                c = row["case"]
                lines.append(f"| {c.method} | {c.recompute} | {c.C} | "
                             + " | ".join(f"{row['other_gpus'][n]:.1f}" for n in names) + " |")
    rc_rows = recompute_rows(records)
    if rc_rows:
        lines += ["", "## Recompute", "",
                  ("Time cost and activation memory against the same method without recompute, "
                  "same group. Activation MiB = device memory a step needs above what it held "
                  "before it. Eq. 20's model, n C ceil(L/L_r) + (n+2) C L_r elements per token, "
                  "counts only the connection's states."), "",
                  ("| method | recompute | L_r | C | layers | time cost % | activation MiB | saved MiB "
                  "| Eq. 20 model MiB |"), "|---|---|---|---|---|---|---|---|---|"]
        for row in rc_rows:
            c = row["case"]
            lines.append(f"| {c.method} | {c.recompute} | {c.L_r} | {c.C} | {c.layers} | "
                         f"{row['time_cost_pct']:.1f} | {_mib(row['activation_bytes'])} | "
                         f"{_mib(row['saved_bytes'])} | {_mib(row['model_bytes'])} |")
        best = best_lr_rows(rc_rows)
        if best:
            lines += ["", ("| method | C | layers | best L_r (memory) | best L_r (time) | "
                      "sqrt(nL/(n+2)) | Eq. 20 integer optimum |"), "|---|---|---|---|---|---|---|"]
            for b in best:
                lines.append(f"| {b['method']} | {b['C']} | {b['layers']} | {b['best_memory_lr']} | "
                             f"{b['best_time_lr']} | {b['formula']:.2f} | {b['model_best']} |")
    return lines


def _fmt(v) -> str:
    return "" if v is None else f"{v:.1f}"
