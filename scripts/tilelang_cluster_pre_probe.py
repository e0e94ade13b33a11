#!/usr/bin/env python
"""Prototype: the mHC pre forward reading x once, in TileLang with thread-block clusters. Checks it
against kernels.tilelang.mhc_pre's three-kernel forward and times both (bf16, n = 4, T = 16384).

    python scripts/tilelang_cluster_pre_probe.py [--C 4096] [--S 16]     # sm_90 GPU
    python scripts/tilelang_cluster_pre_probe.py --source FILE           # nvcc, no GPU

One cluster of S CTAs per block of BT = 64 tokens; CTA r keeps columns [r*cs, (r+1)*cs) of every
stream (cs = C / S) in shared memory, so x is read from DRAM once:
  1. x slice -> shared memory; partial x @ phi (hi + lo, wgmma) and partial sum of squares;
  2. reduce-scatter of the partials through distributed shared memory: rank q owns BT / S tokens
     and receives their partials from every rank (T.copy_cluster), then cluster barrier;
  3. each owner thread (one per owned token) sums them, writes m and r (what the backward needs),
     then runs mhc_pre's per-token epilogue on that m (sinkhorn_macros: sigmoid, Sinkhorn) and
     writes h_pre, h_post, h_res; cluster barrier (its
     release / acquire orders those global writes for the cluster);
  4. every rank computes layer_input for its columns from the x slice still in shared memory.
Not in the suite: a design probe for issue 4 (see its session-8 note). Status (2026-11-24): it
compiles for sm_90a with TileLang 0.1.15 (nvcc, no GPU): TileLang warp-specialises the GEMM loop
(TMA loads of phi, wgmma on the resident x slice), 144 KB of shared memory per CTA. NOT yet run on a
GPU: the session's device time ran out. Limits of this first version: S divides 64 and C / S is a
multiple of 32; the x slice (64 x n x C/S bf16) and the buffers must fit in 227 KB (n = 4: C <= 4096
at S = 16; it also compiles for n = 4, C = 2560, S = 16 and n = 2, C = 4096, S = 8); the DSMEM copy
of the partials is padded to a multiple of the 128 threads (TileLang 0.1.15 failed to lower a
160-element copy_cluster: "[ThreadSync] ... not warp-uniform"); x is copied in whole before the
GEMM (no overlap); one CTA per SM.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(n: int, C: int, S: int, iters: int = 20, dtype: str = "bfloat16"):
    import tilelang.language as T

    from kernels.tilelang.mhc_pre import EPS_RMS, _kp, sinkhorn_macros

    BT = 64
    assert C % S == 0 and (C // S) % 32 == 0 and BT % S == 0, "C / S a multiple of 32, S | 64"
    cs = C // S
    KC = n * cs                  # this CTA's share of the GEMM's K
    BK = 64 if cs % 64 == 0 else 32
    K = n * n + 2 * n
    KP = _kp(n)
    OWN = BT // S                # tokens each rank finishes
    # partial row: K products, the sum of squares in column K, zero padding; OWN x W a multiple of
    # the 128 threads (a DSMEM copy with a partial last warp does not lower in TileLang 0.1.15)
    W = -(-(K + 1) // (128 // OWN)) * (128 // OWN) if OWN < 128 else K + 1
    nn = n * n
    NC = n * C
    Tn = T.dynamic("T")
    f32 = "float32"

    _, coefficients = sinkhorn_macros(n, iters)

    @T.prim_func
    def mhc_pre_cluster(x: T.Tensor((Tn, n, C), dtype), phi_hi: T.Tensor((NC, KP), dtype),
                        phi_lo: T.Tensor((NC, KP), dtype), b: T.Tensor((K,), f32),
                        alpha: T.Tensor((3,), f32), li: T.Tensor((Tn, C), dtype),
                        h_pre: T.Tensor((Tn, n), f32), h_post: T.Tensor((Tn, n), f32),
                        h_res: T.Tensor((Tn, n, n), f32), m: T.Tensor((Tn, K), f32),
                        r: T.Tensor((Tn,), f32)):
        with T.Kernel(T.ceildiv(Tn, BT) * S, threads=128, cluster_dims=S) as bid:
            rk = T.block_rank_in_cluster()
            t0 = (bid // S) * BT
            xs = T.alloc_shared((BT, KC), dtype)
            phs = T.alloc_shared((BK, KP), dtype)
            pls = T.alloc_shared((BK, KP), dtype)
            acc = T.alloc_fragment((BT, KP), f32)
            xf = T.alloc_fragment((BT, BK), f32)
            ss = T.alloc_fragment((BT,), f32)
            part = T.alloc_shared((BT, W), f32)
            parts = T.alloc_shared((S, OWN, W), f32)
            lif = T.alloc_fragment((BT, cs), f32)
            red = T.alloc_shared((OWN, W), f32)
            M = T.alloc_local((nn,), f32)
            v = T.alloc_local((2,), f32)
            for i in T.serial(n):
                T.copy(x[t0:t0 + BT, i, rk * cs:(rk + 1) * cs], xs[:, i * cs:(i + 1) * cs])
            T.clear(acc)
            T.clear(ss)
            for kk in T.Pipelined(KC // BK, num_stages=2):
                # K chunk kk of this CTA: stream kk // (cs / BK), its columns from rk * cs
                T.copy(phi_hi[(kk // (cs // BK)) * C + rk * cs + (kk % (cs // BK)) * BK, 0], phs)
                T.copy(phi_lo[(kk // (cs // BK)) * C + rk * cs + (kk % (cs // BK)) * BK, 0], pls)
                T.gemm(xs[:, kk * BK:(kk + 1) * BK], phs, acc)
                T.gemm(xs[:, kk * BK:(kk + 1) * BK], pls, acc)
                T.copy(xs[:, kk * BK:(kk + 1) * BK], xf)
                for i, j in T.Parallel(BT, BK):
                    xf[i, j] = xf[i, j] * xf[i, j]
                T.reduce_sum(xf, ss, dim=1, clear=False)
            T.clear(part)
            T.copy(acc, part[:, 0:KP])
            for i in T.Parallel(BT):
                part[i, K] = ss[i]
            T.cluster_sync()             # every rank's parts buffer is free, part is complete
            for q in T.serial(S):
                T.copy_cluster(part[q * OWN:(q + 1) * OWN, :], parts[rk, :, :], dst_block=q)
            T.cluster_sync()
            for j, k in T.Parallel(OWN, W):
                red[j, k] = 0.0
                for s in T.serial(S):
                    red[j, k] += parts[s, j, k]
            tx = T.get_thread_binding(0)
            if tx < 32:                  # noqa: SIM102 (warp-uniform outer branch: ThreadSync needs it)
                if tx < OWN:
                    t = t0 + rk * OWN + tx
                    if t < Tn:
                        v[0] = T.sqrt(red[tx, K] / NC + EPS_RMS)
                        r[t] = v[0]
                        for k in T.unroll(K):
                            m[t, k] = red[tx, k] / v[0]
                        coefficients(t, m, b, alpha, h_pre, h_post, h_res, M, v)
            T.cluster_sync()             # h_pre of the whole block is written
            T.clear(lif)
            for i in T.serial(n):
                for tt, c in T.Parallel(BT, cs):
                    if t0 + tt < Tn:
                        lif[tt, c] += h_pre[t0 + tt, i] * T.cast(xs[tt, i * cs + c], f32)
            T.copy(lif, li[t0:t0 + BT, rk * cs:(rk + 1) * cs])

    return mhc_pre_cluster


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--C", type=int, default=4096)
    p.add_argument("--S", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--source", metavar="FILE")
    a = p.parse_args(argv)
    import tilelang
    f = build(a.n, a.C, a.S)
    if a.source:
        k = tilelang.compile(f, target={"kind": "cuda", "arch": "sm_90a"})
        with open(a.source, "w") as fh:
            fh.write(k.get_kernel_source())
        print(f"compiled for sm_90a: {a.source}")
        return 0
    import torch

    from kernels.hilo import split_weight_hi_lo
    from kernels.tilelang import mhc_pre as TL
    from suite.timing import Timer
    from suite.tolerance import rel_err
    k = tilelang.compile(f, target="auto")
    n, C, T_ = a.n, a.C, a.tokens
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T_, n, C, device=dev, dtype=torch.bfloat16, generator=g)
    K = n * n + 2 * n
    phi = torch.randn(n * C, K, device=dev, generator=g) * (n * C) ** -0.5
    b = torch.randn(K, device=dev, generator=g) * 0.1
    alpha = torch.tensor([0.8, 1.1, 0.9], device=dev)
    hi, lo = split_weight_hi_lo(phi, x.dtype, TL._kp(n))
    f32 = torch.float32
    out = {"li": torch.empty(T_, C, device=dev, dtype=x.dtype),
           "h_pre": torch.empty(T_, n, device=dev, dtype=f32),
           "h_post": torch.empty(T_, n, device=dev, dtype=f32),
           "h_res": torch.empty(T_, n, n, device=dev, dtype=f32),
           "m": torch.empty(T_, K, device=dev, dtype=f32),
           "r": torch.empty(T_, device=dev, dtype=f32)}

    def cluster():
        k(x, hi, lo, b, alpha, *out.values())

    def three():
        return TL._forward(x, phi, b, alpha, 20, True)

    cluster()
    li, h_pre, h_post, h_res, m, r = three()
    errs = {name: rel_err(out[name], want) for name, want in
            (("li", li), ("h_pre", h_pre), ("h_post", h_post), ("h_res", h_res), ("m", m), ("r", r))}
    print("against the three-kernel forward:", {k_: f"{e:.1e}" for k_, e in errs.items()})
    timer = Timer("cuda")
    tc = timer.time(cluster, 25, 200).median
    t3 = timer.time(three, 25, 200).median
    print(f"n={n} C={C} T={T_} S={a.S}: cluster {tc * 1e3:.1f} us, three kernels {t3 * 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
