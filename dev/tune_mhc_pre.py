#!/usr/bin/env python
"""Times kernels/triton/mhc_pre.py on a CUDA GPU and prints one table (last).

    .venv/bin/python dev/tune_mhc_pre.py            # bf16, n=4, T=16384, 20 Sinkhorn iterations
    TUNE_BUDGET_S=60 .venv/bin/python dev/tune_mhc_pre.py
    .venv/bin/python dev/tune_mhc_pre.py --fwd "cfg;cfg" [--C 4096,7168] [--n 8] [--kernels]
        forward sweep only: mhc_pre forward per configuration, each checked against the fp64
        reference before it is timed, then the site forward (mhc_pre + post) with each
    .venv/bin/python dev/tune_mhc_pre.py --bwd "cfg;cfg" [--C 4096,7168] [--kernels]
        backward sweep only: mhc_pre fwd+bwd per configuration ("k=v,..."; "" is the default),
        gradients checked first, then the site fwd+bwd with the default; --kernels adds each one's
        kernels (mean device time per call, torch.profiler, L2 flushed between calls)

1. Copy rate: 1 GiB device-to-device copy, bytes read + written, through suite.measure.timing (L2 flushed).
2. Per C in (4096, 2560, 7168): mhc_pre (default config) against the fp64 reference, then times of
   forward configurations (the default, the best of the earlier sweep in
   dev/logs/tuning-20261123-h100, token-block / slice-width variants), each checked against the
   reference before it is timed; mhc_coeffs forward (checked too); mhc_pre forward+backward
   (gradients checked against fp64 first) for the default and the best forward;
   and the whole mHC site (mhc_pre + kernels.triton.post) when post is importable: autograd
   composition, and one autograd node with mhc_pre_backward(dx_accumulate=) ('site fwd+bwd*').
   A time budget (TUNE_BUDGET_S, default 75 s) trims the sweeps so the run ends within ~90 s.
3. x passes: how many times the pre forward effectively moves x, from (time x copy rate - layer_input
   bytes) / x bytes; ~1 means the layer_input re-read hits L2, ~2 means it comes from HBM.

Floor bytes per token (e = 2 bytes): coeffs fwd nC*e; pre fwd (n+1)C*e; pre fwd+bwd (3n+2)C*e
(fwd + bwd read x, g_li, write dx); site fwd (3n+2)C*e (MATH.md); site fwd+bwd (8n+5)C*e (site fwd +
pre bwd (2n+1)C + post bwd (3n+2)C). "GB/s" is floor bytes / time, "%copy" that over the measured
copy rate. Config keys: kernels/triton/mhc_pre_config.py.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DRY = "--dry" in sys.argv      # local logic check on the CPU interpreter with tiny shapes
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

from kernels import reference as ref  # noqa: E402
from suite.analysis.cost import case_cost  # noqa: E402
from suite.measure.kernel_profile import print_kernels  # noqa: E402
from suite.measure.timing import Timer, copy_rate_gbps  # noqa: E402
from suite.core.tolerance import rel_err  # noqa: E402

# (kernels.triton re-exports the function mhc_pre, which shadows the module attribute)
M = importlib.import_module("kernels.triton.mhc_pre")

try:
    from kernels.triton.post import post as post_kernel  # noqa: E402
except Exception as exc:  # another agent's file; the site rows are skipped without it
    post_kernel = None
    print(f"(kernels.triton.post not importable: {type(exc).__name__}: {exc}; no site rows)")
try:
    from kernels.triton.post import post_backward, post_forward  # noqa: E402
except Exception:
    post_forward = post_backward = None


class _Site(torch.autograd.Function):
    """mhc_pre + post as one autograd node (F = identity): the pre backward adds its x gradient
    into post's in place (mhc_pre_backward dx_accumulate) instead of autograd's separate add."""

    @staticmethod
    def forward(ctx, x, phi, b, alpha, cfg):
        li, hq, hr, saved = M.mhc_pre_forward(x, phi, b, alpha, ITERS, config=cfg)
        ctx.saved, ctx.post = saved, (li, hq, hr)
        return post_forward(x, li, hq, hr)

    @staticmethod
    def backward(ctx, g):
        li, hq, hr = ctx.post
        dx, df, dhq, dhr = post_backward(g.contiguous(), ctx.saved[0], li, hq, hr)
        dx, dphi, db, da = M.mhc_pre_backward(ctx.saved, df, dhq, dhr, dx_accumulate=dx)
        return dx, dphi, db, da, None


DEV = "cpu" if DRY else "cuda"
T0 = time.time()
BUDGET = float(os.environ.get("TUNE_BUDGET_S", "75"))
# --n: streams (default 4; 1..8, the held-out sweeps use 6 and 8)
N = int(sys.argv[sys.argv.index("--n") + 1]) if "--n" in sys.argv[:-1] else 4
if not 1 <= N <= 8:
    raise SystemExit(f"tune_mhc_pre: --n takes 1..8, got {N}")
T, ITERS, DT = (40 if DRY else 16384), 20, torch.bfloat16
E = 2
CMAIN = 64 if DRY else 4096
ROWS = []          # (C, what, config, ms, floor_bytes)
COPY = None


def left() -> float:
    return BUDGET - (time.time() - T0)


def bench(fn, grad_to_none=None, rep=40):
    """Median ms through the suite's one timer (L2 flushed before each call)."""
    if DRY:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def call():
        for t in grad_to_none or ():
            t.grad = None          # .backward() accumulates; start every sample from no grad
        fn()
    return Timer(DEV).time(call, warmup_ms=10, rep_ms=rep).median


