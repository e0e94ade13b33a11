"""Backend `unfused`: HC and mHC the way a plain bf16 PyTorch model writes them, one op per step
of MATH.md, the residual state never copied to fp32. The mHC paper's Table 2 counts what such a
design moves per token; `scenarios/traffic.yaml` measures this backend's DRAM bytes beside it.

The steps, each one PyTorch op (x is the bf16 state; "fp32" marks what MATH.md makes a
coefficient, and every upcast is named):
- norm: x.square() in bf16, summed with an fp32 accumulator into fp32 (mHC: per token over n*C;
  HC: per token and stream over C). Not torch.linalg.vector_norm: its backward multiplies x by an
  fp32 factor, i.e. makes an fp32 copy of the state.
- GEMM: x in bf16 times the projection (mHC phi, HC w) rounded to bf16, accumulated in fp32 inside
  the GEMM, output in bf16: a plain PyTorch GEMM has no bf16-in, fp32-out form on every device.
- upcast 1: the raw projections [T, n*n+2n] (coefficients, not state) to fp32, divided by the norm.
- gates, sigmoid / tanh, and every Sinkhorn iteration (exp, then per iteration a column sum, a
  divide, a row sum, a divide): fp32, the reference's own functions.
- F_pre: one batched GEMM of h_pre rounded to bf16 with x -> layer_input in bf16 (Table 2's
  "apply H_pre", reads nC + n, writes C).
- F_post and F_res as Table 2's three rows: h_post (bf16) times f -> [T, n, C]; h_res (bf16) times
  x -> [T, n, C]; their sum -> x_next. Three kernels, every output bf16.
- residual: x + f in the state dtype (the reference's own functions, which already stay in it).
In the backward, autograd follows the same ops: state gradients stay bf16, and the gradients of
the fp32 coefficients come back through the two casts (rounded to bf16 on the way).

Against the fp64 gate: the coefficients are held to the fp32 tolerance (1e-3), and the bf16
GEMM's two roundings (of phi or w, and of its output) alone put h_res 1.5-2x past it. So the
backend declares them as its deviation, and its reference is MATH.md's (kernels.reference) with
exactly these roundings stated: the product's operand and result rounded to bf16, and h_pre,
h_post, h_res rounded to bf16 where they multiply the state. The gate holds it to the usual
tolerances against that (tests/test_unfused.py: well inside them, and a wrong Sinkhorn, a
transposed h_res or a skipped norm still fail). The roundings are bf16's, so the backend takes a
bf16 state only; an fp16 state is skipped with the reason.
"""
from __future__ import annotations

import torch

from kernels import Ops, reference as ref

STATE_DTYPE = torch.bfloat16


def supports(n: int, C: int, dtype) -> str | None:
    if dtype != STATE_DTYPE:
        return (f"unfused takes a bf16 state (the design of the paper's Table 2; its declared "
                f"variant rounds to bf16), not {dtype}")
    return None


def _mean_square(x: torch.Tensor) -> torch.Tensor:
    """mean(x^2) over the last dim, fp32, from the state dtype's squares."""
    return x.square().sum(dim=-1, keepdim=True, dtype=torch.float32) / x.shape[-1]


# ---------------------------------------------------------------- mHC
def mhc_coeffs(x, phi, b, alpha, sinkhorn_iters: int = 20):
    T, n, C = x.shape
    v = x.reshape(T, n * C)
    r = torch.sqrt(_mean_square(v) + ref.EPS_RMS)
    m = (v @ phi.to(x.dtype)).float() / r
    h_pre = torch.sigmoid(alpha[0] * m[:, :n] + b[:n])
    h_post = 2.0 * torch.sigmoid(alpha[1] * m[:, n:2 * n] + b[n:2 * n])
    res_logit = (alpha[2] * m[:, 2 * n:] + b[2 * n:]).view(T, n, n)
    return h_pre, h_post, ref.sinkhorn(res_logit, sinkhorn_iters)


def mhc_pre(x, phi, b, alpha, sinkhorn_iters: int = 20):
    h_pre, h_post, h_res = mhc_coeffs(x, phi, b, alpha, sinkhorn_iters)
    return apply_pre(x, h_pre), h_post, h_res


# ---------------------------------------------------------------- HC
def hc_coeffs(x, w, b, s):
    T, n, C = x.shape
    scale = torch.rsqrt(_mean_square(x) + ref.EPS_RMS)            # [T, n, 1]: per stream
    proj = torch.tanh((x @ w.to(x.dtype)).float() * scale)        # [T, n(src), n+2]
    return ref.hc_gates(proj, b, s)


def hc_pre(x, w, b, s):
    h_pre, h_post, h_res = hc_coeffs(x, w, b, s)
    return apply_pre(x, h_pre), h_post, h_res


# ---------------------------------------------------------------- apply steps
def apply_pre(x, h_pre):
    return torch.bmm(h_pre.to(x.dtype).unsqueeze(1), x).squeeze(1)


def post(x, f, h_post, h_res):
    branch = h_post.to(x.dtype).unsqueeze(-1) * f.unsqueeze(1)
    mixed = torch.bmm(h_res.to(x.dtype), x)
    return mixed + branch


# ---------------------------------------------------------------- the declared variant
def _bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, kept in its own dtype (exact in fp64)."""
    return t.to(STATE_DTYPE).to(t.dtype)


def _bf16_product(x, w):
    return _bf16(x @ _bf16(w))


def _variant(method: str) -> Ops:
    coeffs_of = {"mhc": ref.mhc_coeffs, "hc": ref.hc_coeffs}[method]

    def coeffs(x, *params, **opts):
        return coeffs_of(x, *params, project=_bf16_product, **opts)

    def pre(x, *params, **opts):
        h_pre, h_post, h_res = coeffs(x, *params, **opts)
        return ref.apply_pre(x, _bf16(h_pre)), h_post, h_res

    def post_(x, f, h_post, h_res):
        return ref.post(x, f, _bf16(h_post), _bf16(h_res))

    return Ops(method, "unfused-reference", pre=pre, post=post_, coeffs=coeffs)


DEVIATION = ("bf16 GEMM for the projections (phi or w and the raw projections rounded to bf16) and "
             "h_pre, h_post, h_res rounded to bf16 where they multiply the state; docs: "
             "kernels/unfused.py")
OPS = {
    "mhc": Ops("mhc", "unfused", pre=mhc_pre, post=post, coeffs=mhc_coeffs, supports=supports,
               deviation=DEVIATION, reference=_variant("mhc")),
    "hc": Ops("hc", "unfused", pre=hc_pre, post=post, coeffs=hc_coeffs, supports=supports,
              deviation=DEVIATION, reference=_variant("hc")),
    "residual": Ops("residual", "unfused", pre=ref.residual_pre, post=ref.residual_post),
}
