"""Checks and times kernels/triton/post.py (F_post,res) and residual.py on a CUDA GPU.

Usage: python dev/tune_post.py [--configs "block_c=1024;block_c=512,vec=4;..."] [--C 2560,4096,7168] [--n 4]
       TRITON_INTERPRET=1 python dev/tune_post.py --smoke   (no GPU: tiny shapes on the CPU, to
       test the script itself; its timings mean nothing)

1. Copy rate: 1 GiB device-to-device copy, bytes read + written / median time (the ceiling).
2. For bf16, n = 4 (--n), T = 16384 and each C: post and residual_post against the reference (fp32 on
   the GPU), forward output and every gradient, for every configuration timed.
3. Times, per configuration (one "key=value,..." string given to post(fwd=..., bwd=...); keys
   block_c and num_warps apply to both kernels, vec / num_stages / split to the backward, bt /
   loop / persistent to the forward, num_stages to the forward too with loop=1; "FWD|BWD" gives
   the kernels different strings, so "loop=1,...|" times the loop forward next to the default
   backward): forward, and forward + backward through autograd. Medians through suite.measure.timing,
   the runner's timer (L2 flushed before every call).
Floors: forward (2n+1)C elements per token; forward + backward (5n+3)C (MATH.md, ANCHORS.md).
The table comes last. Aims to finish within about 60 s (most of it compiling).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

from kernels import reference  # noqa: E402
from suite.measure.timing import Timer, copy_rate_gbps  # noqa: E402
from suite.core.tolerance import rel_err, tolerance  # noqa: E402

P = importlib.import_module("kernels.triton.post")   # the package re-exports the function `post`
from kernels.triton.residual import residual_post  # noqa: E402

# "" is the default heuristic of post.py. block_c sets num_warps = block_c / (32 * vec) unless given.
CONFIGS = [
    "",
    "bt=2",                         # forward: 2 tokens per program, 2 warps (block_c 256)
    "bt=4",                         # 4 tokens, 4 warps
    "bt=8",                         # 8 tokens, 8 warps
    "bt=4,num_warps=2",             # 4 tokens on 2 warps: more bytes in flight per thread
    "block_c=512,bt=2",             # 4 warps
    "block_c=512,bt=4",             # 8 warps
    "block_c=512",                  # earlier runner-up (2 warps)
    # Forward loop=1 (not yet timed on a GPU): one program per token looping over C, h_post and
    # h_res read once per token. num_stages >= 2 pipelines the chunks through shared memory
    # (cp.async), 1 uses plain 16-byte loads. "|": the backward keeps its defaults.
    "loop=1|",                      # defaults: block_c 512 (C = 2560) or 1024, 3 stages
    "loop=1,block_c=512,num_stages=2|",
    "loop=1,block_c=512,num_stages=3|",
    "loop=1,block_c=512,num_stages=4|",
    "loop=1,block_c=1024,num_stages=1|",
    "loop=1,block_c=1024,num_stages=2|",
    "loop=1,block_c=1024,num_stages=3|",
    "loop=1,block_c=1024,num_stages=4|",
    "loop=1,block_c=2048,num_stages=1|",    # 8 warps
    "loop=1,block_c=2048,num_stages=2|",
    "loop=1,block_c=2048,num_stages=3|",
    "loop=1,block_c=2048,num_stages=4|",
    "loop=1,block_c=1024,persistent=4|",    # grid 4 programs per SM striding over the tokens
    "loop=1,block_c=1024,persistent=8|",
]
N, T, DTYPE = 4, 16384, torch.bfloat16
DEVICE = "cuda"
SMOKE = False


def bench(fn) -> float:
    """Median ms through the suite's one timer (L2 flushed before each call on a GPU)."""
    return Timer(DEVICE).time(fn, warmup_ms=5, rep_ms=30, min_samples=3 if SMOKE else 30).median


def copy_rate() -> float:
    return copy_rate_gbps(Timer(DEVICE), nbytes=2 ** 20 if SMOKE else None)["gbps"]


def make_inputs(C: int):
    g = torch.Generator(device=DEVICE).manual_seed(C)
    x = torch.randn(T, N, C, generator=g, device=DEVICE).to(DTYPE)
    f = torch.randn(T, C, generator=g, device=DEVICE).to(DTYPE)
    h_post = 2 * torch.sigmoid(torch.randn(T, N, generator=g, device=DEVICE))
    h_res = reference.sinkhorn(torch.randn(T, N, N, generator=g, device=DEVICE))
    grad = torch.randn(T, N, C, generator=g, device=DEVICE).to(DTYPE)
    return x, f, h_post, h_res, grad


def reference_post(x, f, h_post, h_res, grad):
    ins = [t.detach().float().requires_grad_() for t in (x, f, h_post, h_res)]
    out = reference.post(*ins)                      # fp32 (inputs upcast), not rounded to bf16
    return [out.detach()] + list(torch.autograd.grad(out, ins, grad.float()))