def sync():
    if not DRY:
        torch.cuda.synchronize()


def cfg_name(cfg) -> str:
    if not cfg:
        return "default"
    return ",".join(f"{k}={v}" for k, v in cfg.items())


def floor(C, what) -> float:
    """Floor bytes from the suite's cost model (MATH.md), the same the runner divides by."""
    op, mode = {"coeffs fwd": ("coeffs", "fwd"), "pre fwd": ("pre", "fwd"),
                "pre fwd+bwd": ("pre", "fwd+bwd"), "site fwd": ("site", "fwd"),
                "site fwd+bwd": ("site", "fwd+bwd")}[what.rstrip("*")]
    return case_cost("mhc", op, mode, N, C, T, "bf16" if E == 2 else "fp32", ITERS).total


def record(C, what, cfg, ms):
    ROWS.append((C, what, cfg_name(cfg), ms, floor(C, what)))
    gbs = floor(C, what) / ms / 1e6
    print(f"  C={C:5d} {what:13s} {cfg_name(cfg):48s} {ms:8.4f} ms {gbs:7.0f} GB/s"
          f" {100 * gbs * 1e9 / COPY:5.1f}% copy", flush=True)


def copy_rate() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), the runner's probe."""
    if DRY:
        return 1e12
    rate = copy_rate_gbps(Timer(DEV))["gbps"] * 1e9
    torch.cuda.empty_cache()
    return rate


