"""The record's schema version and its one flat projection.

A record is one JSON object per case in a run folder's records.jsonl (docs/records.md lists its
fields). Every flat copy of it (the SQLite history, PostgreSQL, the tidy CSV) takes the columns
below, in this order, from `flat`; SQLite and PostgreSQL keep the whole record as JSON beside
them, so nothing is lost to the projection.
"""
from __future__ import annotations

import hashlib
import json

# /2: L_r counts sites, scope model is timed by wall clock, records carry code and
# kernel_settings. /1 records read the same way (their scope-model times are padded device time).
SCHEMA = "hcbench.record/2"
KNOWN_SCHEMAS = ("hcbench.record/1", SCHEMA)
STATUSES = ("ok", "skipped", "failed")


def problem(record) -> str | None:
    """Why a parsed records.jsonl line is not a record this version reads, or None."""
    if not isinstance(record, dict):
        kind = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
                str: "a string", list: "an array"}.get(type(record), type(record).__name__)
        return f"not a JSON object but {kind}"
    if record.get("schema", "hcbench.record/1") not in KNOWN_SCHEMAS:
        return (f"schema {record.get('schema')!r} is not one this version reads "
                f"({', '.join(KNOWN_SCHEMAS)}); a newer hcbench wrote it")
    for key in ("case_id", "case", "status"):
        if key not in record:
            return f"no {key!r} field"
    if not isinstance(record["case"], dict):
        return "its 'case' is not a JSON object"
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is not one of {', '.join(STATUSES)}"
    return None

CASE_COLUMNS = (
    ("method", "text"), ("backend", "text"), ("op", "text"), ("scope", "text"), ("n", "int"),
    ("C", "int"), ("T", "int"), ("dtype", "text"), ("mode", "text"), ("device", "text"),
    ("sinkhorn_iters", "int"), ("gpus", "int"), ("layers", "int"), ("heads", "int"),
    ("seq", "int"), ("vocab", "int"), ("recompute", "text"), ("L_r", "int"), ("family", "text"),
    ("accum", "int"), ("depth", "int"), ("cuda_graph", "bool"), ("parallel", "text"),
    ("microbatches", "int"), ("overlap", "text"), ("sites", "int"),
    ("boundary_fusion", "bool"), ("steps", "int"), ("lr", "real"), ("init", "text"))

COLUMNS = (
    ("case_id", "text"), ("scenario", "text"), ("status", "text"), ("reason", "text"),
    *CASE_COLUMNS,
    ("median_ms", "real"), ("p10_ms", "real"), ("p90_ms", "real"), ("cv", "real"),
    ("samples", "int"), ("b2b_ms", "real"), ("time_kind", "text"), ("gbps", "real"),
    ("pct_of_copy", "real"), ("copy_gbps", "real"), ("peak_mem_bytes", "int"),
    ("tokens_per_s", "real"), ("mfu", "real"), ("optimizer_share", "real"), ("bound", "text"),
    ("device_step_ms", "real"), ("overlap_efficiency", "real"), ("amplification", "real"),
    ("train_loss", "real"), ("val_loss", "real"), ("max_gain_fwd", "real"), ("max_gain_bwd", "real"),
    ("spikes", "int"), ("flags", "text"), ("started_utc", "time"), ("gpu_uuid", "text"),
    ("code_commit", "text"), ("code_dirty", "bool"), ("kernel_settings", "text"))
NAMES = tuple(name for name, _ in COLUMNS)


def join_key(record: dict) -> str:
    """What records join on across runs (history, regressions, GPUs side by side): the case id,
    and for a record timed with kernel knobs set, a hash of their values too, so a tuned run is
    never compared with a default one."""
    knobs = record.get("kernel_settings")
    if not knobs:
        return record["case_id"]
    digest = hashlib.sha1(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:6]
    return f"{record['case_id']}+k{digest}"


def flat(record: dict) -> dict:
    """The record's flat columns (None where it lacks the field)."""
    c, t = record.get("case") or {}, record.get("time_ms") or {}
    code = record.get("code") or {}
    knobs = record.get("kernel_settings")
    out = {"case_id": record.get("case_id"), "scenario": record.get("scenario"),
           "status": record.get("status"), "reason": record.get("reason")}
    out.update({name: c.get(name) for name, _ in CASE_COLUMNS})
    if out["scope"] is None:
        out["scope"] = "site"
    out.update({
        "median_ms": t.get("median"), "p10_ms": t.get("p10"), "p90_ms": t.get("p90"),
        "cv": t.get("cv"), "samples": t.get("n"), "b2b_ms": t.get("b2b_ms"),
        "time_kind": record.get("time_kind"), "gbps": record.get("gbps"),
        "pct_of_copy": record.get("pct_of_copy"), "copy_gbps": record.get("copy_gbps"),
        "peak_mem_bytes": record.get("peak_mem_bytes"),
        "tokens_per_s": record.get("tokens_per_s"), "mfu": record.get("mfu"),
        "optimizer_share": record.get("optimizer_share"), "bound": record.get("bound"),
        "device_step_ms": (record.get("device") or {}).get("step_ms")
        if isinstance(record.get("device"), dict) else None,
        "overlap_efficiency": record.get("overlap_efficiency"),
        "amplification": record.get("amplification"),
        **_stability_columns(record.get("stability")),
        "flags": ";".join(record.get("flags") or []) or None,
        "started_utc": record.get("started_utc"), "gpu_uuid": record.get("gpu_uuid"),
        "code_commit": code.get("commit"), "code_dirty": code.get("dirty"),
        "kernel_settings": None if knobs is None else json.dumps(knobs, sort_keys=True)})
    return out


def _stability_columns(st) -> dict:
    """Scope stability's headline numbers (docs/records.md): final losses, the largest composite
    gain over depth at the end of training, and the count of loss spikes."""
    st = st if isinstance(st, dict) else {}
    final = st.get("final") or {}
    end = (st.get("max_gain") or {}).get("end") or {}
    return {"train_loss": final.get("train_loss"), "val_loss": final.get("val_loss"),
            "max_gain_fwd": end.get("forward"), "max_gain_bwd": end.get("backward"),
            "spikes": st.get("spikes")}


def throughput(read: int, write: int, flops: int, seconds: float, copy: dict | None) -> dict:
    """The record fields of a timed case's floor bytes and FLOPs over its median time: bytes,
    flops, gbps, tflops, and the copy rate it is set against (`copy_gbps`) when one was measured."""
    fields = {"bytes": {"read": read, "write": write}, "flops": flops,
              "gbps": (read + write) / seconds / 1e9, "tflops": flops / seconds / 1e12}
    if copy:
        fields["copy_gbps"] = copy["gbps"]
    return fields
