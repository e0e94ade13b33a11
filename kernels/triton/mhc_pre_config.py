"""The launch configuration of the Triton mHC pre kernels (kernels/triton/mhc_pre.py): every
field, its default and why, and how the environment (HCBENCH_MHC_PRE_<FIELD>) and a caller's
`config=` override it."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Config:
    # forward
    # bt, bk and warps at n >= 5: mhc_pre.WIDE (32, 32, 4) unless set
    bt: int = 64          # tokens per block (>= 16, power of two: tl.dot M dimension)
    bk: int = 64          # columns per chunk within a stream (power of two >= 16)
    cw: int = 256         # slice width in columns (multiple of bk); S = cdiv(C, cw)
    lag: int = 2          # layer_input of group g - lag is done by the items of group g
    fused: bool = True    # layer_input in the same kernel (else a separate apply kernel)
    persist: int = 0      # 0: one CTA per item; k > 0: k CTAs per SM looping over tickets
    ring: int = -1        # partial-sum slots in groups: -1 auto (~2x the groups in flight), 0 all G
    early: bool = False   # sync counters read early with plain loads (vs atomics when needed)
    epi_unroll: int = 8   # partial-sum slices loaded together in the group epilogue (h_pre part;
                          # half as many for the h_post / h_res part)
    min_items: int = 2    # shrink cw until there are >= min_items * #SM work items
    warps: int = 4
    stages: int = 3
    precision: str = "tf32"   # tl.dot input precision: "tf32", "tf32x3" or "ieee"
    # forward GEMM: "hilo" x as loaded (bf16/fp16, exact) times phi split
    # into hi + lo halves in x's dtype (kernels/hilo.py), two products, fp32 accumulation (phi to
    # ~16 bits); "f32": x converted to fp32 in registers and one product at `precision` (tf32
    # truncates phi to 11 bits). H100, n = 4, T = 16384, C = 4096: f32 split GEMM phase 666 us.
    fwd_dot: str = "hilo"
    apply_bt: int = 16    # separate apply kernel (fused=False)
    apply_bc: int = 256
    # backward, kernel 1 (per-token coefficient backward). Few tokens per CTA and a pipelined
    # dh_pre loop: more CTAs stream x while others run their Sinkhorn backward. H100, bf16, n = 4,
    # T = 16384, C = 4096 (torch.profiler): 258 us at 4 / 128 / 4 stages, 324 us at 16 / 64 / none
    # (dev/logs/tuning-20261124-h100/b1_probe.txt)
    b1_bt: int = 4
    b1_bc: int = 128
    b1_warps: int = 4
    b1_stages: int = 4    # software pipeline depth of the dh_pre loop (1: none)
    # backward, kernel 2 (dx and dphi): 64 tokens x 64 columns x 4 warps, 2 stages: 128 registers
    # and 41 KB of shared memory at n = 4 (sm_90, triton 3.6): 4 CTAs per SM (3 with dx_acc: 145
    # registers). H100, n = 4, T = 16384 (torch.profiler): 442 us at C = 4096, 618 us with
    # dx_acc, 800 us at C = 7168 (3 stages: 464-472 us at 4096; the tf32 kernel before it, 128
    # columns x 8 warps: 850 us under ncu)
    b2_bt: int = 64
    b2_br: int = 64       # columns per CTA (n >= 5: at most 64, and 8 warps unless set)
    b2_ts: int = 0        # token splits; 0: auto (fewest waves x work per CTA, b2_ctas per SM)
    b2_ctas: int = 0      # CTAs per SM for the auto split; 0: what the compiled kernel allows
    b2_warps: int = 4
    b2_stages: int = 2
    b2_dphi: str = "bf16"   # dphi product: "bf16" (x as loaded, du = hi + lo in bf16; bf16 x only)
                            # or "prec" (x in fp32, `precision`)
    explicit: frozenset = frozenset()   # fields set by the caller or the environment (not heuristics)

    def with_env(self) -> "Config":
        names = {f.name.upper() for f in fields(self)} - {"EXPLICIT"}
        unknown = sorted(k for k in os.environ
                         if k.startswith("HCBENCH_MHC_PRE_") and k[len("HCBENCH_MHC_PRE_"):] not in names)
        if unknown:     # a knob that does nothing must not pass for a tuned run
            raise ValueError(f"mhc_pre: unknown setting {', '.join(unknown)}; HCBENCH_MHC_PRE_<FIELD> "
                             f"takes FIELD in {', '.join(sorted(names))}")
        kw = {}
        for f in fields(self):
            if f.name == "explicit":
                continue
            v = os.environ.get("HCBENCH_MHC_PRE_" + f.name.upper())
            if v is None:
                continue
            if f.type in ("bool", bool):
                kw[f.name] = v.lower() in ("1", "true", "yes", "on")
            elif f.type in ("int", int):
                kw[f.name] = int(v)
            else:
                kw[f.name] = v
        return replace(self, **kw, explicit=self.explicit | frozenset(kw)) if kw else self


DEFAULT = Config()


def config_of(config) -> Config:
    """DEFAULT with the environment's HCBENCH_MHC_PRE_<FIELD> settings, then `config` (a dict or a
    Config) on top."""
    cfg = DEFAULT.with_env()
    if config is None:
        return cfg
    if isinstance(config, Config):
        return config
    kw = dict(config)
    return replace(cfg, **kw, explicit=cfg.explicit | frozenset(kw))
