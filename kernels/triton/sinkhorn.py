"""Sinkhorn-Knopp in Triton, written once for every Triton kernel that needs it: one
normalisation step (columns, then rows, as kernels.reference.sinkhorn), its backward, the
max-shifted start, and the whole backward with the iterates recomputed on chip (sqrt
checkpointing: the state at the start of each segment of Q ~ sqrt(iters) iterations is recomputed
from M0 and each state inside the segment from that start). Tiles are [BT, NP, NP], padded
entries zero (`valid` masks them)."""
import triton
import triton.language as tl


# ====================================================================== Sinkhorn helpers
@triton.jit
def sk_step(M, EPS: tl.constexpr):
    # M: [BT, NP(dst), NP(src)]; columns (sum over dst) first, then rows (sum over src).
    M = M * (1.0 / (tl.sum(M, axis=1) + EPS))[:, None, :]
    M = M * (1.0 / (tl.sum(M, axis=2) + EPS))[:, :, None]
    return M


@triton.jit
def sk_step_bwd(Mp, G, valid, EPS: tl.constexpr):
    """Gradient w.r.t. M_{k-1} = Mp, given G = gradient w.r.t. M_k = step(Mp)."""
    cs = tl.sum(Mp, axis=1)[:, None, :] + EPS
    A = Mp / cs
    rs = tl.sum(A, axis=2)[:, :, None] + EPS
    Mk = A / rs
    dA = (G - tl.sum(G * Mk, axis=2)[:, :, None]) / rs
    dA = tl.where(valid, dA, 0.0)
    dM = (dA - tl.sum(dA * A, axis=1)[:, None, :]) / cs
    return tl.where(valid, dM, 0.0)


@triton.jit
def sk_init(L, valid):
    """M0 = exp(L - max over the valid n x n entries), 0 at padded entries; also returns the max."""
    mx = tl.max(tl.max(tl.where(valid, L, -float("inf")), axis=2), axis=1)
    M0 = tl.where(valid, tl.exp(L - mx[:, None, None]), 0.0)
    return M0, mx


@triton.jit
def sinkhorn_bwd(L, G, valid, iters, Q, EPS: tl.constexpr):
    """d loss / d logits of Sinkhorn(L) given G = d loss / d output; recomputes the iterates."""
    M0, mx = sk_init(L, valid)
    nseg = (iters + Q - 1) // Q
    for sr in range(nseg):
        start = (nseg - 1 - sr) * Q
        end = tl.minimum(start + Q, iters)
        Ms = M0
        for _j in range(start):
            Ms = sk_step(Ms, EPS)
        for kk in range(end - start):
            # back through iteration k = end - kk (1-based), which maps M_{k-1} to M_k
            M = Ms
            for _j in range(end - kk - 1 - start):
                M = sk_step(M, EPS)
            G = sk_step_bwd(M, G, valid, EPS)
    dL = G * M0
    tot = tl.sum(tl.sum(dL, axis=2), axis=1)
    ismax = valid & (L == mx[:, None, None])
    cnt = tl.sum(tl.sum(ismax.to(tl.float32), axis=2), axis=1)
    cnt = tl.maximum(cnt, 1.0)
    # the max shift: its gradient goes to the arg-max entries (split evenly on ties, as torch.amax)
    return dL - tl.where(ismax, (tot / cnt)[:, None, None], 0.0)
