"""The one definition of a regression, used by `compare` (two runs or the history), `publish` (its
console line, the dashboard and the exports) and `--fail-on-regression`.

A case's new median is judged against the earlier runs of the same case (same join key) on the
same GPU model *in the same environment* (driver, CUDA, torch, Triton, TileLang):

- regression: more than PCT % slower than the median of the earlier medians (the fixed ratio
  threshold), AND above the noise band (the median of the earlier runs' p90 of single calls: above
  what nine calls in ten took before), AND, once at least Z_MIN_RUNS earlier runs exist, a robust
  z-score above Z_LIMIT (the modified z-score of Iglewicz and Hoaglin: 0.6745 (x - median) / MAD
  over the earlier medians). The ratio says the change matters, the band says it is outside one
  run's noise, the z-score says it is outside the run-to-run noise of the history.
- improvement: the mirror image (faster by more than PCT %, below the band's p10, z below -Z_LIMIT).
- environment changed: no earlier run shares the environment. The change is shown (for example
  "torch 2.10.0 -> 2.11.0") with the ratio to the earlier runs, and never called a regression:
  a driver or library update moves times for reasons outside the code under test.
- first run, within noise: the remaining cases.

A code commit is not an environment change: catching the commit that slowed a kernel is what the
gate is for. The commit change is reported beside the verdict (`code_change`).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

REGRESSION_PCT = 5.0
Z_LIMIT = 3.5
Z_MIN_RUNS = 5
ENV_FIELDS = ("driver", "cuda", "torch", "triton", "tilelang")

RULE = (f"A median is a regression when it is more than {REGRESSION_PCT:.0f}% slower than the median "
        "of the earlier runs' medians (same case, same GPU model, same driver and libraries), above "
        "their p10-p90 noise band, and, with at least "
        f"{Z_MIN_RUNS} earlier runs, more than {Z_LIMIT} robust z-scores (median/MAD) above them; "
        "a run whose driver or libraries differ from every earlier run is marked "
        "\"environment changed\" instead.")


def environment(env: dict) -> dict[str, str]:
    """The fields of a run's env.json that move times without a code change."""
    versions = env.get("versions") or {}
    gpus = env.get("gpus") or [{}]
    out = {"driver": (gpus[0] or {}).get("driver")}
    out.update({k: versions.get(k) for k in ENV_FIELDS if k != "driver"})
    return {k: str(v) for k, v in out.items() if v is not None}


def changes(old: dict[str, str], new: dict[str, str]) -> tuple[str, ...]:
    """"name old -> new" for each field known in both that differs (an older env.json that lacks a
    field is not taken for a change)."""
    return tuple(f"{k} {old[k]} -> {new[k]}" for k in ENV_FIELDS
                 if k in old and k in new and old[k] != new[k])


@dataclass(frozen=True)
class Judgement:
    verdict: str                       # "first run", "within noise", "regression", "improvement",
                                       # "environment changed"
    baseline: float | None = None      # median of the earlier medians compared with
    band: tuple[float, float] | None = None
    z: float | None = None             # robust z-score, where Z_MIN_RUNS earlier runs exist
    env_change: tuple[str, ...] = ()

    def change_pct(self, median: float) -> float | None:
        return None if self.baseline is None else 100.0 * (median / self.baseline - 1.0)


def robust_z(x: float, earlier: list[float]) -> float | None:
    """The modified z-score of x over `earlier`; None below Z_MIN_RUNS values or when they do not
    spread (MAD 0), where it cannot tell noise from signal."""
    if len(earlier) < Z_MIN_RUNS:
        return None
    med = statistics.median(earlier)
    mad = statistics.median(abs(v - med) for v in earlier)
    if mad == 0:
        return None
    return 0.6745 * (x - med) / mad


def judge(median: float, env: dict[str, str], earlier: list[tuple[float, float, float, dict]],
          pct: float = REGRESSION_PCT) -> Judgement:
    """`earlier`: (median, p10, p90, environment) of the earlier runs of the case, oldest first."""
    if not earlier:
        return Judgement("first run")
    same = [e for e in earlier if not changes(e[3], env)]
    pool = same or earlier
    base = statistics.median(m for m, _, _, _ in pool)
    band = (statistics.median(lo for _, lo, _, _ in pool), statistics.median(hi for _, _, hi, _ in pool))
    if not same:
        return Judgement("environment changed", base, band, None, changes(earlier[-1][3], env))
    z = robust_z(median, [m for m, _, _, _ in same])
    change = 100.0 * (median / base - 1.0)
    if change > pct and median > band[1] and (z is None or z > Z_LIMIT):
        return Judgement("regression", base, band, z)
    if change < -pct and median < band[0] and (z is None or z < -Z_LIMIT):
        return Judgement("improvement", base, band, z)
    return Judgement("within noise", base, band, z)


def describe(j: Judgement, median: float) -> str:
    """One line's worth: "+8.9% vs 0.47 ms (band 0.46-0.48, z 6.1)"."""
    if j.baseline is None:
        return j.verdict
    parts = [f"{j.change_pct(median):+.1f}% vs {j.baseline:.4g} ms",
             f"band {j.band[0]:.4g}-{j.band[1]:.4g}"]
    if j.z is not None and math.isfinite(j.z):
        parts.append(f"z {j.z:+.1f}")
    if j.env_change:
        parts.append("; ".join(j.env_change))
    return f"{parts[0]} ({', '.join(parts[1:])})"
