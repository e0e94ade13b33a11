#!/usr/bin/env python
"""Times a chain of mHC sites with a fused boundary (Triton's kernels/triton/post_coeffs.py, or
with --backend tilelang TileLang's kernels/tilelang/post_coeffs.py) against the same backend's
unfused chain (post, then mhc_pre) on a CUDA GPU and prints one table (last).

    .venv/bin/python dev/tune_chain.py                      # bf16, n=4, T=16384, C=4096,7168, L=4
    .venv/bin/python dev/tune_chain.py --C 4096 --fwd "bt=64;cw=256" --bwd "b2_br=32;b2_bt=32"
    .venv/bin/python dev/tune_chain.py --kernels            # adds each timing's kernels (profiler)
    .venv/bin/python dev/tune_chain.py --backend tilelang --fwd "cw=256;bt=64"
    TRITON_INTERPRET=1 .venv/bin/python dev/tune_chain.py --dry   # the script itself, tiny, on CPU
    ncu --profile-from-start off ... .venv/bin/python dev/tune_chain.py --C 4096 --profile-once

1. Copy rate: 1 GiB device-to-device copy, bytes read + written (suite.measure.timing, L2 flushed).
2. Per C: the fused chain against the fp64 reference at --check-T tokens, every output and
   gradient (tests/chain_check.py), then, each checked before it is timed:
     site fwd      one boundary: post_coeffs + layer_input (fused) against post + mhc_pre
     site fwd+bwd  the same with the upstream gradients of x_next, layer_input, h_post, h_res
     chain fwd, chain fwd+bwd   chain() of --L sites (site 0 mhc_pre, the last a plain post),
                   reported per site
   --fwd / --bwd "cfg;cfg" time the fused boundary with other launch configurations
   ("k=v,..."; "" is the default): fields of kernels/triton/post_coeffs_config.py's Config, or
   with --backend tilelang of kernels/tilelang/post_coeffs.py's. --dry runs Triton only (TileLang's
   mhc_pre, the unfused chain's, is GPU only).
   --profile-once: no check, no timing; one fused site forward+backward per --fwd/--bwd
   configuration inside cudaProfilerStart/Stop (after two warm-up calls), for Nsight Compute's
   --profile-from-start off: its per-kernel DRAM bytes, occupancy and stall reasons.
Floors per site and token (MATH.md, chain of sites; e = 2 bytes): forward (3n+2)C*e, forward +
backward (8n+6)C*e (backward (5n+4)C*e). The coefficient bytes (O(n^2) fp32 a token, under 1% at
C = 4096) are left out. "%floor" is floor bytes / time over the measured copy rate; the unfused
rows are divided by the same floor, so the two columns compare directly.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--C", default="4096,7168", help="stream widths, comma separated")
    p.add_argument("--T", type=int, default=16384, help="tokens")
    p.add_argument("--n", type=int, default=4, help="streams")
    p.add_argument("--L", type=int, default=4, help="sites of the timed chain")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--iters", type=int, default=20, help="Sinkhorn iterations")
    p.add_argument("--check-T", type=int, default=2048, help="tokens of the fp64 check")
    p.add_argument("--fwd", default=None, help='fused forward configurations, "k=v,...;k=v,..."')
    p.add_argument("--bwd", default=None, help='fused backward configurations, "k=v,...;k=v,..."')
    p.add_argument("--kernels", action="store_true", help="each timing's kernels (torch.profiler)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("TUNE_BUDGET_S", "300")),
                   help="seconds; the sweeps stop early past it")
    p.add_argument("--backend", choices=("triton", "tilelang"), default="triton",
                   help="whose fused boundary and unfused ops")
    p.add_argument("--profile-once", action="store_true",
                   help="one fused site fwd+bwd per configuration inside a profiler range, nothing timed")
    p.add_argument("--dry", action="store_true",
                   help="tiny shapes on the CPU interpreter: checks the script, its times mean nothing")
    args = p.parse_args(argv)
    if args.dry:
        if args.backend != "triton":
            p.error("--dry runs the Triton interpreter only")
        args.C, args.T, args.L, args.check_T = "64", 37, 3, 37
    args.widths = [int(c) for c in args.C.split(",") if c]
    return args


DRY = "--dry" in sys.argv[1:]     # before triton is imported: the interpreter is chosen then
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # the interpreter spends ~0.4 s per program of the Sinkhorn backward: 64 tokens a program
    os.environ.setdefault("HCBENCH_MHC_PRE_B1_BT", "64")
    os.environ.setdefault("HCBENCH_POST_COEFFS_B1_BT", "64")

import torch  # noqa: E402
import triton  # noqa: E402

import kernels  # noqa: E402
from kernels.chain import chain  # noqa: E402
from kernels.triton import post_coeffs_config  # noqa: E402
from suite.core.tolerance import tolerance  # noqa: E402
from suite.measure.kernel_profile import print_kernels  # noqa: E402
from suite.measure.timing import Timer, copy_rate_gbps  # noqa: E402
from tests.chain_check import chain_inputs, check_chain, failures, post_inputs  # noqa: E402

DEV = "cpu" if DRY else "cuda"
E = 2
T0 = time.time()
ROWS = []          # (C, what, variant, ms, floor bytes)
COPY = None
ARGS = DT = None   # set by main()


def config_class(backend: str):
    """The backend's launch configuration (a dataclass whose fields --fwd / --bwd set)."""
    if backend == "tilelang":
        from kernels.tilelang.post_coeffs import Config
        return Config
    return post_coeffs_config.Config


