#!/usr/bin/env python
"""Checks TileLang's thread-block cluster primitives on this GPU: the building blocks of an mHC / HC
pre forward that reads x once (a token block's x slices stay in the shared memory of a cluster's
CTAs while the cluster sums their partial products and runs the Sinkhorn epilogue).

    python dev/tilelang_cluster_probe.py              # on an sm_90 GPU: compile, run, check
    python dev/tilelang_cluster_probe.py --source F   # no GPU needed (nvcc): write the CUDA source

The kernel: clusters of S CTAs over [T, S*CS] bf16; CTA r of a cluster keeps x[block, r*CS:(r+1)*CS]
in shared memory, pushes its per-token partial sums into rank 0's shared memory (T.copy_cluster with
dst_block), rank 0 adds them and pushes the totals back to every rank, and each rank writes
y = x * total from the slice it still holds. Between the steps: T.cluster_sync. The answer is
checked against torch in fp32 (bf16 output: tolerance 1e-2).

Seen with TileLang 0.1.15 (H100, 2026-11-24): it compiles (cudaLaunchKernelEx with the cluster
shape, cooperative_groups map_shared_rank for the remote stores) and gives the right answer. Its
shared-memory planner gave two buffers with disjoint local lifetimes one address (here `part` and
`tot`): a buffer that other CTAs write into must not share storage with one still in use.
"""
# No `from __future__ import annotations`: TileLang evaluates the kernel's annotations, which name
# build()'s local sizes.
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(S: int = 4, BT: int = 64, CS: int = 256, dtype: str = "bfloat16"):
    import tilelang.language as T

    C = S * CS
    Tn = T.dynamic("T")
    f32 = "float32"

    @T.prim_func
    def cluster_probe(x: T.Tensor((Tn, C), dtype), y: T.Tensor((Tn, C), dtype)):
        with T.Kernel(T.ceildiv(Tn, BT) * S, threads=128, cluster_dims=S) as bid:
            r = T.block_rank_in_cluster()
            tb = bid // S
            xs = T.alloc_shared((BT, CS), dtype)
            part = T.alloc_shared((BT,), f32)
            parts = T.alloc_shared((S, BT), f32)
            tot = T.alloc_shared((BT,), f32)
            xf = T.alloc_fragment((BT, CS), f32)
            ps = T.alloc_fragment((BT,), f32)
            T.copy(x[tb * BT, r * CS], xs)
            T.copy(xs, xf)
            T.reduce_sum(xf, ps, dim=1)
            T.copy(ps, part)
            T.cluster_sync()
            T.copy_cluster(part, parts[r, 0], dst_block=0)
            T.cluster_sync()
            if r == 0:
                for t in T.Parallel(BT):
                    acc = T.alloc_var(f32)
                    acc = 0.0
                    for s in T.serial(S):
                        acc += parts[s, t]
                    tot[t] = acc
                for s in T.serial(S):
                    T.copy_cluster(tot, tot, dst_block=s)
            T.cluster_sync()
            for t, c in T.Parallel(BT, CS):
                xf[t, c] = T.cast(xs[t, c], f32) * tot[t]
            T.copy(xf, y[tb * BT, r * CS])

    return cluster_probe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", metavar="FILE",
                   help="compile for sm_90a without a GPU and write the CUDA source here")
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args(argv)
    try:
        import tilelang
    except Exception as exc:  # noqa: BLE001
        print(f"cluster probe: tilelang does not import ({type(exc).__name__}: {exc})")
        return 2
    S, CS = 4, 256
    if args.source:
        k = tilelang.compile(build(S, CS=CS), target={"kind": "cuda", "arch": "sm_90a"})
        with open(args.source, "w") as f:
            f.write(k.get_kernel_source())
        print(f"cluster probe: compiled for sm_90a, CUDA source in {args.source}")
        return 0
    import torch
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        print("cluster probe: needs an sm_90 or newer GPU (thread-block clusters); use --source")
        return 2
    k = tilelang.compile(build(S, CS=CS), target="auto")
    x = torch.randn(args.tokens, S * CS, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    k(x, y)
    want = x.float() * x.float().sum(1, keepdim=True)
    err = ((y.float() - want).abs().max() / want.abs().max()).item()
    ok = err <= 1e-2
    print(f"cluster probe on {torch.cuda.get_device_name()}: clusters of {S}, T = {args.tokens}, "
          f"rel err {err:.2e} (bf16 tolerance 1e-2): {'ok' if ok else 'WRONG'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
