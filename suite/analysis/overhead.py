"""Overhead arithmetic and the verdict: how much a connection adds to a training step.

overhead % = 100 * (t_method - t_residual) / t_residual, from median step times of cases timed
in the same run and the same interleaved group (suite.run.groups). For scope model the times are wall
clock per whole step (host included; suite.measure.timing), the headline; the device-only overhead
(padded device time of the step's parts) and the overhead without the optimizer step are
reported beside it. Its interval is a paired bootstrap over measurement rounds: a resample draws
rounds with replacement and takes, for every case involved, the median of the samples of the
drawn rounds. Drawing whole rounds keeps what the cases saw in a round (clock, temperature)
together, so slow drift widens the interval instead of biasing it.

A model that runs fewer layers than its full depth (`depth`) is extrapolated: with H the time of
the step's depth-independent part (embedding, streams in and out, head, loss and their AdamW;
measured interleaved, `Step.head_call`), t_full = H + (t - H) * depth / layers for every case.
The dense first layer is taken to cost what an MoE layer costs (its FFN width is chosen so that
their matmul FLOPs match; suite.workloads.deepseek), and the residual's H stands for every method's, so
the streams' copy in and sum out is scaled with depth: a small overstatement of HC's and mHC's
overhead, never an understatement.

Wording follows the interval: "consistent with 6.7%" when it contains 6.7, "above" or "below"
only when it excludes it.

The overhead model (suite.analysis.predict) is shown only where it predicts the measured residual step
(device time) within CALIBRATION_TOL on the same GPU; its error is reported for every width.
"""
from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from dataclasses import replace

from suite.analysis import predict
from suite.core import recompute_size
from suite.core.dtypes import ELEMENT_BYTES
from suite.core.scenario import Case

PAPER_OVERHEAD_PCT = 6.7
BOOTSTRAP = 2000
LEVEL = 0.95
CALIBRATION_TOL = 0.10
# What a one-GPU step leaves out of the paper's 6.7% (PAPERS.md B.8-B.10: DualPipe, EP).
NOT_ON_ONE_GPU = ("the pipeline-parallel exchange of the n-stream state (n times a residual's "
                  "bytes, overlapped by DualPipe in the paper) and the expert-parallel all-to-all; "
                  "a one-GPU step has neither, for any method")


def overhead_pct(t_method: float, t_residual: float) -> float:
    return 100.0 * (t_method - t_residual) / t_residual


def wording(low: float, high: float, paper: float = PAPER_OVERHEAD_PCT) -> str:
    if low <= paper <= high:
        return f"consistent with {paper}%"
    return f"above {paper}%" if low > paper else f"below {paper}%"