def left() -> float:
    return ARGS.budget - (time.time() - T0)


def bench(fn) -> float:
    """Median ms through the suite's timer (L2 flushed before each call)."""
    timer = Timer(DEV)
    if ARGS.dry:
        return timer.time(fn, warmup_ms=0, rep_ms=0, min_samples=1, max_samples=1, b2b_calls=0).median
    return timer.time(fn, warmup_ms=10, rep_ms=60).median


def floor_bytes(C: int, mode: str) -> float:
    n = ARGS.n
    per_token = {"fwd": 3 * n + 2, "fwd+bwd": 8 * n + 6}[mode] * C * E
    return per_token * ARGS.T


def record(C, what, variant, ms, mode):
    fb = floor_bytes(C, mode)
    ROWS.append((C, what, variant, ms, fb))
    print(f"  C={C:5d} {what:22s} {variant:40s} {ms:8.4f} ms {100 * fb / (ms * 1e-3) / COPY:6.1f}% floor",
          flush=True)


def parse_cfgs(text, backend="triton"):
    """'k=v,...;k=v,...' -> list of dicts typed by the backend's Config fields ('' is the default)."""
    types = {f.name: f.type for f in dataclasses.fields(config_class(backend))}
    out = []
    for item in text.split(";"):
        cfg = {}
        for kv in filter(None, item.replace(" ", "").split(",")):
            k, v = kv.split("=", 1)
            if k not in types:
                raise SystemExit(f"tune_chain: unknown config field {k!r}; fields: {', '.join(types)}")
            cfg[k] = int(v) if types[k] in ("int", int) else v
        out.append(cfg)
    return out


def name(cfg) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def unfused(ops):
    return dataclasses.replace(ops, post_coeffs=None, apply_pre=None)


def site_fns(C, cfg_fwd, cfg_bwd):
    """Forward and forward+backward closures of one boundary, fused (with configs) and unfused."""
    g = torch.Generator().manual_seed(C)
    ins = post_inputs(ARGS.n, C, ARGS.T, DT, DEV, g)
    leaves = [t.clone().requires_grad_() for t in ins]
    ups = None

    ops = kernels.get("mhc", ARGS.backend)

    def fused(x, f, hp, hr, phi, b, alpha):
        x_next, h_pre, h_post, h_res = ops.post_coeffs(x, f, hp, hr, phi, b, alpha, ARGS.iters,
                                                       config={**cfg_fwd, **cfg_bwd})
        return x_next, ops.apply_pre(x_next, h_pre), h_post, h_res

    def plain(x, f, hp, hr, phi, b, alpha):
        x_next = ops.post(x, f, hp, hr)
        li, h_post, h_res = ops.pre(x_next, phi, b, alpha, ARGS.iters)
        return x_next, li, h_post, h_res

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(*ins)
        return run

    def fwd_bwd(fn):
        def run():
            nonlocal ups
            for t in leaves:
                t.grad = None
            out = fn(*leaves)
            if ups is None:
                ups = [torch.randn(o.shape, generator=g).to(o.dtype).to(DEV) for o in out]
            torch.autograd.backward(out, ups)
        return run
    return {"fused": (fwd(fused), fwd_bwd(fused)), "unfused": (fwd(plain), fwd_bwd(plain))}


def chain_fns(C, ops):
    g = torch.Generator().manual_seed(C + 1)
    x0, fs, params = chain_inputs(ARGS.n, C, ARGS.T, ARGS.L, DT, DEV, g)
    leaves = [x0.requires_grad_(), *(f.requires_grad_() for f in fs),
              *(t.requires_grad_() for p in params for t in p)]
    ups = None

    def fwd():
        with torch.no_grad():
            chain(ops, x0, fs, params, ARGS.iters)

    def fwd_bwd():
        nonlocal ups
        for t in leaves:
            t.grad = None
        lis, xl = chain(ops, x0, fs, params, ARGS.iters)
        if ups is None:
            ups = [torch.randn(o.shape, generator=g).to(o.dtype).to(DEV) for o in (*lis, xl)]
        torch.autograd.backward([*lis, xl], ups)
    return fwd, fwd_bwd


