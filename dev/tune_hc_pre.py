"""Checks and times kernels/triton/hc_pre.py (HC pre: norm + tanh projections + F_pre) on a CUDA GPU.

Usage: python dev/tune_hc_pre.py [--C 2560,4096,7168] [--fwd "cfg;cfg"] [--bwd "cfg;cfg"] [--json F]
                                    [--kernels]  (per-kernel device times, torch.profiler)
       TRITON_INTERPRET=1 python dev/tune_hc_pre.py --smoke   (no GPU: tiny shapes in the
       interpreter, to test the script itself; its timings mean nothing)

A configuration is a "key=value,..." string given to hc_pre(config=...) (keys: DEFAULT_CONFIG in
kernels/triton/hc_pre.py; "" is the default). HCBENCH_HC_PRE in the environment changes the default.
1. Copy rate: 1 GiB device-to-device copy, bytes read + written / median time (the ceiling).
2. For bf16, n = 4, T = 16384 and each C: hc_pre against the fp64 reference (forward outputs at full
   size; every gradient on the first 1024 tokens), for every configuration timed.
3. Times (medians through suite.measure.timing, L2 flushed before every call): hc_pre forward per
   forward configuration; hc_pre forward + backward (autograd) per backward configuration; and the
   HC site, hc_pre + kernels.triton.post (if importable), forward and forward + backward (x's two
   gradients joined by the site link, kernels/site_link.py), with the default configuration.
   --kernels: each backward configuration's and the site's kernels, mean device time per call
   (torch.profiler, L2 flushed between calls).
Floors (elements of 2 bytes per token, plus the fp32 coefficients h_post, h_res: 4(n + n^2) bytes
written forward, read backward): hc_pre forward (n+1)C; hc_pre forward + backward (3n+2)C (backward
reads x and g_li, writes dx); site forward (3n+2)C (MATH.md: read (2n+1)C, write (n+1)C).
The table comes last; --json writes every number. Aims to finish within about 60 s.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from suite.measure.kernel_profile import print_kernels  # noqa: E402
from suite.measure.timing import Timer, copy_rate_gbps  # noqa: E402

from kernels import reference  # noqa: E402
from kernels.triton import common  # noqa: E402
from suite.core.tolerance import rel_err, tolerance  # noqa: E402

H = importlib.import_module("kernels.triton.hc_pre")   # the package re-exports the function hc_pre

FWD_CONFIGS = [
    "",                                         # default: gemm_bk=128, gemm_stages=4
    "gemm_bm=128,gemm_warps=8,gemm_stages=3",
    "gemm_bk=64,gemm_stages=3",                 # the gemm defaults before the first H100 run
    "apply_bt=8,apply_bc=512",
]
BWD_CONFIGS = [
    "",                                         # 64 rows x 64 columns, 4 warps, 3 stages
    "b2_bc=128,b2_warps=8,b2_ctas=1",          # 8 warps: ~160-176 registers, 1 CTA per SM
    "b2_stages=4,b2_ctas=3",                    # 74 KB of shared memory: 3 CTAs per SM
    "b2_stages=2",
    "b2_ctas=3",
    "b2_ctas=8",
    "b2_bm=128,b2_warps=8,b2_ctas=1",
    "b2_dw=tf32",
]
N, T, DTYPE = 4, 16384, torch.bfloat16
DEVICE = "cuda"
SMOKE = False


def bench(fn) -> float:
    """Median ms through the suite's one timer (L2 flushed before each call on a GPU)."""
    return Timer(DEVICE).time(fn, warmup_ms=5, rep_ms=25, min_samples=3 if SMOKE else 30).median


def copy_rate() -> float:
    """GB/s of a device-to-device copy, bytes read + written."""
    return copy_rate_gbps(Timer(DEVICE), nbytes=(1 << 16) if SMOKE else None)["gbps"]


def inputs(T, n, C, seed):
    g = torch.Generator().manual_seed(seed)
    w, b, s = (t.to(DEVICE) for t in reference.random_params("hc", n, C, g))
    x = torch.randn(T, n, C, generator=g).to(DTYPE).to(DEVICE)
    return x, w, b, s


def check(x, w, b, s, cfg, tgrad):
    """Max norm-wise error over forward outputs (all tokens) and gradients (first tgrad tokens)."""
    errs = []
    with torch.no_grad():
        out = H.hc_pre(x, w, b, s, config=cfg)
        ref = reference.hc_pre(x.double(), w.double(), b.double(), s.double())
    errs += [rel_err(o, r) for o, r in zip(out, ref)]
    del ref
    xs = x[:tgrad]
    ins = [t.clone().requires_grad_() for t in (xs, w, b, s)]
    out = H.hc_pre(*ins, config=cfg)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ups = [torch.randn(o.shape, generator=g, device=DEVICE).to(o.dtype) for o in out]
    grads = torch.autograd.grad(out, ins, ups)
    ins64 = [t.detach().double().requires_grad_() for t in (xs, w, b, s)]
    ref = reference.hc_pre(*ins64)
    rgrads = torch.autograd.grad(ref, ins64, [u.double() for u in ups])
    errs += [rel_err(o, r) for o, r in zip(out, ref)] + [rel_err(a, r) for a, r in zip(grads, rgrads)]
    return max(errs)


def floors(T, n, C):
    e = 2                                  # bytes per state element
    coef = 4 * (n + n * n) * T             # h_post, h_res (fp32)
    fwd = (n + 1) * C * e * T + coef
    return {"fwd": fwd, "fwd+bwd": (3 * n + 2) * C * e * T + 2 * coef,
            "site fwd": (3 * n + 2) * C * e * T + 2 * coef,
            # site fwd + pre bwd (2n+1)C + post bwd (3n+2)C, as dev/tune_mhc_pre.py (F's own
            # elementwise product not counted)
            "site f+b": (8 * n + 5) * C * e * T + 4 * coef}


