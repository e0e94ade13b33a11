"""Backend `liger`: Liger-Kernel 0.8.5's Triton mHC (a peer, wrapped for comparison; mhc only).

Liger's functional API (liger_kernel.transformers.functional, autograd Functions in
liger_kernel/ops/mhc.py) splits mHC the same way this suite does, so each of our ops maps to one
of its calls; nothing is composed:
    liger_mhc_coeffs(x, phi, b, alpha_pre, alpha_post, alpha_res, *, allow_fp32, tmax, rms_eps,
                     pre_eps, sinkhorn_eps, post_mult)      -> (h_pre, h_post, h_res)   -> our coeffs
    liger_mhc_pre(x, h_pre)                                 -> layer_input              -> our pre
    liger_mhc_post_res(x, f_out, h_post, h_res)             -> x_next                   -> our post
(x is [..., n, C]; there is also LigerMHC, an nn.Module around a layer, not used here.)

Conventions, translated or checked:
- phi [n*C, n*n+2n] with columns [pre(n) | post(n) | res(n*n) row-major (dst, src)], b likewise:
  the same layout as ours, passed as is. Our phi is fp32: Liger then takes its fp32 path (x cast
  to fp32, tl.dot on fp32 operands, i.e. tf32 on tensor cores), which is what MATH.md asks for.
  Liger's own module defaults phi to fp16/bf16 (the peer's published setting, "phi in bf16/fp16"); this wrapper
  does not do that.
- alpha [3] = (a_pre, a_post, a_res) is passed as three 0-d views, so gradients reach alpha.
- h_res is [token, dst, src] in both; x_next[o] = sum_i h_res[o, i] x[i] + h_post[o] f.
- r = sqrt(mean over n*C of x^2 + eps_rms), eps_rms = 1e-6; m = (x @ phi) / r: same.
- h_pre = sigmoid(...) (pre_eps = 0), h_post = 2 * sigmoid(...) (post_mult = 2): same.
- tmax = sinkhorn_iters (20), sinkhorn_eps = 1e-6.

Differences from MATH.md that cannot be configured (not hidden; the correctness gate measures them):
1. Sinkhorn order. MATH.md: M = exp(L - max L), then t_max times (columns, then rows); the last
   step normalises rows, so rows sum to 1. Liger: a row softmax (rows divided by their sums, no
   eps), then eps_sk added to every entry, then a column normalisation, then t_max - 1 times
   (rows, then columns); the last step normalises columns, so its columns sum to 1 and its rows
   only approximately. Both converge to the same doubly stochastic matrix; after 20 iterations
   they differ by the residual of the iteration, which is small unless entries are very unequal.
   Measured per token on logits ~ N(0, 1), 10^5 tokens, fp64: relative gap median 8e-7 / 99th
   percentile 3e-4 / max 1.3e-2 for n = 2; 3e-6 / 7e-6 / 1.4e-3 for n = 4; 6e-6 / 8e-6 / 1.7e-4
   for n = 8. With the suite's random_params (T = 4096, C = 64, 50 seeds) the whole-tensor h_res
   rel_err has median / max 1.7e-4 / 1.9e-3 (n = 2), 3.6e-5 / 6.7e-4 (n = 4), 6e-6 / 9e-5
   (n = 8): inside the bf16 tolerance (1e-2), close to the fp16 one (3e-3) at n = 2. Unequal
   logits such as [[3, -3], [0, 0]] give 2.5e-3 (tests/test_liger.py pins the convention).
2. n must be a power of two (its kernels use tl.arange(0, n)): n = 3 fails inside Liger;
   `supports` reports it so those cases are skipped, not failed.
3. Liger keeps the Sinkhorn history [T, t_max, n, n] fp32 from the forward for its backward
   (memory, not math; the paper recomputes it), and accumulates grad phi with fp32 atomics
   (order-dependent rounding).
Everything else (pre and post apply steps, gates, norm) agrees with the reference to rounding.
"""
from __future__ import annotations

import torch

from kernels import Ops, checks, reference
from kernels.reference import EPS_RMS, EPS_SK

from liger_kernel.transformers.functional import (liger_mhc_coeffs, liger_mhc_post_res,  # noqa: E402
                                                  liger_mhc_pre)

POST_MULT = 2.0
STATE_DTYPES = (torch.bfloat16, torch.float16)


def supports(n: int, C: int, dtype) -> str | None:
    if dtype not in STATE_DTYPES:
        return f"liger mHC takes bf16 or fp16 state (allow_fp32 is not used), not {dtype}"
    if n < 1 or n & (n - 1):
        return f"liger mHC needs n a power of two (tl.arange(0, n) in its kernels), not {n}"
    return None


def _check_params(x, phi, b, alpha, sinkhorn_iters):
    return checks.check_mhc_inputs("liger mhc", x, phi, b, alpha, sinkhorn_iters, supports)


def mhc_coeffs(x, phi, b, alpha, sinkhorn_iters: int = 20):
    """(h_pre [T,n], h_post [T,n], h_res [T,n,n] [dst, src]), all fp32, from Liger's fused kernels."""
    _check_params(x, phi, b, alpha, sinkhorn_iters)
    return liger_mhc_coeffs(x, phi, b, alpha[0], alpha[1], alpha[2], allow_fp32=False,
                            tmax=int(sinkhorn_iters), rms_eps=EPS_RMS, pre_eps=0.0,
                            sinkhorn_eps=EPS_SK, post_mult=POST_MULT)


def mhc_pre(x, phi, b, alpha, sinkhorn_iters: int = 20):
    """(layer_input [T,C] in x's dtype, h_post, h_res)."""
    h_pre, h_post, h_res = mhc_coeffs(x, phi, b, alpha, sinkhorn_iters)
    return liger_mhc_pre(x, h_pre), h_post, h_res


def mhc_post(x, f, h_post, h_res):
    """x_next [T,n,C] = h_res @ x + h_post * f, Liger's fused post-res kernel."""
    T, n, C = checks.check_post_inputs("liger post", x, f, h_post, h_res, supports)
    return liger_mhc_post_res(x, f, h_post, h_res)


def liger_sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = EPS_SK) -> torch.Tensor:
    """Liger's Sinkhorn order in plain PyTorch (exact in fp64), [..., dst, src]: a row softmax,
    + eps on every entry, a column normalisation, then iters - 1 times (rows, then columns)."""
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def _variant(fn):
    return lambda *args, **kw: fn(*args, sinkhorn_fn=liger_sinkhorn, **kw)


DEVIATION = "Liger's Sinkhorn order (row softmax first, columns last; docs: kernels/liger.py)"
LIGER_REFERENCE = Ops("mhc", "liger-reference", pre=_variant(reference.mhc_pre),
                      post=reference.post, coeffs=_variant(reference.mhc_coeffs))
OPS = {"mhc": Ops("mhc", "liger", pre=mhc_pre, post=mhc_post, coeffs=mhc_coeffs, supports=supports,
                  deviation=DEVIATION, reference=LIGER_REFERENCE)}
