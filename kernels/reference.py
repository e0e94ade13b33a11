"""The MATH.md functions in plain PyTorch: the oracle every backend is checked against.

Every function computes in float32 for bf16/fp16/fp32 inputs and in float64 when its inputs are
float64, so calling it on upcast inputs gives the exact fp64 reference. State outputs (layer_input,
x_next) come back in x's dtype; coefficients come back in the compute dtype (fp32, or fp64).

Conventions (MATH.md): x is [T, n, C]; f is [T, C]; h_res is indexed [token, dst, src].
Parameters per method:
  mhc:      phi [n*C, n*n+2n] fp32 (RMSNorm weight folded in), b [n*n+2n] fp32, alpha [3] fp32
  hc:       w [C, n+2] fp32 = [w_pre | w_post | W_res] (RMSNorm weight folded in),
            b [n*n+2n] fp32 = [b_pre | b_post | b_res (dst, src) flattened], s [2] fp32 = (s_a, s_b)
  residual: none (x is [T, 1, C])
"""
from __future__ import annotations

import torch

EPS_RMS = 1e-6
EPS_SK = 1e-6


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def n_coeffs(n: int) -> int:
    """Coefficients per token: n pre gates, n post gates, n*n mixing logits."""
    return n * n + 2 * n


# ---------------------------------------------------------------- Sinkhorn-Knopp (Eq. 19)
def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = EPS_SK) -> torch.Tensor:
    """[..., n, n] logits -> doubly stochastic [..., dst, src]; columns first, rows last."""
    # One max per matrix: the first column normalisation cancels it exactly.
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
    return m


# ---------------------------------------------------------------- mHC (Eqs. 14-19)
def mhc_coeffs(x, phi, b, alpha, sinkhorn_iters: int = 20, sinkhorn_fn=None, project=None,
               eps_rms=EPS_RMS):
    """sinkhorn_fn replaces Eq. 19's iteration, project(v, phi) Eq. 14's product v @ phi and
    eps_rms the norm's eps, only to state a backend's declared variant (Ops.deviation)."""
    T, n, C = x.shape
    cd = compute_dtype(x)
    v = x.reshape(T, n * C).to(cd)
    r = torch.sqrt(v.pow(2).mean(dim=-1, keepdim=True) + eps_rms)
    m = (project or torch.matmul)(v, phi.to(cd)) / r
    b = b.to(cd)
    alpha = alpha.to(cd)
    h_pre = torch.sigmoid(alpha[0] * m[:, :n] + b[:n])
    h_post = 2.0 * torch.sigmoid(alpha[1] * m[:, n:2 * n] + b[n:2 * n])
    res_logit = (alpha[2] * m[:, 2 * n:] + b[2 * n:]).view(T, n, n)
    return h_pre, h_post, (sinkhorn_fn or sinkhorn)(res_logit, sinkhorn_iters)


def mhc_pre(x, phi, b, alpha, sinkhorn_iters: int = 20, sinkhorn_fn=None):
    h_pre, h_post, h_res = mhc_coeffs(x, phi, b, alpha, sinkhorn_iters, sinkhorn_fn)
    return apply_pre(x, h_pre), h_post, h_res


def mhc_post_coeffs(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters: int = 20):
    """F_post,res of one site, then the next site's coefficients (phi, b, alpha are the NEXT
    site's): (x_next [T,n,C] in x's dtype, h_pre, h_post, h_res of the next site). The
    coefficients are computed from x_next as stored, so a fused kernel that rounds x_next to x's
    dtype before its GEMM computes exactly this."""
    x_next = post(x, f, h_post, h_res)
    return (x_next, *mhc_coeffs(x_next, phi, b, alpha, sinkhorn_iters))


# ---------------------------------------------------------------- HC (HC paper Eqs. 10-14)
def hc_coeffs(x, w, b, s, project=None):
    """project(x, w) replaces the product of x with w, only to state a backend's declared
    variant (Ops.deviation); it takes x itself and the norm divides its result, which is the
    same function (the norm is one scalar per stream)."""
    T, n, C = x.shape
    cd = compute_dtype(x)
    xc = x.to(cd)
    scale = torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + EPS_RMS)
    if project is None:
        proj = torch.tanh((xc * scale) @ w.to(cd))        # [T, n(src), n+2]
    else:
        proj = torch.tanh(project(xc, w.to(cd)) * scale)
    return hc_gates(proj, b.to(cd), s.to(cd))


def hc_gates(proj, b, s):
    """HC's coefficients from the tanh projections proj [T, n(src), n+2] (Eqs. 11-13)."""
    n = proj.shape[-2]
    h_pre = s[0] * proj[..., 0] + b[:n]
    h_post = s[1] * proj[..., 1] + b[n:2 * n]
    # Source i's projection fills column i of h_res[dst, src].
    h_res = s[0] * proj[..., 2:].transpose(-1, -2) + b[2 * n:].view(n, n)
    return h_pre, h_post, h_res