def split_cfg(cfg: str) -> tuple[str, str]:
    """A configuration's forward and backward strings: "FWD|BWD", or one string for both."""
    if "|" in cfg:
        fwd, _, bwd = cfg.partition("|")
        return fwd, bwd
    return cfg, cfg


def check_post(ins, ref, cfg) -> float:
    fwd, bwd = split_cfg(cfg)
    leaves = [t.detach().clone().requires_grad_() for t in ins[:4]]
    out = P.post(*leaves, fwd=fwd, bwd=bwd)
    got = [out] + list(torch.autograd.grad(out, leaves, ins[4]))
    return max(rel_err(a, b) for a, b in zip(got, ref))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", help="';'-separated config strings (default: a built-in list)")
    ap.add_argument("--C", default="2560,4096,7168", help="comma-separated widths")
    ap.add_argument("--n", type=int, default=4, choices=range(1, 9), metavar="1..8", help="streams")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    args = ap.parse_args()
    global N, T, DEVICE, SMOKE
    N = args.n
    if args.smoke:
        T, DEVICE, SMOKE = 8, "cpu", True
        args.C = "264" if args.C == ap.get_default("C") else args.C
    elif not torch.cuda.is_available():
        print("tune_post.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
        return 2
    configs = CONFIGS if args.configs is None else [c.strip() for c in args.configs.split(";")]
    widths = [int(c) for c in args.C.split(",")]
    t_start = time.time()
    if not SMOKE:
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
              f"triton {triton.__version__}")
    rate = copy_rate()
    print(f"copy rate (1 GiB d2d, read+write): {rate:.0f} GB/s")
    tol = tolerance(DTYPE)
    rows, failures = [], []

    for C in widths:
        ins = make_inputs(C)
        x, f, h_post, h_res, grad = ins
        ref = reference_post(*ins)
        # residual: x[:, :1] + f, check and time
        xr = x[:, :1].contiguous()
        rr_out = residual_post(xr, f)
        err = rel_err(rr_out, reference.residual_post(xr.float(), f.float()))
        if not err <= tol:
            failures.append(f"residual_post C={C}: rel_err {err:.2e} > {tol}")
        ms = bench(lambda: residual_post(xr, f))
        gb = 3 * T * C * x.element_size() / 1e9
        print(f"residual_post C={C}: rel_err {err:.1e}, {ms:.3f} ms, {gb / ms * 1e3:.0f} GB/s, "
              f"{100 * gb / ms * 1e3 / rate:.0f}% of copy")

        fwd_bytes = (2 * N + 1) * C * x.element_size() * T
        fb_bytes = (5 * N + 3) * C * x.element_size() * T
        leaves = [t.detach().clone().requires_grad_() for t in ins[:4]]
        for cfg in configs:
            fwd, bwd = split_cfg(cfg)
            err = check_post(ins, ref, cfg)
            if not err <= tol:
                failures.append(f"post C={C} [{cfg or 'default'}]: max rel_err {err:.2e} > {tol}")

            def fb(fwd=fwd, bwd=bwd):
                out = P.post(*leaves, fwd=fwd, bwd=bwd)
                torch.autograd.grad(out, leaves, grad)

            t_f = bench(lambda fwd=fwd, bwd=bwd: P.post(x, f, h_post, h_res, fwd=fwd, bwd=bwd))
            t_fb = bench(fb)
            fc = P.fwd_config(N, C, fwd)
            bc = P.bwd_config(T, N, C, x.device, bwd)
            floop = f"loop {fc['block_c']}/{fc['num_warps']}w/s{fc['num_stages']}" + \
                (f"/p{fc['persistent']}" if fc["persistent"] else "") if fc["loop"] else \
                f"{fc['block_c']}/{fc['num_warps']}w"
            name = (cfg or "default") + (f" [f {floop}; b {bc['block_c']}/v{bc['vec']}/"
                                         f"{bc['num_warps']}w/s{bc['num_stages']}]")
            rows.append((C, name, t_f, fwd_bytes / t_f / 1e6, 100 * fwd_bytes / t_f / 1e6 / rate, t_fb,
                         100 * (fb_bytes / rate / 1e6) / t_fb, err))
        del ins, ref, leaves, x, f, h_post, h_res, grad
        torch.cuda.empty_cache()

    print(f"elapsed {time.time() - t_start:.0f} s")
    for msg in failures:
        print("FAIL", msg)
    print(f"\npost, bf16, n={N}, T={T}; copy rate {rate:.0f} GB/s; fwd floor (2n+1)C, fwd+bwd floor (5n+3)C")
    hdr = (f"{'C':>5} {'config':<72} {'fwd ms':>7} {'fwd GB/s':>8} {'%copy':>6} {'f+b ms':>7} "
           f"{'%floor':>6} {'err':>7}")
    print(hdr)
    print("-" * len(hdr))
    for C, name, t_f, gbs, pct, t_fb, pfl, err in rows:
        print(f"{C:>5} {name:<72} {t_f:7.3f} {gbs:8.0f} {pct:6.1f} {t_fb:7.3f} {pfl:6.1f} {err:7.1e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