def make_inputs(C, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi, b, alpha = ref.random_params("mhc", N, C, g, device=DEV)
    x = torch.randn(T, N, C, device=DEV, dtype=torch.float32).to(DT)
    return x, phi, b, alpha


def check(C, x, phi, b, alpha):
    li, hq, hr = M.mhc_pre(x, phi, b, alpha, sinkhorn_iters=ITERS)
    sync()
    out_ref = ref.mhc_pre(*(t.double() for t in (x, phi, b, alpha)), sinkhorn_iters=ITERS)
    errs = [rel_err(o, r) for o, r in zip((li, hq, hr), out_ref)]
    print(f"  C={C}: rel_err vs fp64 reference layer_input {errs[0]:.1e} h_post {errs[1]:.1e} "
          f"h_res {errs[2]:.1e}; sync errors {M.sync_errors()}", flush=True)
    del out_ref
    torch.cuda.empty_cache()
    return li, hq, hr


def time_fwd(what, C, x, phi, b, alpha, cfg, ref_out):
    """Checks, then times, "pre fwd" (mhc_pre) or "coeffs fwd" (mhc_coeffs) against ref_out, the
    reference (layer_input, h_post, h_res); mhc_coeffs returns h_pre first, so that is skipped."""
    fn = M.mhc_pre if what == "pre fwd" else M.mhc_coeffs
    first = 0 if what == "pre fwd" else 1
    try:
        out = fn(x, phi, b, alpha, sinkhorn_iters=ITERS, config=cfg)
        sync()
        bad = M.sync_errors() or max(rel_err(o, r) for o, r in
                                     zip(out[first:], ref_out[first:])) > 1e-2
        ms = bench(lambda: fn(x, phi, b, alpha, sinkhorn_iters=ITERS, config=cfg))
    except Exception as exc:
        print(f"  C={C} {what} {cfg_name(cfg)}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        return None
    if bad:
        print(f"  C={C} {what} {cfg_name(cfg)}: WRONG RESULT (sync errors {M.sync_errors()})")
        return None
    record(C, what, cfg, ms)
    return ms


UPSTREAM = {}     # per C: (g_layer_input, g_h_post, g_h_res, g_x_next) and fp64 reference grads


def upstream(C, x, phi, b, alpha):
    if C not in UPSTREAM:
        gl = torch.randn(T, C, device=DEV).to(DT)
        gq = torch.randn(T, N, device=DEV)
        gr = torch.randn(T, N, N, device=DEV)
        gn = torch.randn(T, N, C, device=DEV).to(DT)
        leaves = [t.detach().double().requires_grad_() for t in (x, phi, b, alpha)]
        out = ref.mhc_pre(*leaves, sinkhorn_iters=ITERS)
        torch.autograd.backward(out, (gl.double(), gq.double(), gr.double()))
        grads = [t.grad for t in leaves]
        del out, leaves
        UPSTREAM[C] = ((gl, gq, gr, gn), grads)
    return UPSTREAM[C]


def time_fwd_bwd(C, x, phi, b, alpha, cfg, what="pre fwd+bwd"):
    (gl, gq, gr, gn), ref_grads = upstream(C, x, phi, b, alpha)
    xs = x.clone().requires_grad_()
    ps = [t.clone().requires_grad_() for t in (phi, b, alpha)]

    def run():
        if what == "site fwd+bwd*":
            _Site.apply(xs, *ps, cfg).backward(gn)
            return
        li, hq, hr = M.mhc_pre(xs, *ps, sinkhorn_iters=ITERS, config=cfg)
        if what == "site fwd+bwd":
            out = post_kernel(xs, li, hq, hr)
            out.backward(gn)
        else:
            torch.autograd.backward((li, hq, hr), (gl, gq, gr))
    try:
        if what == "pre fwd+bwd":       # gradients against the fp64 reference first
            run()
            sync()
            errs = [rel_err(t.grad, r) for t, r in zip([xs, *ps], ref_grads)]
            if M.sync_errors() or max(errs) > 1e-2:
                print(f"  C={C} {what} {cfg_name(cfg)}: WRONG GRADIENTS rel_err "
                      f"{['%.1e' % e for e in errs]} sync errors {M.sync_errors()}")
                return None
        ms = bench(run, grad_to_none=[xs, *ps])
    except Exception as exc:
        print(f"  C={C} {what} {cfg_name(cfg)}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        return None
    record(C, what, cfg, ms)
    return ms


# Forward configurations besides the default: the best of the earlier sweep
# (dev/logs/tuning-20261123-h100) and two token-block / slice-width variants.
FWD_CFGS = [{"bt": 32, "cw": 256}, {"bt": 64, "cw": 128}]
FWD_MAIN_ONLY = [{"bt": 32, "cw": 128, "warps": 8}]
BWD = {}                                               # the backward defaults (Config b2_*)


def _arg(name, default=None):
    if name in sys.argv:
        i = sys.argv.index(name)
        return sys.argv[i + 1] if i + 1 < len(sys.argv) and not sys.argv[i + 1].startswith("--") \
            else ""
    return default


def _parse_cfg(text):
    cfg = {}
    for kv in text.replace(" ", "").split(","):
        if not kv:
            continue
        k, v = kv.split("=", 1)
        typ = {f.name: f.type for f in dataclasses.fields(M.Config)}[k]
        cfg[k] = (v.lower() in ("1", "true")) if typ in ("bool", bool) else \
            int(v) if typ in ("int", int) else v
    return cfg


KERNELS = "--kernels" in sys.argv


def bwd_sweep(cfgs, widths):
    for C in widths:
        x, phi, b, alpha = make_inputs(C)
        for cfg in cfgs:
            if left() < 4:
                print(f"  (time budget: skipping the rest at C={C})")
                break
            if time_fwd_bwd(C, x, phi, b, alpha, cfg) is not None and KERNELS:
                xs = x.clone().requires_grad_()
                ps = [t.clone().requires_grad_() for t in (phi, b, alpha)]
                (gl, gq, gr, gn), _ = upstream(C, x, phi, b, alpha)

                def run():
                    out = M.mhc_pre(xs, *ps, sinkhorn_iters=ITERS, config=cfg)
                    torch.autograd.grad(out, [xs, *ps], (gl, gq, gr))
                print_kernels(f"C={C} pre fwd+bwd {cfg_name(cfg)}", run, DEV)
        if post_kernel is not None and left() > 4:
            time_fwd_bwd(C, x, phi, b, alpha, {}, what="site fwd+bwd")
            if KERNELS:
                xs = x.clone().requires_grad_()
                ps = [t.clone().requires_grad_() for t in (phi, b, alpha)]
                (gl, gq, gr, gn), _ = upstream(C, x, phi, b, alpha)

                def site():
                    li, hq, hr = M.mhc_pre(xs, *ps, sinkhorn_iters=ITERS)
                    torch.autograd.grad(post_kernel(xs, li, hq, hr), [xs, *ps], gn)
                print_kernels(f"C={C} site fwd+bwd", site, DEV)
        del x, phi, b, alpha
        if not DRY:
            torch.cuda.empty_cache()


def fwd_sweep(cfgs, widths):
    for C in widths:
        x, phi, b, alpha = make_inputs(C)
        ref_out = ref.mhc_pre(*(t.double() for t in (x, phi, b, alpha)), sinkhorn_iters=ITERS)
        f = torch.randn(T, C, device=DEV).to(DT)
        for cfg in cfgs:
            if left() < 4:
                print(f"  (time budget: skipping the rest at C={C})")
                break
            if time_fwd("pre fwd", C, x, phi, b, alpha, cfg, ref_out) is None:
                continue
            if KERNELS:
                print_kernels(f"C={C} pre fwd {cfg_name(cfg)}",
                              lambda: M.mhc_pre(x, phi, b, alpha, sinkhorn_iters=ITERS, config=cfg), DEV)
            if post_kernel is not None:
                ms = bench(lambda: post_kernel(x, f, *M.mhc_pre(x, phi, b, alpha, sinkhorn_iters=ITERS,
                                                                 config=cfg)[1:]))
                record(C, "site fwd", cfg, ms)
        del x, phi, b, alpha, ref_out, f
        if not DRY:
            torch.cuda.empty_cache()


def main():
    global COPY
    sweep_arg = "--bwd" if _arg("--bwd") is not None else "--fwd" if _arg("--fwd") is not None else None
    if sweep_arg:
        if not DRY and not torch.cuda.is_available():
            print("tune_mhc_pre: needs a CUDA GPU")
            return 1
        COPY = copy_rate()
        print(f"device {'cpu (dry)' if DRY else torch.cuda.get_device_name()}, triton "
              f"{triton.__version__}; copy rate {COPY / 1e9:.0f} GB/s", flush=True)
        widths = [int(c) for c in _arg("--C", "64" if DRY else "4096").split(",")]
        cfgs = [_parse_cfg(c) for c in _arg(sweep_arg).split(";")]
        (bwd_sweep if sweep_arg == "--bwd" else fwd_sweep)(cfgs, widths)
        from kernels.triton import common   # resident_ctas' cache
        for key, ctas in common.RESIDENT_CTAS.items():
            kw = dict(key[1])
            print(f"resident CTAs per SM: {ctas}  {key[0]} " + " ".join(
                f"{k}={kw[k]}" for k in ("N", "BM", "BT", "BC", "BR", "STAGES", "ACC", "num_warps")
                if k in kw) + (f"  (fallback: {common.RESIDENT_FALLBACKS[key][:200]})" if key in common.RESIDENT_FALLBACKS else ""))
        print(f"\nmhc_pre, bf16, n={N}, T={T}; copy {COPY / 1e9:.0f} GB/s; {time.time() - T0:.0f} s")
        print(f"{'C':>5} {'what':13s} {'config':48s} {'ms':>8} {'GB/s':>6} {'%copy':>6}")
        for C, what, name, ms, fb in ROWS:
            gbs = fb / ms / 1e6
            print(f"{C:5d} {what:13s} {name:48s} {ms:8.4f} {gbs:6.0f} {100 * gbs * 1e9 / COPY:5.1f}%")
        return 0
    if not DRY and not torch.cuda.is_available():
        print("tune_mhc_pre: needs a CUDA GPU")
        return 1
    print(f"device {'cpu (dry)' if DRY else torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    COPY = copy_rate()
    print(f"copy rate (1 GiB d2d, read+write): {COPY / 1e9:.0f} GB/s", flush=True)
    for C in ((64, 40, 72) if DRY else (4096, 2560, 7168)):
        if left() < 5:
            print(f"(time budget spent, skipping C={C})")
            break
        x, phi, b, alpha = make_inputs(C)
        ref_out = check(C, x, phi, b, alpha)
        sweep = [None] + FWD_CFGS + (FWD_MAIN_ONLY if C == CMAIN else [])
        times = {}
        for cfg in sweep:
            if left() < (30 if C == CMAIN else 14):
                print(f"  (time budget: skipping the rest of the sweep at C={C})")
                break
            ms = time_fwd("pre fwd", C, x, phi, b, alpha, cfg, ref_out)
            if ms is not None:
                times[cfg_name(cfg)] = (ms, cfg)
        if not times:
            continue
        best = min(times.values(), key=lambda v: v[0])[1]
        ms = min(v[0] for v in times.values())
        xb, lib = T * N * C * E, T * C * E
        print(f"  C={C}: best pre fwd ({cfg_name(best)}) moves x {(ms * 1e-3 * COPY - lib) / xb:.2f} "
              f"times (at the copy rate)", flush=True)
        for cfg in [None] + ([best] if best is not None else []):
            if left() > 6:
                time_fwd("coeffs fwd", C, x, phi, b, alpha, cfg, ref_out)
        for cfg in [None] + ([best] if best is not None else []):
            if left() > 6:
                time_fwd_bwd(C, x, phi, b, alpha, {**(cfg or {}), **BWD})
        full = {**(best or {}), **BWD}
        if post_kernel is not None and left() > 5:
            f = torch.randn(T, C, device=DEV).to(DT)
            try:
                ms = bench(lambda: post_kernel(x, f, *M.mhc_pre(x, phi, b, alpha, sinkhorn_iters=ITERS,
                                                                 config=full)[1:]))
                record(C, "site fwd", full, ms)
                if left() > 5:
                    time_fwd_bwd(C, x, phi, b, alpha, full, what="site fwd+bwd")
                if left() > 5 and post_forward is not None:
                    time_fwd_bwd(C, x, phi, b, alpha, full, what="site fwd+bwd*")
            except Exception as exc:
                print(f"  site FAILED {type(exc).__name__}: {str(exc)[:300]}")
        del x, phi, b, alpha, ref_out
        if not DRY:
            torch.cuda.empty_cache()

    print("\n'site fwd+bwd*': pre + post as one autograd node, pre's dx added in place into post's")
    print(f"mhc_pre, bf16, n={N}, T={T}, {ITERS} Sinkhorn iterations; copy {COPY / 1e9:.0f} GB/s; "
          f"{time.time() - T0:.0f} s")
    print(f"{'C':>5} {'what':13s} {'config':48s} {'ms':>8} {'GB/s':>6} {'%copy':>6}")
    for C, what, name, ms, fb in ROWS:
        gbs = fb / ms / 1e6
        print(f"{C:5d} {what:13s} {name:48s} {ms:8.4f} {gbs:6.0f} {100 * gbs * 1e9 / COPY:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