def hc_pre(x, w, b, s):
    h_pre, h_post, h_res = hc_coeffs(x, w, b, s)
    return apply_pre(x, h_pre), h_post, h_res


# ---------------------------------------------------------------- shared apply steps
def apply_pre(x, h_pre):
    """layer_input = sum_i h_pre[i] x[i]  (F_pre)."""
    cd = torch.promote_types(compute_dtype(x), h_pre.dtype)
    return (h_pre.to(cd).unsqueeze(-1) * x.to(cd)).sum(dim=1).to(x.dtype)


def post(x, f, h_post, h_res):
    """x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] f  (F_post,res), for HC and mHC."""
    cd = torch.promote_types(compute_dtype(x), h_res.dtype)
    out = torch.bmm(h_res.to(cd), x.to(cd)) + h_post.to(cd).unsqueeze(-1) * f.to(cd).unsqueeze(1)
    return out.to(x.dtype)


# ---------------------------------------------------------------- residual
def residual_pre(x):
    if x.shape[1] != 1:
        raise ValueError(f"residual expects x of shape [T, 1, C], got {list(x.shape)}")
    return x[:, 0], None, None


def residual_post(x, f, h_post=None, h_res=None):
    return x + f.unsqueeze(1)


# ---------------------------------------------------------------- parameters
def random_params(method: str, n: int, C: int, generator: torch.Generator, device="cpu"):
    """Seeded, non-degenerate parameters for checks and timing (never zeros).

    Scaled so the logits are O(1): a check on near-constant coefficients could not fail.
    """
    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float32) * std).to(device)

    def uniform(lo, hi, k):
        return (lo + (hi - lo) * torch.rand(k, generator=generator, dtype=torch.float32)).to(device)

    k = n_coeffs(n)
    if method == "mhc":
        # Wider mixing logits (b_res std 1, a_res in [1, 2]) keep Sinkhorn short of convergence
        # for many iterations, so a kernel that truncated it would show in h_res.
        b = torch.cat([randn(2 * n, std=0.5).cpu(), randn(n * n, std=1.0).cpu()]).to(device)
        alpha = torch.cat([uniform(0.5, 1.5, 2).cpu(), uniform(1.0, 2.0, 1).cpu()]).to(device)
        return (randn(n * C, k, std=(n * C) ** -0.5), b, alpha)
    if method == "hc":
        w = randn(C, n + 2, std=C ** -0.5)
        b = torch.cat([uniform(0.2, 1.0, n).cpu(), uniform(0.5, 1.5, n).cpu(),
                       (torch.eye(n) + 0.1 * torch.randn(n, n, generator=generator)).flatten()])
        return (w, b.to(device), uniform(0.2, 0.8, 2))
    if method == "residual":
        return ()
    raise ValueError(f"unknown method {method!r}")


# mHC's b_res diagonal at the identity init. The paper gives no init for b; with these logits
# alone Sinkhorn keeps the matrix (its row and column sums are already equal), so h_res starts
# with e^4 / (e^4 + n - 1) on the diagonal: 0.948 at n = 4 (0.982 at n = 2, 0.886 at n = 8),
# near I like HC's b_res = I, while every entry keeps a gradient (0.017 off the diagonal at
# n = 4: far from saturated).
IDENTITY_LOGIT = 4.0


def init_params(method: str, n: int, C: int, site_index: int = 0, identity_init: bool = False,
                generator: torch.Generator | None = None, device="cpu"):
    """The papers' initialisation (MATH.md), for models and the init-equivalence tests.

    mHC's b is not published: b = 0 by default (h_res near uniform 1/n), or with
    identity_init b_res = IDENTITY_LOGIT * I (h_res near I). HC's init is its paper's (b_res = I)
    either way."""
    k = n_coeffs(n)
    if method == "hc":
        b = torch.zeros(k)
        b[site_index % n] = 1.0
        b[n:2 * n] = 1.0
        b[2 * n:] = torch.eye(n).flatten()
        return (torch.zeros(C, n + 2, device=device), b.to(device),
                torch.tensor([0.01, 0.01], device=device))
    if method == "mhc":
        phi = torch.randn(n * C, k, generator=generator) * 0.02
        b = torch.zeros(k)
        if identity_init:
            b[2 * n:] = (IDENTITY_LOGIT * torch.eye(n)).flatten()
        return (phi.to(device), b.to(device), torch.full((3,), 0.01, device=device))
    if method == "residual":
        return ()
    raise ValueError(f"unknown method {method!r}")
