#!/usr/bin/env python
"""Registers, spills and shared memory of the Triton forward kernels compiled for an sm_90 GPU
(H100, H200) on this machine, and the programs an SM then holds. No GPU is needed: Triton's
compiler and the ptxas and cuobjdump in its wheel do the work.

    .venv/bin/python dev/sm90_occupancy.py                 # every kernel, n = 1..8, its defaults
    .venv/bin/python dev/sm90_occupancy.py --kernel post_coeffs --n 4,8 \\
        --config ";bt=64,bc=16;bt=16,bc=32,warps=4"
    .venv/bin/python dev/sm90_occupancy.py --n 5,8 --json   # one JSON object a row (for tests)

Kernels: mhc_pre (kernels/triton/mhc_pre_fwd.py fwd_kernel, the site's coefficients and
layer_input), post_coeffs (kernels/triton/post_coeffs_fwd.py, the fused boundary's forward) and
post_coeffs_bwd (kernels/triton/post_coeffs_bwd.py, its fused backward, every gradient asked for).
Launch sizes come from the launchers' own fwd_sizes, residency from kernels.triton.common
ctas_per_sm (the arithmetic resident_ctas applies on a GPU). C and T are marked divisible by 16
when they are, as Triton's launcher specialises them; other integer arguments are not.

What this predicts is occupancy, not speed: a GPU run (dev/tune_chain.py, dev/tune_mhc_pre.py)
measures what it is worth. One compile takes 5-30 s on one core; rows print as they finish.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.reference import EPS_RMS, EPS_SK  # noqa: E402
from kernels.triton import mhc_pre as pre  # noqa: E402
from kernels.triton import mhc_pre_config, post_coeffs, post_coeffs_config  # noqa: E402
from kernels.triton.common import coef_shapes, ctas_per_sm, np2  # noqa: E402
from kernels.triton.mhc_pre_fwd import fwd_kernel  # noqa: E402
from kernels.triton.post_coeffs_bwd import post_coeffs_bwd_kernel  # noqa: E402
from kernels.triton.post_coeffs_fwd import post_coeffs_fwd_kernel  # noqa: E402

H100_SMS = 132
NO_COMPILER = 3      # exit status where this triton cannot compile for sm_90 (tests skip on it)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def parse_configs(text: str) -> list[dict]:
    """'k=v,...;k=v,...' -> one dict per configuration ('' is the default); integers as int."""
    out = []
    for spec in text.split(";"):
        cfg = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, val = item.partition("=")
            if not sep or not val.strip():
                raise ValueError(f"--config item {item!r} is not key=value")
            val = val.strip()
            cfg[key.strip()] = int(val) if re.fullmatch(r"-?\d+", val) else val
        out.append(cfg)
    return out


def launch_mhc_pre(n: int, T: int, C: int, cfg_dict: dict, state: str):
    cfg = mhc_pre_config.config_of(cfg_dict)
    bt, bk, warps, cw = pre.fwd_sizes(n, T, C, H100_SMS, cfg)
    K, NP, KP = coef_shapes(n)
    eu, eu2 = pre.epilogue_unroll(n, triton.cdiv(C, cw), cfg)
    const = dict(N=n, NP=NP, K=K, KP=KP, BT=bt, BK=bk, APPLY=True, SAVE=True, PREC=cfg.precision,
                 HILO=cfg.fwd_dot == "hilo", DOT_F32=False, MAXSPIN=pre.MAX_SPIN, NT=32 * warps,
                 EARLY=cfg.early, EU=eu, EU2=eu2, EPS_RMS=EPS_RMS, EPS_SK=EPS_SK)
    pointers = {"x_ptr": state, "phi_ptr": state, "plo_ptr": state, "li_ptr": state, "sync_ptr": "*i32"}
    return fwd_kernel, const, pointers, warps, cfg.stages, f"bt {bt} bk {bk} cw {cw} warps {warps}"


def launch_post_coeffs(n: int, T: int, C: int, cfg_dict: dict, state: str):
    cfg = post_coeffs_config.config_of(cfg_dict)
    bt, bc, cw = post_coeffs.fwd_sizes(n, T, C, H100_SMS, cfg)
    K, _, KP = coef_shapes(n)
    const = dict(N=n, K=K, KP=KP, BT=bt, BC=bc, STAGES=cfg.stages, ATOMIC=cfg.reduction == "atomic",
                 UNROLL=bool(cfg.unroll), DOT_F32=False)
    pointers = {p: state for p in ("x_ptr", "f_ptr", "phi_ptr", "plo_ptr", "out_ptr")}
    # the launcher passes no num_stages: Triton's default (3) applies to loops without their own
    return post_coeffs_fwd_kernel, const, pointers, cfg.warps, 3, f"bt {bt} bc {bc} cw {cw} warps {cfg.warps}"


def launch_post_coeffs_bwd(n: int, T: int, C: int, cfg_dict: dict, state: str):
    cfg = post_coeffs_config.config_of(cfg_dict)
    K, NP, KP = coef_shapes(n)
    bt2, br = max(16, min(np2(cfg.b2_bt), np2(T))), post_coeffs._br(cfg, NP, KP)
    const = dict(N=n, NP=NP, K=K, KP=KP, BT=bt2, BR=br, STAGES=cfg.b2_stages, HAS_GX=True, HAS_LI=True,
                 NEED_DX=True, NEED_DF=True, NEED_DH=True, DPHI=True, PREC=cfg.precision,
                 DPHI_BF16=state == "*bf16" and cfg.precision == "tf32", ATOMIC=cfg.reduction == "atomic",
                 DOT_F32=False)
    pointers = {p: state for p in ("gx_ptr", "x1_ptr", "x0_ptr", "f_ptr", "gli_ptr", "dx_ptr", "df_ptr")}
    return (post_coeffs_bwd_kernel, const, pointers, cfg.b2_warps, 3,
            f"b2_bt {bt2} br {br} warps {cfg.b2_warps}")


KERNELS = {"mhc_pre": launch_mhc_pre, "post_coeffs": launch_post_coeffs,
           "post_coeffs_bwd": launch_post_coeffs_bwd}


def compile_sm90(fn, const: dict, pointers: dict, ints: dict, warps: int, stages: int) -> dict:
    """Compiles fn for sm_90 and reads the cubin's resource usage."""
    sig = {}
    for a in fn.arg_names:
        sig[a] = "constexpr" if a in const else pointers.get(a, "*fp32") if a.endswith("_ptr") else "i32"
    div16 = {a for a, v in ints.items() if v % 16 == 0}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a.endswith("_ptr") or a in div16}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(k.asm["cubin"])
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage)
    if not m:
        raise RuntimeError(f"cuobjdump gave no resource usage: {usage.strip()[:200]}")
    return {"regs": int(m[1]), "local": int(m[2]), "spill_stores": sass.count("STL"),
            "shared": k.metadata.shared}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default="all", help=f"comma separated, of {', '.join(sorted(KERNELS))}; or all")
    p.add_argument("--n", default="1,2,3,4,5,6,7,8", help="stream counts, comma separated")
    p.add_argument("--C", type=int, default=4096, help="width (the kernels compile per width)")
    p.add_argument("--T", type=int, default=16384, help="tokens (sets bt's cap and divisibility)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--config", default="", help='configurations "k=v,...;k=v,..." ("" the default)')
    p.add_argument("--json", action="store_true", help="one JSON object a row instead of the table")
    args = p.parse_args(argv)
    try:
        ns = [int(v) for v in args.n.split(",")]
    except ValueError:
        p.error(f"--n takes integers 1..8 separated by commas, got {args.n!r}")
    if not all(1 <= v <= 8 for v in ns):
        p.error(f"--n takes integers 1..8, got {args.n!r}")
    if not CUOBJDUMP.exists():
        print(f"sm90_occupancy: cannot compile for sm_90 here: {CUOBJDUMP} is missing "
              "(Triton's NVIDIA backend)", file=sys.stderr)
        return NO_COMPILER
    try:
        configs = parse_configs(args.config)
    except ValueError as exc:
        p.error(str(exc))
    kernels = sorted(KERNELS) if args.kernel == "all" else args.kernel.split(",")
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        p.error(f"--kernel takes {', '.join(sorted(KERNELS))} or all (comma separated), "
                f"got {', '.join(unknown)}")
    state = {"bf16": "*bf16", "fp16": "*fp16"}[args.dtype]
    if not args.json:
        print(f"sm_90, triton {triton.__version__}, {args.dtype}, C = {args.C}, T = {args.T}; programs "
              "an SM from registers, shared memory and warps (kernels.triton.common.ctas_per_sm)")
        print(f"{'kernel':<15} {'n':>2}  {'config':<24} {'sizes':<34} {'regs':>4} {'spills':>6} "
              f"{'smem KB':>7} {'CTAs/SM':>7} {'warps/SM':>8}")
    for name in kernels:
        for n in ns:
            for cfg in configs:
                label = ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"
                try:
                    fn, const, pointers, warps, stages, sizes = KERNELS[name](n, args.T, args.C, cfg, state)
                    r = compile_sm90(fn, const, pointers, {"C": args.C, "T": args.T}, warps, stages)
                except Exception as exc:   # one configuration failing must not end the table
                    if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
                        print(f"sm90_occupancy: cannot compile for sm_90 here: {str(exc).splitlines()[0]}",
                              file=sys.stderr)
                        return NO_COMPILER
                    error = f"{type(exc).__name__}: {str(exc)[:160]}"
                    print(json.dumps({"kernel": name, "n": n, "config": label, "error": error}) if args.json
                          else f"{name:<15} {n:>2}  {label:<24} failed: {error}", flush=True)
                    continue
                ctas = ctas_per_sm(r["regs"], warps, r["shared"])
                if args.json:
                    print(json.dumps({"kernel": name, "n": n, "config": label, "sizes": sizes, **r,
                                      "warps": warps, "ctas_per_sm": ctas}), flush=True)
                    continue
                spills = f"{r['spill_stores']}" if r["spill_stores"] else "-"
                print(f"{name:<15} {n:>2}  {label:<24} {sizes:<34} {r['regs']:>4} {spills:>6} "
                      f"{r['shared'] / 1024:>7.1f} {ctas:>7} {ctas * warps:>8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