def main() -> int:
    global SMOKE, DEVICE, T
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--C", default="2560,4096,7168")
    ap.add_argument("--fwd", default=None, help="';'-separated forward configurations")
    ap.add_argument("--bwd", default=None, help="';'-separated backward configurations")
    ap.add_argument("--json", default=None, help="write every result to this file")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter allowed")
    ap.add_argument("--kernels", action="store_true", help="per-kernel device times (profiler)")
    args = ap.parse_args()
    SMOKE = args.smoke
    if not torch.cuda.is_available():
        if not SMOKE:
            print("tune_hc_pre: needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
            return 0
        DEVICE = "cpu"
    widths = [int(c) for c in args.C.split(",")]
    fwd_cfgs = FWD_CONFIGS if args.fwd is None else args.fwd.split(";")
    bwd_cfgs = BWD_CONFIGS if args.bwd is None else args.bwd.split(";")
    if SMOKE:
        T, widths, fwd_cfgs, bwd_cfgs = 9, [40, 264], fwd_cfgs[:2], bwd_cfgs[:2]
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)"
    copy = copy_rate()
    print(f"device: {name}; copy rate {copy:.0f} GB/s (1 GiB d2d, read + write)", flush=True)
    try:
        post = importlib.import_module("kernels.triton.post").post
    except Exception as exc:  # another agent's file; the site row is optional
        post, post_err = None, f"{type(exc).__name__}: {exc}"

    rows, results = [], []
    for C in widths:
        x, w, b, s = inputs(T, N, C, seed=C)
        fl = floors(T, N, C)
        tgrad = min(T, 1024)

        def record(kind, cfg, ms, err):
            gbs = fl[kind] / (ms * 1e-3) / 1e9
            rows.append((C, kind, cfg or "default", ms, gbs, 100 * gbs / copy, err))
            results.append(dict(C=C, n=N, T=T, kind=kind, config=cfg, ms=ms, floor_bytes=fl[kind],
                                gbs=gbs, pct_copy=100 * gbs / copy, max_err=err, device=name,
                                copy_gbs=copy))

        for cfg in fwd_cfgs:
            err = check(x, w, b, s, cfg, tgrad)
            with torch.no_grad():
                ms = bench(lambda: H.hc_pre(x, w, b, s, config=cfg))
            record("fwd", cfg, ms, err)
        xg, wg, bg, sg = (t.clone().requires_grad_() for t in (x, w, b, s))
        g = torch.Generator(device=DEVICE).manual_seed(2)
        ups = [torch.randn(T, C, generator=g, device=DEVICE).to(DTYPE),
               torch.randn(T, N, generator=g, device=DEVICE),
               torch.randn(T, N, N, generator=g, device=DEVICE)]
        for cfg in bwd_cfgs:
            err = check(x, w, b, s, cfg, tgrad) if cfg else float("nan")

            def fb():
                out = H.hc_pre(xg, wg, bg, sg, config=cfg)
                torch.autograd.grad(out, (xg, wg, bg, sg), ups)
            ms = bench(fb)
            record("fwd+bwd", cfg, ms, err)
            if args.kernels:
                print_kernels(f"C={C} fwd+bwd {cfg or 'default'}", fb, DEVICE)
        if post is not None:
            f = torch.randn(T, C, generator=g, device=DEVICE).to(DTYPE)

            def site():
                li, h_post, h_res = H.hc_pre(x, w, b, s)
                return post(x, f, h_post, h_res)
            with torch.no_grad():
                ms = bench(site)
            record("site fwd", "hc_pre+post", ms, float("nan"))
            gn = torch.randn(T, N, C, generator=g, device=DEVICE).to(DTYPE)
            fm = torch.randn(T, C, generator=g, device=DEVICE).to(DTYPE)

            def site_fb():
                li, h_post, h_res = H.hc_pre(xg, wg, bg, sg)
                out = post(xg, li * fm, h_post, h_res)     # F = layer_input * fm
                torch.autograd.grad(out, (xg, wg, bg, sg), gn)
            ms = bench(site_fb)
            record("site f+b", "hc_pre+post (F = li*m)", ms, float("nan"))
            if args.kernels:
                print_kernels(f"C={C} site fwd+bwd", site_fb, DEVICE)
        del x, w, b, s, xg, wg, bg, sg
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    if post is None:
        print(f"(site rows skipped: kernels.triton.post did not import: {post_err})")
    for key, ctas in common.RESIDENT_CTAS.items():
        kw = dict(key[1])
        print(f"resident CTAs per SM: {ctas}  {key[0]} " + " ".join(
            f"{k}={kw[k]}" for k in ("N", "BM", "BT", "BC", "BR", "STAGES", "ACC", "num_warps")
            if k in kw) + (f"  (fallback: {common.RESIDENT_FALLBACKS[key][:200]})" if key in common.RESIDENT_FALLBACKS else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    tol = tolerance(DTYPE)
    print(f"\nhc_pre, bf16, n={N}, T={T}; GB/s over floor bytes; copy {copy:.0f} GB/s; "
          f"max error vs fp64 (tolerance {tol:g}); {time.perf_counter() - t_start:.0f} s")
    print(f"{'C':>5} {'kind':<9} {'config':<36} {'ms':>8} {'GB/s':>6} {'%copy':>6} {'max err':>8}")
    for C, kind, cfg, ms, gbs, pct, err in rows:
        flag = "" if not err == err or err <= tol else "  FAIL"
        print(f"{C:>5} {kind:<9} {cfg[:36]:<36} {ms:8.3f} {gbs:6.0f} {pct:6.1f} {err:8.1e}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
