"""Compiles the TileLang kernels the GPU tests and kernels.yaml use, in parallel processes, into
TileLang's disk cache, so the tests and the timed run only load them.

Usage: python dev/tilelang_precompile.py [--procs 12] [--shape N:C:T ...]
With --shape, only the kernels one site of mHC, HC and the post need at n = N, width C and T
tokens (bf16, 20 Sinkhorn iterations) are compiled: what backend auto times and runs inside a
model (dev/gpu_overhead.sh passes the overhead scenario's widths and its gate's).
One compilation takes 3-8 s (mostly nvcc) and the tests need about 70; serially that would be
most of a device session. Each worker process imports tilelang and compiles its share; a kernel
that fails to compile is printed with its error (the tests then report it too). Exit 1 if any did.
"""
import argparse
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def jobs():
    out = [("post", n, C, "bfloat16") for n in (1, 2, 3, 4, 8) for C in (264, 2560, 4096, 7168)]
    out += [("post", n, C, "float16") for n in (1, 2, 3, 4, 8) for C in (264, 4096)]
    out += [("residual", 1, C, dt) for C in (8, 264, 2560, 4096, 7168) for dt in ("bfloat16", "float16")]
    # mHC coefficient pass, one job per kernel (they take 3-8 s each): the GPU tests' shapes and
    # kernels.yaml's (n = 4, T = 16384); (n, C, dtype, iters, T, coeffs_too)
    shapes = [(n, C, "bfloat16", 20, T, False) for n in (1, 2, 3, 4, 8)
              for C, T in ((264, 1), (2560, 37), (4096, 129), (7168, 67))]
    shapes += [(4, 4096, "bfloat16", 20, 33, True), (3, 264, "float16", 20, 7, True),
               (8, 2560, "bfloat16", 1, 300, True), (2, 7168, "float16", 5, 1, True),
               (2, 4096, "float16", 20, 9, True), (4, 2560, "bfloat16", 20, 65, False)]
    shapes += [(4, C, "bfloat16", 20, 16384, False) for C in (2560, 4096, 7168)]
    mhc = []
    for n, C, dt, iters, T, coeffs in shapes:
        mhc += [("mhc_gemm", n, C, dt), ("mhc_coef", n, iters, ""), ("mhc_coef_bwd", n, C, iters),
                ("mhc_apply", n, C, dt), ("mhc_dhpre", n, C, dt), ("mhc_dx", n, C, dt, T, True)]
        if coeffs:
            mhc.append(("mhc_dx", n, C, dt, T, False))
    # HC: the same row GEMM kernels in their HC form, its per-token kernels, mHC's apply / dh_pre
    hc_shapes = [(n, C, "bfloat16", T, False) for n in (1, 2, 3, 4, 8)
                 for C, T in ((264, 1), (2560, 37), (4096, 129), (7168, 67))]
    hc_shapes += [(3, 264, "float16", 7, True), (4, 4096, "bfloat16", 33, True),
                  (2, 4096, "float16", 9, True)]
    hc_shapes += [(4, C, "bfloat16", 16384, False) for C in (2560, 4096, 7168)]
    for n, C, dt, T, coeffs in hc_shapes:
        mhc += [("hc_gemm", n, C, dt), ("hc_coef", n, 0, ""), ("hc_coef_bwd", n, C, ""),
                ("mhc_apply", n, C, dt), ("mhc_dhpre", n, C, dt), ("hc_dx", n, C, dt, T, True)]
        if coeffs:
            mhc.append(("hc_dx", n, C, dt, T, False))
    # the per-kernel tests (test_sinkhorn_coef_forward_backward, test_apply_and_dh_pre, HC's
    # test_coef_forward_backward) on their small shapes
    for n, iters in ((1, 20), (3, 7), (4, 20), (8, 1)):
        mhc += [("mhc_coef", n, iters, ""), ("mhc_coef_bwd", n, 40, iters), ("hc_coef", n, 0, ""),
                ("hc_coef_bwd", n, 40, "")]
    for n, C in ((1, 264), (4, 40), (3, 264)):
        mhc += [("mhc_apply", n, C, "bfloat16"), ("mhc_dhpre", n, C, "bfloat16")]
    # the chain boundary (tests/tilelang/test_tilelang_chain.py's GPU tests): (n, C, dtype, T)
    for n, C, dt, T in ([(n, C, dt, T) for n in (1, 4, 8)
                         for C, T, dt in ((2560, 4097, "bfloat16"), (264, 17, "float16"))]
                        + [(4, 2560, "bfloat16", 4097), (8, 1024, "bfloat16", 4097),
                           (1, 4096, "bfloat16", 4097), (3, 40, "float16", 37)]):
        mhc += [("boundary", n, C, dt, T), ("mhc_coef_bwd", n, C, 20), ("mhc_apply", n, C, dt),
                ("mhc_dhpre", n, C, dt)]
    out += list(dict.fromkeys(mhc))
    return out


