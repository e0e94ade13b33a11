"""Checks and times the TileLang dx / dphi kernel (kernels/tilelang/mhc_pre.py) and the whole mHC and HC
sites with backend tilelang, on a CUDA GPU.

Usage: python dev/tune_tilelang_bwd.py [--C 2560,4096,7168] [--variants "name:cfg;..."]
           [--all-variants-at 4096] [--site-modes before,tile,after] [--triton 4096]
           [--procs 15] [--no-warm] [--no-tests-warm] [--warm-all-tests] [--budget 210]

0. Compiles every kernel needed below (and by tests/tilelang/test_tilelang_site.py; with
   --warm-all-tests every shape of dev/tilelang_precompile.py too) in parallel processes into
   TileLang's disk cache (a compile takes 5-15 s; serially they would take most of a device
   session). Each warp-specialised dx kernel is also checked there on a small T (its token ranges
   are sized at launch, so that is the same kernel): one that fails is left out below instead of
   breaking this process's CUDA context.
1. Copy rate: 1 GiB device-to-device copy, bytes read + written / median time.
2. The forward GEMM + norm kernel, 1 and 2 CTAs per SM (GEMM_MINB), checked and timed.
3. For bf16, n = 4, T = 16384 and each C: the dx / dphi kernel of each variant (a DxConfig string;
   "row" is the first kernel), mHC and HC, adding into an x gradient in place (as in a linked
   site), on fresh random inputs against torch in fp64 (dx under the bf16 tolerance, dphi under
   1e-4); then its time alone (median, L2 flushed before every call: suite.measure.timing.Timer), with
   its input preparation, and GB/s over the bytes it must move: read x, the incoming x gradient
   and g_li, write dx, (3n + 1) C elements per token. Every variant at the widths in
   --all-variants-at, "row" and the default at the others.
4. The whole site (pre + post, forward + backward through autograd, suite.workloads.workload as the runner
   times it) with backend tilelang: "before" (row kernel, GEMM at 1 CTA/SM, no site link:
   autograd adds the two x gradients), "tile" (new kernels, no link), "after" (new kernels,
   linked: no add); and the Triton site at the widths in --triton (same run, same machine).
5. One profiled "after" site per method at the middle width: per-kernel device times.
Prints a short table last; writes everything to $OUT/tune_tilelang_bwd.json (or --out).
Measured on an H100 (n = 4, T = 16384, bf16; copy rate 3.0 TB/s): dx / dphi with the in-place add
at C = 2560 / 4096 / 7168, mHC: first kernel 1.72 / 2.72 / 4.92 ms, tile kernel 0.436 / 0.638 /
1.132 ms (83 / 91 / 90% of the copy rate); HC 0.402 / 0.636 / 1.105 ms. stages 3, br 128, bt 128
(1 CTA/SM each) and the cp.async pipeline were all slower (0.80-0.99 ms at mHC C = 4096). Site
fwd+bwd at C = 4096: mHC 5.03 -> 2.61 ms, HC 4.76 -> 2.52 ms (Triton, an earlier run of this
script: 2.85 / 2.91 ms). GEMM + norm at 2 CTAs/SM: 0.266 -> 0.212 ms (mHC C = 4096).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N, T, ITERS = 4, 16384, 20
VARIANTS = {                      # name -> DxConfig string ("" = the default, DX_CONFIG)
    "row": "impl=row",            # the first kernel (before this change)
    "ws": "",                     # tile, warp-specialised TMA, bt 64, br 64, 2 stages, 2 CTAs/SM
    "ws-torchprep": "prep=0",     # the default, du split and rowc by torch ops (no prep kernel)
    "ws-s3": "stages=3,minb=1",   # (slower on the H100: 0.99 ms against 0.64 at mHC C = 4096)
    "ws-br128": "br=128,minb=1",  # (0.96 ms)
    "ws-bt128": "bt=128,minb=1",  # (0.98 ms)
    "cp": "ws=0",                 # tile, cp.async software pipeline, 2 CTAs/SM (0.80 ms)
}
# (method, n, C, T, has_li) the GPU tests of tests/tilelang/test_tilelang_site.py need
TEST_SITES = [("mhc", 4, 2560, 37, True), ("mhc", 4, 2560, 37, False), ("mhc", 3, 264, 5, True),
              ("hc", 4, 2560, 37, True), ("hc", 4, 2560, 37, False), ("hc", 3, 264, 5, True),
              ("hc", 2, 264, 17, True)]
# (n, C, T, hc, has_li, acc, dtype) of test_gpu_dx_dphi there
TEST_DX = [(8, 2560, 67, False, True, False, "bfloat16"), (1, 4096, 1, False, True, True, "bfloat16"),
           (2, 7168, 33, False, False, False, "float16"), (8, 264, 9, True, True, True, "bfloat16"),
           (1, 2560, 5, True, True, True, "bfloat16"), (4, 4096, 129, True, False, True, "float16"),
           (3, 264, 7, False, True, True, "float16")]


# ------------------------------------------------------------------ compilation (worker processes)
def site_jobs(method, n, C, T_, dt="bfloat16", has_li=True, cfg=""):
    hc = method == "hc"
    jobs = [("gemm", n, C, dt, hc), ("apply", n, C, dt), ("dhpre", n, C, dt), ("post_fwd", n, C, dt),
            ("post_bwd", n, C, dt), ("dx", n, C, dt, T_, has_li, hc, True, cfg), ("prep", n, dt, hc)]
    jobs += [("hc_coef", n), ("hc_coef_bwd", n, C)] if hc else [("coef", n, ITERS),
                                                                 ("coef_bwd", n, C, ITERS)]
    return jobs


def precompile_jobs(skip_C=()):
    """dev/tilelang_precompile.py's mHC / HC jobs (the GPU tests' shapes and kernels.yaml's)
    as jobs here, but those at widths in skip_C: its dx jobs become "dx" jobs (the default
    kernel, no acc) plus the prep kernel."""
    sys.path.insert(0, str(ROOT / "dev"))
    import tilelang_precompile as pc
    out = []
    for job in pc.jobs():
        kind = job[0]
        if not kind.startswith(("mhc_", "hc_")):
            continue            # post and residual: kernels this change leaves as they were
        if kind not in ("mhc_coef", "hc_coef") and job[2] in skip_C:
            continue
        if kind in ("mhc_dx", "hc_dx"):
            _, n, C, dt, T_, li = job
            hc = kind == "hc_dx"
            out += [("dx", n, C, dt, T_, li, hc, False, ""), ("prep", n, dt, hc)]
        else:
            out.append(("pc",) + tuple(job))
    return out


def compile_job(job):
    sys.path.insert(0, str(ROOT))
    t0 = time.time()
    try:
        from kernels.tilelang import hc_pre as h
        from kernels.tilelang import gemm_kernels, mhc_pre as m
        from kernels.tilelang import post as p
        kind, *a = job
        if kind == "pc":
            sys.path.insert(0, str(ROOT / "dev"))
            import tilelang_precompile as pc
            _, _, err = pc.compile_one(tuple(a))
            return job, time.time() - t0, err
        if kind == "gemm":
            m.build_gemm_norm(*a)
        elif kind == "coef":
            m.build_coef(a[0], a[1], False)
        elif kind == "coef_bwd":
            m.build_coef_bwd(a[0], a[1], a[2], False)
        elif kind == "hc_coef":
            h._build_coef(a[0], False)
        elif kind == "hc_coef_bwd":
            h._build_coef_bwd(a[0], a[1], False)
        elif kind == "apply":
            m.build_apply(*a, False)
        elif kind == "dhpre":
            m.build_dhpre(*a, False)
        elif kind == "post_fwd":
            p._build_fwd(*a, False)
        elif kind == "post_bwd":
            p._build_bwd(*a, False)
        elif kind == "prep":
            m.build_dx_prep(*a, False)
        elif kind == "dx":
            n, C, dt, T_, has_li, hc, acc, cfg = a
            cf = gemm_kernels.parse_dx_config(cfg, m.DxConfig())
            rows, D = (T_ * n, C) if hc else (T_, n * C)
            nblk, _ = m._split(rows, n, D, "cuda", cf, hc, C)
            m.build_dx_dphi(n, C, dt, nblk, has_li, hc, acc, cf)
            if cf.impl == "tile" and cf.ws and m.tile_ok(n, C, hc, cf):
                # ranges sized at launch: the same kernel runs at a small T; check it here, so a
                # kernel that fails cannot take the measuring process's CUDA context down with it
                import torch
                errs = check_dx(n, C, getattr(torch, dt), 129, has_li, hc, acc, cf, seed=C + n)
                return job, time.time() - t0, None if errs[2] else f"check failed: {errs}"
        else:
            raise ValueError(kind)
        return job, time.time() - t0, None
    except Exception as exc:  # noqa: BLE001 (reported)
        return job, time.time() - t0, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"


def dx_inputs(n, C, dtype, T_, hc, seed, dev="cuda"):
    import torch
    g = torch.Generator(device=dev).manual_seed(seed)
    K = n + 2 if hc else n * n + 2 * n
    rows, D = (T_ * n, C) if hc else (T_, n * C)
    x = torch.randn(T_, n, C, generator=g, device=dev).to(dtype)
    g_li = torch.randn(T_, C, generator=g, device=dev).to(dtype)
    acc = torch.randn(T_, n, C, generator=g, device=dev).to(dtype)
    h_pre = torch.sigmoid(torch.randn(T_, n, generator=g, device=dev))
    phi = 0.02 * torch.randn(D, K, generator=g, device=dev)
    du = 1e-3 * torch.randn(rows, K, generator=g, device=dev)
    coef = 1e-4 * torch.randn(rows, generator=g, device=dev)
    return x, phi, du, coef, h_pre, g_li, acc


def dx_reference(x, phi, du, coef, h_pre, g_li, acc, hc):
    """(dx, dphi) in fp64: dx = du @ phi^T + coef * x + h_pre * g_li + acc, dphi = x^T @ du."""
    T_, n, C = x.shape
    rows, D = (T_ * n, C) if hc else (T_, n * C)
    x2 = x.reshape(rows, D).double()
    want_phi = x2.t() @ du.double()
    want = (du.double() @ phi.double().t() + coef.double()[:, None] * x2).view(T_, n, C)
    if g_li is not None:
        want += h_pre.double()[:, :, None] * g_li.double()[:, None, :]
    if acc is not None:
        want += acc.double()
    return want, want_phi


def check_dx(n, C, dtype, T_, has_li, hc, acc, cfg, seed=0):
    """(dx error, dphi error, ok) of mhc_pre.dx_dphi under cfg against dx_reference."""
    import torch

    from kernels.tilelang import mhc_pre as m
    from suite.core.tolerance import rel_err, tolerance
    x, phi, du, coef, h_pre, g_li, a = dx_inputs(n, C, dtype, T_, hc, seed)
    g_li = g_li if has_li else None
    a = a if acc else None
    want, want_phi = dx_reference(x, phi, du, coef, h_pre, g_li, a, hc)
    a_ptr = a.data_ptr() if acc else None
    dx, dphi = m.dx_dphi(x, phi, du, coef, h_pre, g_li, True, hc=hc, acc=a, cfg=cfg)
    torch.cuda.synchronize()
    e_dx, e_phi = rel_err(dx, want), rel_err(dphi, want_phi)
    ok = e_dx <= tolerance(dtype) and e_phi <= 1e-4 and (not acc or dx.data_ptr() == a_ptr)
    return e_dx, e_phi, ok


def warm(jobs, procs):
    jobs = list(dict.fromkeys(jobs))
    t0 = time.time()
    bad = []
    # the long dx compiles first
    jobs.sort(key=lambda j: j[0] != "dx")
    with ProcessPoolExecutor(max_workers=procs, mp_context=get_context("spawn")) as ex:
        futs = [ex.submit(compile_job, j) for j in jobs]
        for fut in as_completed(futs):
            job, _, err = fut.result()
            if err:
                bad.append((job, err))
                print(f"compile FAILED {job}: {err.strip().splitlines()[0]}", flush=True)
    print(f"compiled {len(jobs)} kernels in {time.time() - t0:.0f} s on {procs} processes, "
          f"{len(bad)} failed", flush=True)
    for job, err in bad:
        print(f"--- {job}\n{err}", flush=True)
    return bad


# ------------------------------------------------------------------ measurements
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--C", default="2560,4096,7168")
    ap.add_argument("--variants", help="';'-separated name:cfg (default: the built-in list)")
    ap.add_argument("--all-variants-at", default="4096", help="widths timing every variant")
    ap.add_argument("--procs", type=int, default=0, help="compile processes (default: CPUs - 2)")
    ap.add_argument("--no-warm", action="store_true")
    ap.add_argument("--no-tests-warm", action="store_true")
    ap.add_argument("--warm-all-tests", action="store_true",
                    help="also compile the mHC / HC shapes of dev/tilelang_precompile.py "
                         "(tests/tilelang's mhc_pre / hc_pre tests on the GPU)")
    ap.add_argument("--warm-skip-C", default="", help="widths --warm-all-tests leaves out")
    ap.add_argument("--site-modes", default="before,tile,after")
    ap.add_argument("--triton", default="4096", help="widths of the Triton site timing ('' none)")
    ap.add_argument("--budget", type=float, default=210.0,
                    help="seconds after which optional parts (Triton, profile) are skipped")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "tune_tilelang_bwd.json"))
    args = ap.parse_args()
    t_start = time.time()

    import torch
    if not torch.cuda.is_available():
        print("tune_tilelang_bwd.py needs a CUDA GPU")
        return 2
    from suite.core.tolerance import rel_err, tolerance
    widths = [int(c) for c in args.C.split(",") if c]
    variants = dict(VARIANTS)
    if args.variants:
        variants = dict((v.split(":", 1) + [""])[:2] for v in
                        (t.strip() for t in args.variants.split(";")) if v)
    every = {int(c) for c in args.all_variants_at.split(",") if c}

    def variants_at(C):
        return variants if C in every else {k: v for k, v in variants.items()
                                            if k in ("row", "ws") or v == ""}
    tri_widths = [int(c) for c in args.triton.split(",") if c]

    if not args.no_warm:
        jobs = []
        for C in widths:
            for meth in ("mhc", "hc"):
                jobs += site_jobs(meth, N, C, T)
                for cfg in variants_at(C).values():
                    jobs.append(("dx", N, C, "bfloat16", T, True, meth == "hc", True, cfg))
                modes = args.site_modes.split(",")
                for cfg, mode in (("impl=row", "before"), ("", "tile")):   # sites without link
                    if mode in modes:
                        jobs.append(("dx", N, C, "bfloat16", T, True, meth == "hc", False, cfg))
        if not args.no_tests_warm:
            for meth, n, C, T_, li in TEST_SITES:
                jobs += site_jobs(meth, n, C, T_, has_li=li)
            for n, C, T_, hc, li, acc, dt in TEST_DX:
                jobs += [("dx", n, C, dt, T_, li, hc, acc, ""), ("prep", n, dt, hc)]
            for n, hc in ((4, False), (1, False), (8, False), (3, True), (4, True)):
                jobs.append(("prep", n, "bfloat16", hc))        # test_dx_prep_matches_torch_split
        if args.warm_all_tests:
            jobs += precompile_jobs({int(c) for c in args.warm_skip_C.split(",") if c})
        for C in widths:
            for hc in (False, True):
                jobs.append(("gemm", N, C, "bfloat16", hc, 1))   # the GEMM as before (1 CTA/SM)
        procs = args.procs or max(1, min(15, (os.cpu_count() or 4) - 1))
        bad = warm(jobs, procs)
    else:
        bad = []
    # variants whose compile or check failed in a worker: not run here
    broken = {(j[1], j[2], j[6], j[8]) for j, _ in bad if j[0] == "dx" and j[7]}

    from kernels import site_link
    from kernels.tilelang import mhc_pre as M
    from suite.measure.timing import Timer, copy_rate_gbps

    dev = "cuda"
    timer = Timer(dev)
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}", flush=True)

    def bench(fn, rep_ms=40):
        return timer.time(fn, warmup_ms=5, rep_ms=rep_ms, min_samples=10).median

    rate = copy_rate_gbps(timer)["gbps"]
    print(f"copy rate (1 GiB d2d, read+write): {rate:.0f} GB/s", flush=True)
    results = {"gpu": props.name, "copy_gbps": rate, "dx": [], "site": [], "profile": {},
               "failures": [f"compile/check {j}: {e.strip().splitlines()[0]}" for j, e in bad]}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out_path.write_text(json.dumps(results, indent=1))

    bf = torch.bfloat16

    # ---- 2. the dx / dphi kernel alone
    def time_dx(C, names):
        for meth in ("mhc", "hc"):
            hc = meth == "hc"
            ins = dx_inputs(N, C, bf, T, hc, seed=C + hc)
            x, phi, du, coef, h_pre, g_li, acc0 = ins
            want, want_phi = dx_reference(*ins, hc)
            nbytes = (3 * N + 1) * C * 2 * T
            for name in names:
                cfg = variants[name]
                label = f"{meth} C={C} {name}"
                if (N, C, hc, cfg) in broken:
                    print(f"dx {label}: skipped (failed in the compile worker)", flush=True)
                    continue
                try:
                    acc = acc0.clone()
                    ptr = acc.data_ptr()
                    dx, dphi = M.dx_dphi(x, phi, du, coef, h_pre, g_li, True, hc=hc, acc=acc, cfg=cfg)
                    torch.cuda.synchronize()
                    e_dx, e_phi = rel_err(dx, want), rel_err(dphi, want_phi)
                    ok = e_dx <= tolerance(bf) and e_phi <= 1e-4 and dx.data_ptr() == ptr
                    if not ok:
                        results["failures"].append(f"dx {label}: err dx {e_dx:.2e}, dphi {e_phi:.2e}")
                    kern, kargs, _, _ = M.dx_dphi_launch(x, phi, du, coef, h_pre, g_li, hc, acc, cfg)
                    ms = bench(functools.partial(kern, *kargs))
                    ms_all = bench(functools.partial(M.dx_dphi, x, phi, du, coef, h_pre, g_li, True,
                                                     hc=hc, acc=acc, cfg=cfg))
                    row = {"method": meth, "C": C, "variant": name, "cfg": cfg, "ms": ms,
                           "ms_with_prep": ms_all, "gbps": nbytes / ms / 1e6,
                           "pct_copy": 100 * nbytes / ms / 1e6 / rate, "err_dx": e_dx,
                           "err_dphi": e_phi, "ok": ok}
                    print(f"dx {label:<28} {ms:7.3f} ms ({ms_all:7.3f} with prep) "
                          f"{row['gbps']:6.0f} GB/s err dx {e_dx:.1e} dphi {e_phi:.1e}"
                          f"{'' if ok else '  FAIL'}", flush=True)
                    results["dx"].append(row)
                    del acc, dx, dphi, kargs
                except Exception as exc:  # noqa: BLE001 (reported)
                    results["failures"].append(f"dx {label}: {type(exc).__name__}: {exc}")
                    print(f"dx {label}: FAILED {type(exc).__name__}: {exc}", flush=True)
            del ins, x, phi, du, coef, h_pre, g_li, acc0, want, want_phi
            torch.cuda.empty_cache()
        save()

    # the GEMM + norm kernel (forward), 1 vs 2 CTAs per SM
    for C in widths:
        for hc in (False, True):
            ins = dx_inputs(N, C, bf, T, hc, seed=C + 7)
            x, phi = ins[0], ins[1]
            rows, D = (T * N, C) if hc else (T, N * C)
            xr = x.reshape(rows, D).double()
            pu = M.phi_as_used(phi, bf).double()
            want = (xr @ pu) / torch.sqrt(xr.pow(2).mean(1, keepdim=True) + 1e-6)
            del xr, pu
            for minb in (1, 2):
                os.environ["HCBENCH_TL_GEMM_MINB"] = str(minb)
                label = f"gemm {'hc' if hc else 'mhc'} C={C} minb={minb}"
                try:
                    mm, _ = M.gemm_norm(x, phi, hc)
                    err = rel_err(mm, want)
                    ms = bench(functools.partial(M.gemm_norm, x, phi, hc))
                    gbps = rows * D * 2 / ms / 1e6
                    ok = err <= 1e-4
                    if not ok:
                        results["failures"].append(f"{label}: err {err:.2e}")
                    results.setdefault("gemm", []).append(
                        {"method": "hc" if hc else "mhc", "C": C, "minb": minb, "ms": ms,
                         "gbps": gbps, "err": err})
                    print(f"{label:<28} {ms:7.3f} ms {gbps:6.0f} GB/s err {err:.1e}"
                          f"{'' if ok else '  FAIL'}", flush=True)
                except Exception as exc:  # noqa: BLE001
                    results["failures"].append(f"{label}: {type(exc).__name__}: {exc}")
                    print(f"{label}: FAILED {type(exc).__name__}: {exc}", flush=True)
                finally:
                    os.environ.pop("HCBENCH_TL_GEMM_MINB", None)
            del ins, x, phi, want
    torch.cuda.empty_cache()
    save()

    first = [k for k in variants if k in ("ws", "row")]
    for C in widths:
        time_dx(C, first)
    if any(k[3] == "" for k in broken):
        os.environ["HCBENCH_TL_DX"] = "impl=row"
        print("the default dx kernel failed its check: the sites run the row kernel", flush=True)

    # ---- 3. whole sites
    import kernels
    from suite.workloads import workload
    from suite.core.scenario import Case

    real_claim = site_link.claim
    old_env = os.environ.get("HCBENCH_TL_DX")

    def site_time(meth, C, backend, mode):
        case = Case(method=meth, C=C, T=T, n=N, dtype="bf16", mode="fwd+bwd", backend=backend,
                    device=dev, sinkhorn_iters=ITERS if meth == "mhc" else None)
        ops = kernels.get(meth, backend)
        inputs = workload.make_inputs(case, dev, seed=C + 1)
        try:
            if mode in ("before", "tile"):
                site_link.claim = lambda h_res, x: None
            if mode == "before":
                os.environ["HCBENCH_TL_DX"] = "impl=row"
                os.environ["HCBENCH_TL_GEMM_MINB"] = "1"
            return bench(lambda: workload.run(ops, case, inputs), rep_ms=80)
        finally:
            site_link.claim = real_claim
            os.environ.pop("HCBENCH_TL_GEMM_MINB", None)
            if old_env is None:
                os.environ.pop("HCBENCH_TL_DX", None)
            else:
                os.environ["HCBENCH_TL_DX"] = old_env

    for C in widths:
        for meth in ("mhc", "hc"):
            for mode in args.site_modes.split(","):
                try:
                    ms = site_time(meth, C, "tilelang", mode)
                    results["site"].append({"method": meth, "C": C, "backend": "tilelang",
                                            "mode": mode, "ms": ms})
                    print(f"site {meth} C={C} tilelang {mode:<6} {ms:7.3f} ms", flush=True)
                except Exception as exc:  # noqa: BLE001
                    results["failures"].append(f"site {meth} C={C} {mode}: {type(exc).__name__}: {exc}")
                    print(f"site {meth} C={C} {mode}: FAILED {type(exc).__name__}: {exc}", flush=True)
            torch.cuda.empty_cache()

    save()
    rest = [k for k in variants if k not in first and variants[k] != "ws=0"] + \
        [k for k in variants if k not in first and variants[k] == "ws=0"]     # cp.async last
    for C in widths:
        if C in every and rest:
            time_dx(C, rest)

    for C in tri_widths:
        for meth in ("mhc", "hc"):
            if time.time() - t_start > args.budget:
                print(f"skipping triton {meth} C={C}: past the budget", flush=True)
                continue
            try:
                ms = site_time(meth, C, "triton", "after")
                results["site"].append({"method": meth, "C": C, "backend": "triton", "mode": "as is",
                                        "ms": ms})
                print(f"site {meth} C={C} triton {ms:7.3f} ms", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"site {meth} C={C} triton: FAILED {type(exc).__name__}: {exc}", flush=True)

    # ---- 4. per-kernel profile of the linked site
    Cp = widths[len(widths) // 2]
    for meth in ("mhc", "hc"):
        if time.time() - t_start > args.budget + 30:
            break
        try:
            from torch.profiler import ProfilerActivity, profile
            case = Case(method=meth, C=Cp, T=T, n=N, dtype="bf16", mode="fwd+bwd",
                        backend="tilelang", device=dev, sinkhorn_iters=ITERS if meth == "mhc" else None)
            ops = kernels.get(meth, "tilelang")
            inputs = workload.make_inputs(case, dev, seed=7)
            workload.run(ops, case, inputs)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                workload.run(ops, case, inputs)
                torch.cuda.synchronize()
            ks = []
            for ev in prof.key_averages():
                us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                if us and ev.count:
                    ks.append((ev.key[:70], us, ev.count))
            ks.sort(key=lambda k: -k[1])
            results["profile"][f"{meth} C={Cp}"] = ks
            print(f"\nprofile: {meth} site C={Cp} fwd+bwd (linked), per kernel (us, calls; L2 not "
                  f"flushed):")
            for k, us, cnt in ks[:14]:
                print(f"  {us:9.1f} {cnt:3d}  {k}")
            print(f"  {sum(k[1] for k in ks):9.1f}      total")
        except Exception as exc:  # noqa: BLE001
            print(f"profile {meth}: FAILED {type(exc).__name__}: {exc}", flush=True)

    save()
    print(f"\nelapsed {time.time() - t_start:.0f} s; results in {args.out}")
    for msg in results["failures"]:
        print("FAIL", msg)
    print(f"\ndx / dphi kernel, bf16 n={N} T={T}, acc (in-place add); copy {rate:.0f} GB/s; "
          f"bytes (3n+1)C per token")
    print(f"{'method':<6} {'C':>5} {'variant':<10} {'ms':>7} {'+prep':>7} {'GB/s':>6} {'%copy':>6} "
          f"{'err dx':>8} {'err dphi':>8}")
    for r in results["dx"]:
        print(f"{r['method']:<6} {r['C']:>5} {r['variant']:<10} {r['ms']:7.3f} {r['ms_with_prep']:7.3f} "
              f"{r['gbps']:6.0f} {r['pct_copy']:6.1f} {r['err_dx']:8.1e} {r['err_dphi']:8.1e}")
    print(f"\nsite fwd+bwd, bf16 n={N} T={T} (before: row kernel + autograd add; tile: new kernel + "
          f"add; after: new kernel, linked)")
    for r in results["site"]:
        print(f"{r['method']:<6} {r['C']:>5} {r['backend']:<9} {r['mode']:<7} {r['ms']:7.3f} ms")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