def _by_round(samples: list[float], rounds: list[int]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = defaultdict(list)
    for s, r in zip(samples, rounds):
        out[r].append(s)
    return out


def bootstrap(series: list[tuple[list, list]], stat, resamples: int = BOOTSTRAP,
              level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high) of stat(*medians) over (samples, round indices) series, resampling the
    rounds they share."""
    by = [_by_round(*x) for x in series]
    shared = sorted(set.intersection(*(set(b) for b in by)))
    if not shared:
        raise ValueError("the cases share no measurement round: they were not interleaved")
    point = stat(*(statistics.median(x[0]) for x in series))
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        pick = [rng.choice(shared) for _ in shared]
        stats.append(stat(*(statistics.median([v for k in pick for v in b[k]]) for b in by)))
    stats.sort()
    lo = stats[math.floor((1 - level) / 2 * (resamples - 1))]
    hi = stats[math.ceil((1 + level) / 2 * (resamples - 1))]
    return point, lo, hi


def bootstrap_overhead(method: tuple[list, list], residual: tuple[list, list],
                       resamples: int = BOOTSTRAP, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high) overhead in percent from (samples, round indices) of both cases."""
    return bootstrap([method, residual], overhead_pct, resamples, level, seed)


def extrapolated_pct(scale: float):
    """The overhead of full-depth steps from run-depth times and the head part H."""
    def stat(t_method, t_residual, head):
        return overhead_pct(head + (t_method - head) * scale, head + (t_residual - head) * scale)
    return stat


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


def _head(record: dict, residual_id: str):
    for peer in (record.get("interleaved_with") or {}).values():
        if peer.get("method") == "head" and peer.get("of") == residual_id:
            return peer
    return None


def _device_ms(record: dict) -> float | None:
    return (record.get("device") or {}).get("step_ms")


def verdict(records: list[dict], env: dict) -> list[dict]:
    """One row per hc/mhc layer or model case, against the residual it was timed with."""
    gpu = (env.get("gpus") or [{}])[0].get("name")
    by_id = {r["case_id"]: r for r in records if r.get("status") == "ok"}
    calibration = calibration_rows(records)
    rows = []
    for r in records:
        if r["status"] != "ok" or r["case"]["scope"] == "site" or not r.get("rounds"):
            continue
        c = _case(r)
        found = None if c.method == "residual" else _peer(
            r, method="residual", recompute="none", cuda_graph=bool(c.cuda_graph))
        if found is None and c.method != "residual" and not c.cuda_graph:
            found = _peer(r, method="residual", recompute="none")   # records before the flag
        if found is None:
            continue
        res_id, peer = found
        res_rec = by_id.get(res_id, {})
        mine, theirs = (r["time_ms"]["samples"], r["rounds"]), (peer["samples"], peer["rounds"])
        scale = (c.depth / c.layers) if c.depth else 1.0
        head = _head(r, res_id) if c.depth else None
        if c.depth and head is None:
            continue                      # a partial model without its head part: no verdict
        if head is not None:
            hs = (head["samples"], head["rounds"])
            point, lo, hi = bootstrap([mine, theirs, hs], extrapolated_pct(scale))
            head_ms = statistics.median(head["samples"])
        else:
            point, lo, hi = bootstrap_overhead(mine, theirs)
            head_ms = 0.0
        full = (lambda t: head_ms + (t - head_ms) * scale)
        row = {"case": c, "record": r, "overhead": point, "low": lo, "high": hi,
               "wording": wording(lo, hi), "residual_ms": full(statistics.median(peer["samples"])),
               "ms": full(r["time_ms"]["median"]), "residual_record": res_rec}
        dm, dr = _device_ms(r), _device_ms(res_rec)
        if dm and dr:
            row["device_overhead"] = overhead_pct(full(dm), full(dr))
            om, orr = r["device"]["optimizer_ms"], res_rec["device"]["optimizer_ms"]
            row["no_optimizer_overhead"] = overhead_pct(
                full(r["time_ms"]["median"] - om), full(statistics.median(peer["samples"]) - orr))
            row["optimizer_share"] = res_rec.get("optimizer_share")
        row["bound"] = (r.get("bound"), res_rec.get("bound"))
        cal = calibration.get(res_id)
        copy, mm = r.get("copy_gbps"), r.get("matmul_tflops_measured")
        if copy and mm and (c.scope != "model" or (cal and cal["calibrated"])):
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
    rows.sort(key=lambda x: (x["case"].scope, x["case"].family or "dense", x["case"].method,
                             bool(x["case"].cuda_graph), x["case"].recompute,
                             x["case"].L_r or 0, x["case"].C))
    return rows


def calibration_rows(records: list[dict]) -> dict:
    """Per residual model case: the overhead model's predicted step (at this run's rates)
    against the measured device time of the step, and whether it is within CALIBRATION_TOL."""
    out = {}
    for r in records:
        c = r["case"]
        if (r.get("status") != "ok" or c["scope"] != "model" or c["method"] != "residual"
                or not _device_ms(r) or not r.get("copy_gbps")
                or not r.get("matmul_tflops_measured")):
            continue
        case = _case(r)
        pred = predict.predict_ms(case, r["copy_gbps"], r["matmul_tflops_measured"])["total_ms"]
        err = (pred - _device_ms(r)) / _device_ms(r)
        out[r["case_id"]] = {"case": case, "predicted_ms": pred, "measured_ms": _device_ms(r),
                             "error": err, "calibrated": abs(err) <= CALIBRATION_TOL}
    return out


def recompute_rows(records: list[dict]) -> list[dict]:
    """Recompute cases against the same method without recompute, timed together, with the
    measured memory beside Eq. 20 counted per site (L = 2 * layers sites)."""
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
        res = _peer(r, method="residual", recompute="none")
        res_rec = by_id.get(res[0], {}) if res else {}
        s = ELEMENT_BYTES[c.dtype]
        sites = 2 * c.layers
        act, act0 = r.get("activation_peak_bytes"), base.get("activation_peak_bytes")
        kept, kept_res = r.get("retained_bytes"), res_rec.get("retained_bytes")
        rows.append({"case": c, "time_cost_pct": overhead_pct(r["time_ms"]["median"],
                                                              statistics.median(peer["samples"])),
                     "saved_bytes": None if act is None or act0 is None else act0 - act,
                     "activation_bytes": act,
                     "retained_bytes": kept,
                     "retained_over_residual": (None if kept is None or kept_res is None
                                                else kept - kept_res),
                     "model_retained_bytes": recompute_size.retained_model(c.n, c.C, sites, c.L_r)
                     * c.T * s,
                     "model_bytes": recompute_size.memory_model(c.n, c.C, sites, c.L_r) * c.T * s})
    rows.sort(key=lambda x: (x["case"].C, x["case"].layers, x["case"].method,
                             x["case"].recompute, x["case"].L_r))
    return rows


def best_lr_rows(rows: list[dict]) -> list[dict]:
    """Per (method, C, layers) with mhc recompute: the L_r of least activation memory, and of
    least time, next to sqrt(nL/(n+2)) and Eq. 20's integer optimum, L and L_r in sites."""
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
                    "formula": recompute_size.lr_star(n, 2 * L),
                    "model_best": recompute_size.best_lr(n, 2 * L)})
    return out