def check(C) -> bool:
    g = torch.Generator().manual_seed(7)
    T = min(ARGS.check_T, ARGS.T)
    errs, tols = check_chain(kernels.get("mhc", ARGS.backend), *chain_inputs(ARGS.n, C, T, 3, DT, DEV, g),
                             g, ARGS.iters)
    bad = failures(errs, DT, tols)
    worst = max(errs, key=lambda k: errs[k] / tols.get(k, tolerance(DT)))
    print(f"  C={C}: fused chain of 3 sites against the fp64 reference at T={T}: worst {worst} "
          f"{errs[worst]:.1e} (tolerance {tols.get(worst, tolerance(DT)):.2g}, with the state dtype's "
          f"effect){'; FAILED ' + str(bad) if bad else ''}", flush=True)
    return not bad


def timed(C, what, variant, fn, mode):
    if left() < 5:
        print(f"  (time budget: {what} {variant} at C={C} skipped)")
        return
    try:
        ms = bench(fn)
    except Exception as exc:
        print(f"  C={C} {what} {variant}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return
    record(C, what, variant, ms, mode)
    if ARGS.kernels:
        print_kernels(f"C={C} {what} {variant}", fn, DEV)


def profile_once(fwd_cfgs, bwd_cfgs) -> int:
    """Each configuration's fused site forward+backward once inside cudaProfilerStart/Stop."""
    for C in ARGS.widths:
        for cfg_f in fwd_cfgs:
            for cfg_b in bwd_cfgs:
                run = site_fns(C, cfg_f, cfg_b)["fused"][1]
                run(), run()              # compiles and autotuning stay outside the range
                if not ARGS.dry:
                    torch.cuda.synchronize()
                print(f"profiled: C={C} fwd {name(cfg_f)} bwd {name(cfg_b)}", flush=True)
                if not ARGS.dry:
                    torch.cuda.cudart().cudaProfilerStart()
                run()
                if not ARGS.dry:
                    torch.cuda.synchronize()
                    torch.cuda.cudart().cudaProfilerStop()
    return 0


def main(argv=None) -> int:
    global ARGS, COPY, DT
    ARGS = parse_args(argv)
    DT = {"bf16": torch.bfloat16, "fp16": torch.float16}[ARGS.dtype]
    if not ARGS.dry and not torch.cuda.is_available():
        print("tune_chain: needs a CUDA GPU (or --dry for the CPU interpreter)")
        return 1
    COPY = 1e12 if ARGS.dry else copy_rate_gbps(Timer(DEV))["gbps"] * 1e9
    print(f"device {'cpu (dry)' if ARGS.dry else torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; backend {ARGS.backend}; copy rate {COPY / 1e9:.0f} GB/s",
          flush=True)
    fwd_cfgs = parse_cfgs(ARGS.fwd, ARGS.backend) if ARGS.fwd is not None else [{}]
    bwd_cfgs = parse_cfgs(ARGS.bwd, ARGS.backend) if ARGS.bwd is not None else [{}]
    ops = kernels.get("mhc", ARGS.backend)
    if ARGS.profile_once:
        return profile_once(fwd_cfgs, bwd_cfgs)
    for C in ARGS.widths:
        if left() < 10:
            print(f"(time budget spent, C={C} skipped)")
            break
        if not check(C) and not ARGS.dry:     # (the interpreter truncates to bf16: --dry goes on)
            continue
        for cfg in fwd_cfgs:
            fns = site_fns(C, cfg, {})
            timed(C, "site fwd", f"fused {name(cfg)}", fns["fused"][0], "fwd")
        timed(C, "site fwd", "unfused (post + mhc_pre)", fns["unfused"][0], "fwd")
        for cfg in bwd_cfgs:
            fns = site_fns(C, {}, cfg)
            timed(C, "site fwd+bwd", f"fused {name(cfg)}", fns["fused"][1], "fwd+bwd")
        timed(C, "site fwd+bwd", "unfused (post + mhc_pre)", fns["unfused"][1], "fwd+bwd")
        del fns
        for variant, o in (("fused", ops), ("unfused (post + mhc_pre)", unfused(ops))):
            fwd, fwd_bwd = chain_fns(C, o)
            for what, fn, mode in ((f"chain fwd /{ARGS.L}", fwd, "fwd"),
                                   (f"chain fwd+bwd /{ARGS.L}", fwd_bwd, "fwd+bwd")):
                if left() < 5:
                    break
                ms = bench(fn) / ARGS.L
                record(C, what, variant, ms, mode)
        if not ARGS.dry:
            torch.cuda.empty_cache()
    print(f"\nchain of mHC sites ({ARGS.backend}), {ARGS.dtype}, n={ARGS.n}, T={ARGS.T}, {ARGS.iters} Sinkhorn "
          f"iterations; copy {COPY / 1e9:.0f} GB/s; floors per site (3n+2)C / (8n+6)C elements; "
          f"{time.time() - T0:.0f} s")
    print(f"{'C':>5} {'what':22s} {'variant':40s} {'ms':>8} {'GB/s':>6} {'%floor':>7}")
    for C, what, variant, ms, fb in ROWS:
        gbs = fb / (ms * 1e-3) / 1e9
        print(f"{C:5d} {what:22s} {variant:40s} {ms:8.4f} {gbs:6.0f} {100 * gbs * 1e9 / COPY:6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
