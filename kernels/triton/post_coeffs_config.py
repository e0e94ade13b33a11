"""The launch configuration of the Triton fused boundary (kernels/triton/post_coeffs.py): every
field, its default and why, and how the environment (HCBENCH_POST_COEFFS_<FIELD>) and a caller's
`config=` override it. The defaults are first choices sized for registers (sm_90, n = 4), not yet
timed on a GPU: dev/tune_chain.py times the alternatives."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

ENV_PREFIX = "HCBENCH_POST_COEFFS_"


@dataclass(frozen=True)
class Config:
    # forward kernel: work item = BT tokens x one column slice of cw columns of every stream,
    # walked in chunks of bc columns; S = cdiv(C, cw) slices write fp32 partial sums [S, T, K].
    # 32 x 64 at 8 warps: 166 registers at n = 4 (sm_90, no spills; 4 warps spill; dev/sm90_occupancy.py)
    bt: int = 32          # tokens per item (>= 16, power of two: tl.dot M dimension)
    bc: int = 0           # columns per chunk (power of two >= 16); 0: from n
                          # (post_coeffs.default_bc: 64 at n = 1, 2, 4; 32 at n = 3, 5-7; 16 at n = 8)
    cw: int = 512         # slice width (multiple of bc); partial sums cost S * (K + 1) * 4 bytes a token
    min_items: int = 2    # halve cw until there are >= min_items * #SM items
    warps: int = 8
    stages: int = 2
    unroll: int = 0       # 1: the n destinations of a chunk unrolled (their phi loads issued
                          # together; small tiles only: 32 x 64 spills)
    # finishing kernel (sum of the S partials, norm, gates, Sinkhorn): tokens per program
    fin_bt: int = 16
    fin_warps: int = 4
    # layer_input (kernels/triton/apply_pre.py)
    apply_bt: int = 16
    apply_bc: int = 256
    # backward, coefficient kernel (kernels/triton/mhc_pre_bwd.py bwd_coef_kernel, as mhc_pre's)
    b1_bt: int = 4
    b1_bc: int = 128
    b1_warps: int = 4
    b1_stages: int = 4
    # backward, fused kernel (kernels/triton/post_coeffs_bwd.py): a program owns br columns of
    # every stream over a token range, walked in blocks of b2_bt tokens
    b2_bt: int = 16
    b2_br: int = 0        # 0: from n (kernels/triton/post_coeffs.py _br: 64 at n = 4, 16 at n = 8)
    b2_ts: int = 0        # token ranges; 0: the fewest within 5% of the fewest waves x work per program
    b2_ctas: int = 0      # programs per SM for b2_ts = 0; 0: what the compiled kernel allows
    b2_warps: int = 8
    b2_stages: int = 2
    precision: str = "tf32"   # du @ phi^T and (fp16 x) the dphi product: "tf32", "tf32x3" or "ieee"
    # how the split sums are reduced (the forward's [S, T, K] and [S, T], the backward's dphi over
    # token ranges and dh over column blocks): "ordered" gives every partial one writer and sums
    # them in a fixed order, so a run repeats bit for bit; "atomic" adds them with fp32 atomics
    # into one zeroed buffer each (fewer bytes, no summing pass; the order, so the last bits, may
    # differ between runs). A run's records name the one that ran (kernel_settings).
    reduction: str = "ordered"

    def with_env(self) -> "Config":
        names = {f.name.upper() for f in fields(self)}
        unknown = sorted(k for k in os.environ
                         if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):] not in names)
        if unknown:     # a knob that does nothing must not pass for a tuned run
            raise ValueError(f"post_coeffs: unknown setting {', '.join(unknown)}; {ENV_PREFIX}<FIELD> "
                             f"takes FIELD in {', '.join(sorted(names))}")
        kw = {}
        for f in fields(self):
            v = os.environ.get(ENV_PREFIX + f.name.upper())
            if v is None:
                continue
            kw[f.name] = int(v) if f.type in ("int", int) else v
        return replace(self, **kw) if kw else self


DEFAULT = Config()


REDUCTIONS = ("ordered", "atomic")


def checked(cfg: Config) -> Config:
    if cfg.reduction not in REDUCTIONS:
        raise ValueError(f"post_coeffs: reduction must be one of {', '.join(REDUCTIONS)} "
                         f"({ENV_PREFIX}REDUCTION or config=), got {cfg.reduction!r}")
    return cfg


def config_of(config) -> Config:
    """DEFAULT with the environment's settings, then `config` (a dict or a Config) on top."""
    cfg = DEFAULT.with_env()
    if config is None:
        return checked(cfg)
    if isinstance(config, Config):
        return checked(config)
    return checked(replace(cfg, **dict(config)))