def _mib(b) -> str:
    return "" if b is None else f"{b / 2**20:.0f}"


def _fmt(v, spec=".1f") -> str:
    return "" if v is None else format(v, spec)


def _headline(row) -> bool:
    c = row["case"]
    return (c.scope == "model" and c.family == "deepseek" and c.method == "mhc"
            and c.recompute == "mhc" and not c.cuda_graph
            and c.L_r == min(2 * c.layers, recompute_size.default_lr(c.n, c.depth or c.layers)))


def markdown_lines(records: list[dict], env: dict) -> list[str]:
    """The report's overhead, recompute and calibration sections (empty without such cases)."""
    rows = verdict(records, env)
    lines: list[str] = []
    if rows:
        head = [row for row in rows if _headline(row)]
        lines += ["", "## Overhead verdict", "",
                  ("Overhead = (t_method - t_residual) / t_residual of median times of cases timed "
                   f"interleaved in this run; interval: {100 * LEVEL:.0f}% paired bootstrap over "
                   "rounds. Scope model: wall clock per whole step (host included), the step being "
                   "accum micro-batches of T tokens and one AdamW step; device-only: padded device "
                   "time of the same parts; 'no optimizer': both steps less their AdamW. Partial "
                   "depth: extrapolated to the full depth with the measured depth-independent part "
                   "(suite/analysis/overhead.py says how)."), "",
                  f"Not on one GPU, for any method: {NOT_ON_ONE_GPU}.", ""]
        if head:
            lines += ["**The paper's configuration** (deepseek family, mHC n = 4, recompute at "
                      "Eq. 20's L_r*, wall clock):", "",
                      "| C | layers run / depth | accum | residual ms | mHC ms | overhead % [95% CI] "
                      "| verdict | device-only % | no optimizer % | optimizer share | bound "
                      "(mHC, residual) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for row in head:
                lines.append(_row_line(row))
            lines.append("")
        lines += ["All rows:", "",
                  "| family | method | backend | graph | recompute | L_r | C | layers / depth | "
                  "accum | residual ms | method ms | overhead % [95% CI] | verdict | "
                  "device-only % | no optimizer % | tokens/s | MFU |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            c, r = row["case"], row["record"]
            lines.append(
                f"| {c.family or 'dense'} | {c.method} | {c.backend} | "
                f"{'yes' if c.cuda_graph else ''} | {c.recompute} | {c.L_r or ''} | {c.C} | "
                f"{c.layers}{'/' + str(c.depth) if c.depth else ''} | {c.accum or 1} | "
                f"{row['residual_ms']:.4g} | {row['ms']:.4g} | {row['overhead']:.1f} "
                f"[{row['low']:.1f}, {row['high']:.1f}] | {row['wording']} | "
                f"{_fmt(row.get('device_overhead'))} | {_fmt(row.get('no_optimizer_overhead'))} | "
                f"{r['tokens_per_s']:.4g} | {_fmt(r.get('mfu'), '.1%')} |")
        lines += ["", "Residual baselines: tokens/s and model-FLOPs utilisation against the "
                  "datasheet's dense bf16 rate, the optimizer's share of the step, and whether "
                  "the host or the device bounds it.", "",
                  "| family | C | layers / depth | accum | wall ms | device ms | host enqueue ms "
                  "| bound | optimizer share | tokens/s | MFU | backends (pre, post) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        seen = set()
        for row in rows:
            rr = row["residual_record"]
            if not rr or rr["case_id"] in seen:
                continue
            seen.add(rr["case_id"])
            c, d = _case(rr), rr.get("device") or {}
            lines.append(
                f"| {c.family or 'dense'} | {c.C} | {c.layers}{'/' + str(c.depth) if c.depth else ''}"
                f" | {c.accum or 1} | {rr['time_ms']['median']:.4g} | {_fmt(d.get('step_ms'), '.4g')}"
                f" | {_fmt(d.get('host_step_ms'), '.4g')} | {rr.get('bound') or ''} | "
                f"{_fmt(rr.get('optimizer_share'), '.1%')} | {rr['tokens_per_s']:.4g} | "
                f"{_fmt(rr.get('mfu'), '.1%')} | {_backends(rr)} |")
        lines += _calibration_lines(records, rows, env)
    rc_rows = recompute_rows(records)
    if rc_rows:
        lines += ["", "## Recompute", "",
                  ("Time cost against the same method without recompute, same group. L_r counts "
                   "sites (two per layer). Activation peak = the step's peak less parameters, "
                   "gradients and optimizer state. Retained = memory a micro-batch's forward keeps "
                   "for its backward; 'over residual' subtracts the residual model's (same F). "
                   "Eq. 20 (per site, L = 2 x layers): resident n C ceil(L/L_r), total with the "
                   "transient (n+2) C L_r, elements per token."), "",
                  ("| method | recompute | L_r | C | layers | time cost % | activation MiB | saved MiB "
                   "| retained over residual MiB | Eq. 20 resident MiB | Eq. 20 total MiB |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rc_rows:
            c = row["case"]
            lines.append(f"| {c.method} | {c.recompute} | {c.L_r} | {c.C} | {c.layers} | "
                         f"{row['time_cost_pct']:.1f} | {_mib(row['activation_bytes'])} | "
                         f"{_mib(row['saved_bytes'])} | {_mib(row['retained_over_residual'])} | "
                         f"{_mib(row['model_retained_bytes'])} | {_mib(row['model_bytes'])} |")
        best = best_lr_rows(rc_rows)
        if best:
            lines += ["", ("| method | C | layers | best L_r (memory) | best L_r (time) | "
                      "sqrt(nL/(n+2)), L in sites | Eq. 20 integer optimum |"),
                      "|---|---|---|---|---|---|---|"]
            for b in best:
                lines.append(f"| {b['method']} | {b['C']} | {b['layers']} | {b['best_memory_lr']} | "
                             f"{b['best_time_lr']} | {b['formula']:.2f} | {b['model_best']} |")
    return lines


def _backends(record: dict) -> str:
    ob = record.get("op_backends")
    if not ob:
        return record["case"]["backend"]
    boundary = ob.get("boundary")
    return f"{ob['pre']}, {ob['post']}" + (f"; boundary {boundary}" if boundary and boundary != "unfused" else "")


def _row_line(row) -> str:
    c = row["case"]
    bound = row.get("bound") or (None, None)
    return (f"| {c.C} | {c.layers}{'/' + str(c.depth) if c.depth else ''} | {c.accum or 1} | "
            f"{row['residual_ms']:.4g} | {row['ms']:.4g} | {row['overhead']:.1f} "
            f"[{row['low']:.1f}, {row['high']:.1f}] | {row['wording']} | "
            f"{_fmt(row.get('device_overhead'))} | {_fmt(row.get('no_optimizer_overhead'))} | "
            f"{_fmt(row.get('optimizer_share'), '.1%')} | {bound[0]}, {bound[1]} |")


def _calibration_lines(records: list[dict], rows: list[dict], env: dict) -> list[str]:
    cal = calibration_rows(records)
    if not cal:
        return []
    lines = ["", "## Overhead model calibration", "",
             (f"The overhead model (suite/analysis/predict.py) predicts a residual step from its matmul "
              f"FLOPs at this run's measured matmul rate and its other bytes at the measured copy "
              f"rate. Its predictions are shown only where it predicts the measured residual "
              f"step (device time) within {CALIBRATION_TOL:.0%}."), "",
             "| family | C | layers | predicted ms | measured device ms | error | predictions shown |",
             "|---|---|---|---|---|---|---|"]
    for x in cal.values():
        c = x["case"]
        lines.append(f"| {c.family or 'dense'} | {c.C} | {c.layers} | {x['predicted_ms']:.4g} | "
                     f"{x['measured_ms']:.4g} | {x['error']:+.1%} | "
                     f"{'yes' if x['calibrated'] else 'no'} |")
    preds = [row for row in rows if row.get("other_gpus") and row["case"].scope == "model"]
    if preds:
        names = list(predict.PUBLISHED)
        lines += ["", ("**Prediction, not measurement** (calibrated widths only): the overhead "
                  "model at the bytes floor and at the run's kernel efficiency, and for other GPUs "
                  "with this run's rates scaled by published bandwidth and dense bf16 rates."), "",
                  "| method | recompute | C | floor % | at site eff. % | "
                  + " | ".join(f"{n} %" for n in names) + " |",
                  "|---|---|---|---|---|" + "---|" * len(names)]
        for row in preds:
            c = row["case"]
            lines.append(f"| {c.method} | {c.recompute} | {c.C} | "
                         f"{_fmt(row.get('predicted_floor'))} | {_fmt(row.get('predicted_at_eff'))} | "
                         + " | ".join(f"{row['other_gpus'][n]:.1f}" for n in names) + " |")
    return lines
