"""Writes the synthetic run folders under tests/data/publish/ (deterministic; rerun to regenerate).

SYNTHETIC numbers, for the dashboard tests only: two GPU models ("Test GPU A", "Test GPU B"), a
site scenario with every status (ok, failed, skipped, one case not run), a second run on GPU A
where one case is 20% slower (a regression), and whole-model cases timed interleaved with
recompute (the overhead and recompute sections). No figure here was measured on hardware.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from suite.core.scenario import Case

SCENARIO = "sample"
MODEL_SCENARIO = "sample_model"


def _samples(rng: random.Random, median: float, cv: float, n: int = 40) -> list[float]:
    return [round(median * (1 + rng.gauss(0, cv)), 6) for _ in range(n)]


def _timing(samples: list[float]) -> dict:
    s = sorted(samples)
    med = s[len(s) // 2]
    mean = sum(s) / len(s)
    sd = (sum((x - mean) ** 2 for x in s) / len(s)) ** 0.5
    return {"median": med, "p10": s[len(s) // 10], "p90": s[len(s) * 9 // 10], "cv": sd / mean,
            "n": len(s), "samples": samples}


def _record(case: Case, scenario: str, started: str, **fields) -> dict:
    base = {"schema": "hcbench.record/1", "case_id": case.case_id, "case": case.to_dict(),
            "scenario": scenario, "status": "ok", "reason": None, "time_ms": None, "bytes": None,
            "flops": None, "gbps": None, "tflops": None, "pct_of_copy": None, "peak_mem_bytes": None,
            "check": None, "gpu_uuid": None, "started_utc": started, "wall_s": 1.0}
    base.update(fields)
    return base


def _env(gpu: str, copy: float, captured: str, uuid: str) -> dict:
    return {"captured_utc": captured, "host": "fixture",
            "copy_rate": {"cuda": {"gbps": copy, "bytes": 1 << 30}},
            "cpu": {"model": "synthetic", "cores": 2},
            "gpus": [{"name": gpu, "sms": 100, "memory_bytes": 80 * 2**30, "capability": "9.0",
                      "driver": "000.00", "uuid": uuid}],
            "versions": {"python": "3.12", "torch": "2.11.0", "triton": "3.6.0"}}


def site_run(name: str, gpu: str, copy: float, started: str, speed: float, seed: int,
             slow_case: tuple | None = None) -> None:
    rng = random.Random(seed)
    out = HERE / name
    records, saved = [], []
    minute = 0
    for mode in ("fwd", "fwd+bwd"):
        for C in (1024, 2048, 4096):
            for method, n in (("residual", 1), ("hc", 4), ("mhc", 4)):
                for backend in ("torch", "triton"):
                    case = Case(method=method, C=C, T=4096, backend=backend, n=n, mode=mode)
                    saved.append(case.to_dict())
                    if (method, backend, C, mode) == ("mhc", "triton", 4096, "fwd+bwd"):
                        continue        # listed in the scenario, never run: "not run"
                    minute += 1
                    stamp = f"{started[:14]}{minute:02d}:00+00:00"
                    if (method, backend, C) == ("hc", "triton", 1024) and mode == "fwd":
                        records.append(_record(case, SCENARIO, stamp, status="skipped",
                                               reason="backend triton has no pre op for hc yet"))
                        continue
                    if (method, backend, C) == ("mhc", "torch", 4096) and mode == "fwd+bwd":
                        records.append(_record(case, SCENARIO, stamp, status="failed",
                                               reason="check failed: x_next rel err 0.2 > tol 0.01"))
                        continue
                    nbytes = C * 4096 * 2 * (n + 1 + (n if method != "residual" else 1))
                    nbytes *= 3 if mode == "fwd+bwd" else 1
                    eff = {"residual": 0.9, "hc": 0.3, "mhc": 0.25}[method]
                    eff *= 2.0 if backend == "triton" and method != "residual" else 1.0
                    median = nbytes / (copy * 1e9 * eff) * 1e3 / speed
                    if slow_case == (method, backend, C, mode):
                        median *= 1.2
                    t = _timing(_samples(rng, median, 0.01))
                    gbps = nbytes / (t["median"] * 1e-3) / 1e9
                    records.append(_record(case, SCENARIO, stamp, time_ms=t, gbps=gbps,
                                           bytes={"read": nbytes * 2 // 3, "write": nbytes // 3},
                                           pct_of_copy=100 * gbps / copy, copy_gbps=copy,
                                           peak_mem_bytes=nbytes * 2))
    _write(out, records, _env(gpu, copy, started, f"{name}-uuid"),
           {SCENARIO: saved})


def model_run(name: str, gpu: str, copy: float, started: str, seed: int) -> None:
    rng = random.Random(seed)
    out = HERE / name
    records, saved = [], []
    for C in (1024, 2048):
        common = {"C": C, "T": 2048, "scope": "model", "layers": 4, "heads": 8, "mlp_ratio": 4, "seq": 512, "vocab": 1000,
                      "mode": "fwd+bwd"}
        members = [Case(method="residual", n=1, recompute="none", **common),
                   Case(method="hc", n=4, recompute="none", **common),
                   Case(method="mhc", n=4, recompute="none", **common),
                   Case(method="mhc", n=4, recompute="mhc", L_r=1, **common),
                   Case(method="mhc", n=4, recompute="mhc", L_r=2, **common)]
        base_ms = 20.0 * C / 1024
        factors = [1.0, 1.12, 1.09 - 0.04 * (C == 2048), 1.2, 1.15]
        acts = [None, 900, 1000, 700, 750]
        timed = {}
        for case, f in zip(members, factors):
            samples, rounds = [], []
            for rnd in range(8):
                for _ in range(4):
                    samples.append(round(base_ms * f * (1 + rng.gauss(0, 0.005)), 6))
                    rounds.append(rnd)
            timed[case.case_id] = (case, samples, rounds)
        for case, act in zip(members, acts):
            saved.append(case.to_dict())
            _, samples, rounds = timed[case.case_id]
            peers = {cid: {"method": c.method, "backend": c.backend, "n": c.n, "recompute": c.recompute,
                           "L_r": c.L_r, "samples": s, "rounds": r}
                     for cid, (c, s, r) in timed.items() if cid != case.case_id}
            t = _timing(samples)
            records.append(_record(case, MODEL_SCENARIO, started, time_ms=t, rounds=rounds,
                                   interleaved_with=peers, tokens_per_s=2048 / (t["median"] * 1e-3),
                                   activation_peak_bytes=None if act is None else act * C * 2**10,
                                   peak_mem_bytes=3 * 2**30, gbps=100.0, subgroup=0,
                                   flags=["high_cv"] if case.recompute == "mhc" and case.L_r == 2 else []))
    _write(out, records, _env(gpu, copy, started, f"{name}-uuid"), {MODEL_SCENARIO: saved})


def _write(out: Path, records: list[dict], env: dict, scenarios: dict[str, list]) -> None:
    (out / "scenarios").mkdir(parents=True, exist_ok=True)
    (out / "records.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    (out / "env.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
    for name, cases in scenarios.items():
        (out / "scenarios" / f"{name}.json").write_text(json.dumps(
            {"path": f"scenarios/{name}.yaml", "name": name, "description": "synthetic fixture",
             "cases": cases}, indent=1, sort_keys=True) + "\n")


def main() -> None:
    site_run("run-a1", "Test GPU A (synthetic)", 2000.0, "2026-01-01T10:00:00+00:00", 1.0, 1)
    site_run("run-a2", "Test GPU A (synthetic)", 2010.0, "2026-01-08T10:00:00+00:00", 1.0, 2,
             slow_case=("mhc", "torch", 2048, "fwd"))
    site_run("run-b1", "Test GPU B (synthetic)", 4000.0, "2026-01-05T10:00:00+00:00", 1.0, 3)
    model_run("run-b2-model", "Test GPU B (synthetic)", 4000.0, "2026-01-06T10:00:00+00:00", 4)


if __name__ == "__main__":
    main()