def shape_jobs(n: int, C: int, T: int) -> list:
    dt = "bfloat16"
    return [("post", n, C, dt),
            ("mhc_gemm", n, C, dt), ("mhc_coef", n, 20, ""), ("mhc_coef_bwd", n, C, 20),
            ("mhc_apply", n, C, dt), ("mhc_dhpre", n, C, dt), ("mhc_dx", n, C, dt, T, True),
            ("mhc_dx", n, C, dt, T, False),
            ("hc_gemm", n, C, dt), ("hc_coef", n, 0, ""), ("hc_coef_bwd", n, C, ""),
            ("hc_dx", n, C, dt, T, True), ("hc_dx", n, C, dt, T, False),
            ("boundary", n, C, dt, T)]


def compile_one(job):
    sys.path.insert(0, str(ROOT))
    import torch
    kind, n, C, dtype = job[:4]
    t0 = time.time()
    try:
        if kind.startswith("hc_"):
            from kernels.tilelang import hc_pre
            from kernels.tilelang import mhc_pre as m
            if kind == "hc_gemm":
                m.build_gemm_norm(n, C, dtype, True)
            elif kind == "hc_coef":
                hc_pre._build_coef(n, False)
            elif kind == "hc_coef_bwd":
                hc_pre._build_coef_bwd(n, C, False)
            else:
                nblk = m._ranges(job[4] * n, n, C, "cuda")
                m.build_dx_prep(n, dtype, True, False)
                m.build_dx_dphi(n, C, dtype, nblk, job[5], True)
                if job[5]:       # a site: post's x gradient comes in through the link (acc)
                    m.build_dx_dphi(n, C, dtype, nblk, True, True, True)
        elif kind.startswith("mhc"):
            from kernels.tilelang import mhc_pre as m
            if kind == "mhc_gemm":
                m.build_gemm_norm(n, C, dtype)
            elif kind == "mhc_coef":
                m.build_coef(n, C, False)              # (n, iters)
            elif kind == "mhc_coef_bwd":
                m.build_coef_bwd(n, C, dtype, False)   # (n, C, iters)
            elif kind == "mhc_apply":
                m.build_apply(n, C, dtype, False)
            elif kind == "mhc_dhpre":
                m.build_dhpre(n, C, dtype, False)
            else:
                nblk = m._ranges(job[4], n, n * C, "cuda")
                m.build_dx_prep(n, dtype, False, False)
                m.build_dx_dphi(n, C, dtype, nblk, job[5])
                if job[5]:       # a site: post's x gradient comes in through the link (acc)
                    m.build_dx_dphi(n, C, dtype, nblk, True, False, True)
        elif kind == "boundary":
            # what kernels/tilelang/post_coeffs.py picks at T tokens on this GPU: the forward,
            # its finish (20 Sinkhorn iterations), the backward with every gradient (with and
            # without x_next's own: a chain's boundaries, a lone one's) and dphi
            from kernels.tilelang import post_coeffs as pc
            from kernels.tilelang import post_coeffs_kernels as pk
            sms = pc.sm_count(torch.device("cuda"))
            bt, cw, S = pc.fwd_sizes(C, job[4], sms)
            nt, tps, _ = pc.bwd_sizes(n, C, job[4], sms)
            fmin, bmin = pc.minb_of(n)
            pk.build_fwd(n, C, dtype, bt, cw, False, fmin)
            pk.build_finish(n, C, S, 20, False)
            for has_gx in (True, False):
                pk.build_bwd(n, C, dtype, bt, cw, has_gx, True, True, True, True, False, bmin)
            pk.build_dphi(n, C, dtype, nt, tps, False)
        elif kind == "post":
            from kernels.tilelang import post
            post._build_fwd(n, C, dtype, False)
            post._build_bwd(n, C, dtype, False)
        else:
            from kernels.tilelang import residual
            residual._build_add(C, dtype, False)
    except Exception:  # noqa: BLE001 (reported, and the tests fail on it too)
        return job, time.time() - t0, traceback.format_exc(limit=3)
    return job, time.time() - t0, None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=12)
    ap.add_argument("--shape", action="append", default=[], metavar="N:C:T",
                    help="compile one site's kernels at this shape only (repeatable)")
    args = ap.parse_args()
    todo = jobs()
    if args.shape:
        try:
            shapes = [tuple(int(v) for v in s.split(":")) for s in args.shape]
            assert all(len(s) == 3 for s in shapes)
        except (ValueError, AssertionError):
            print(f"tilelang_precompile: --shape takes N:C:T integers, got {args.shape}",
                  file=sys.stderr)
            return 2
        todo = list(dict.fromkeys(j for s in shapes for j in shape_jobs(*s)))
    t0 = time.time()
    bad = 0
    with ProcessPoolExecutor(args.procs, mp_context=get_context("spawn")) as pool:
        for fut in as_completed([pool.submit(compile_one, j) for j in todo]):
            job, secs, err = fut.result()
            print(f"{'FAILED' if err else 'ok'} {job} {secs:.1f}s", flush=True)
            if err:
                bad += 1
                print(err, flush=True)
    print(f"precompile: {len(todo)} jobs, {bad} failed, {time.time() - t0:.0f}s wall", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
