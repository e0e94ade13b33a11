"""Backend `te`: NVIDIA Transformer Engine 2.20's Triton mHC (a peer, wrapped for comparison; mhc, n = 4).

Transformer Engine (the pure-Python `transformer-engine` 2.20.2 wheel, installed without its
dependencies) ships the kernels in transformer_engine/common/triton/mhc.py and their autograd
wrapper in transformer_engine/pytorch/triton/mhc.py. TE's whole site is two calls:
    mhc_generate_mix_and_aggregate(x, phi, alpha, beta)          -> (layer_input, H_post, H_res)
        = mhc_fused_projection -> mhc_fused_scale -> mhc_fused_sinkhorn(iters=20) -> mhc_fused_aggregate
    mhc_fused_expand_combine(f, bias, H_post, x, H_res, n)       -> x_next
Our ops map onto them:
    pre    -> mhc_generate_mix_and_aggregate (sinkhorn_iters != 20: the same four calls, with
              mhc_fused_sinkhorn given the count, since the wrapper fixes it at 20)
    coeffs -> mhc_fused_projection, mhc_fused_scale, mhc_fused_sinkhorn (the wrapper's first three
              calls; TE has no call that returns H_pre)
    post   -> mhc_fused_expand_combine (bias None)
Every call uses TE's defaults: use_tf32=True, use_split_k=False, no norm_weight (the RMSNorm
weight is folded into phi, as in MATH.md), no fused_grad_x_acc_buffer (x's gradients from the
projection, the aggregate and expand-combine are added by autograd), autotuning on.

TE's extension (transformer_engine_torch, CUDA libraries) is not loaded: TE's package
__init__ files need it, so the two files are loaded on their own (`_load_te`). The wrapper
imports one thing from it, `general_gemm` (cuBLAS), for grad phi when there is no norm_weight;
`general_gemm` here stands in for it with a torch matmul in TF32, the compute type TE's cuBLAS
call uses for fp32 operands (CUBLAS_COMPUTE_32F_FAST_TF32). This is the one piece of TE's backward
not run as shipped (DEVIATION names it). TE's files are not changed.

Conventions, translated (exactly; tests/test_te.py checks each against TE's kernels):
- State layout. TE keeps the streams innermost: x is (s, b, C, n), flattened to K = nC as
  c*n + i. Ours is [T, n, C] (i*C + c). x goes in as (T, 1, C, n) (`to_te_state`), x_next comes
  back as a [T, n, C] view of TE's (T, 1, C, n) output (`from_te_state`, no copy). Converting x
  copies the whole state unless its memory is already streams-innermost: x from
  `streams_innermost` or a te post's x_next goes in as it is. The suite makes a case's inputs
  through this backend's `state_layout` (`streams_innermost`), before the check and the timing,
  so no timed call converts x; a caller that hands over [T, n, C]-contiguous x pays one copy in
  pre, which post then reuses for the same, unmodified x.
- phi: TE's is (N, K), N = n*n + 2n; ours is [nC, N]. Rows reordered to K's order, transposed.
- h_res: TE's H_res is [src, dst] (out[:, j] = sum_i x[:, i] H_res[i, j]); ours is [dst, src].
  So the res logits go in transposed (the n x n block of phi's and b's columns, `PERM`), TE's
  H_res comes back as a transposed view and goes into post transposed again (a view of the same
  memory, no copy within a site). With the logits transposed TE's row-first Sinkhorn is
  MATH.md's column-first one, and its last (column) step is MATH.md's last (row) step.
- b [N] -> beta (1, N), columns as phi's; alpha [3] = (a_pre, a_post, a_res) passed as is.
- h_pre = sigmoid, h_post = 2 * sigmoid, m = alpha * (x @ phi) / r + b: the same.

Differences from MATH.md that cannot be configured (DEVIATION; TE_REFERENCE computes them exactly):
1. eps_rms: TE adds torch.finfo(float32).eps (1.19e-7) to the mean square, not 1e-6.
2. Sinkhorn: TE iterates in log space (potentials f, g with logsumexp) without eps_sk, so each
   normalisation divides by the plain sum, not by (sum + 1e-6). The iterates are the same as
   MATH.md's with eps_sk = 0.
3. grad phi comes from the torch matmul stand-in above, not TE's cuBLAS call (same product, same
   TF32 compute type; another GEMM kernel).
The eps gaps are ~1e-6 relative (eps_rms: for a mean square of order 1; near 1e-6 it is tens of
percent); they are declared so that the gate holds TE to its own variant as strictly as every
backend is held to MATH.md.
Limits (`supports`): n = 4 only (TE asserts it); x bf16 or fp32 (TE's documented dtypes; TE's
projection rounds x @ phi to TF32, as MATH.md allows). TE's aggregate and expand-combine grids put
tokens on grid axis y, so T > 262140 raises in TE.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import sys
import types
import weakref
from pathlib import Path

import torch

from kernels import Ops, checks, reference

TE_VERSION = "2.20"
N_STREAMS = 4
STATE_DTYPES = (torch.bfloat16, torch.float32)
TE_SINKHORN_ITERS = 20          # fixed inside mhc_generate_mix_and_aggregate
TE_EPS_RMS = torch.finfo(torch.float32).eps     # mHCScaleFusedOp's eps


def supports(n: int, C: int, dtype) -> str | None:
    if n != N_STREAMS:
        return f"te mHC supports n = 4 only (Transformer Engine asserts it), not {n}"
    if dtype not in STATE_DTYPES:
        return f"te mHC takes bf16 or fp32 state (Transformer Engine's documented dtypes), not {dtype}"
    return None


# ------------------------------------------------------------------ loading TE without its extension
def _tf32_matmul(a, b):
    """a @ b with fp32 operands rounded to TF32 on the GPU, leaving torch's setting as it was."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):         # torch >= 2.9
        before, matmul.fp32_precision = matmul.fp32_precision, "tf32"
        try:
            return a @ b
        finally:
            matmul.fp32_precision = before
    before, matmul.allow_tf32 = matmul.allow_tf32, True
    try:
        return a @ b
    finally:
        matmul.allow_tf32 = before


def general_gemm(A, B, out_dtype=None, layout="TN", **kwargs):
    """Stands in for transformer_engine.pytorch.cpp_extensions.gemm.general_gemm on plain tensors.

    TE's layouts are cuBLAS's (column-major), so in row-major terms the product is
    op(B) @ op(A) with op(B) = B^T where layout[1] == "T" and op(A) = A^T where layout[0] == "T".
    fp32 operands multiply in TF32, as TE's cuBLAS call does; anything beyond a plain GEMM
    (quantizers, bias, GELU, accumulation into out, comm overlap) is refused, not ignored.
    """
    if layout not in ("TN", "NN", "NT"):
        raise ValueError(f"general_gemm stand-in: layout {layout!r} not supported")
    if kwargs:
        raise NotImplementedError(f"general_gemm stand-in: plain GEMMs only, got {sorted(kwargs)}")
    a = A.t() if layout[0] == "T" else A
    b = B.t() if layout[1] == "T" else B
    out = _tf32_matmul(b, a) if a.dtype == b.dtype == torch.float32 else b @ a
    return (out if out_dtype is None else out.to(out_dtype)), None, None, None


def _load_te():
    """TE's mHC wrapper module, loaded from TE's files with `general_gemm` standing in.

    TE's package __init__ files load its compiled extension (and fail without it), so they are
    not run: empty packages stand in for them while the two files execute, and sys.modules is put
    back afterwards, so a real Transformer Engine imported later in the process is unaffected.
    """
    spec = importlib.util.find_spec("transformer_engine")       # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("transformer_engine is not installed")
    version = importlib.metadata.version("transformer_engine")
    if not version.startswith(TE_VERSION + "."):
        raise ImportError(f"the te backend wraps Transformer Engine {TE_VERSION}.x, found {version}")
    root = Path(next(iter(spec.submodule_search_locations)))
    files = {"transformer_engine.common.triton.mhc": root / "common" / "triton" / "mhc.py",
             "transformer_engine.pytorch.triton.mhc": root / "pytorch" / "triton" / "mhc.py"}
    for path in files.values():
        if not path.is_file():
            raise ImportError(f"Transformer Engine {version} has no {path.relative_to(root.parent)}")
    gemm = types.ModuleType("transformer_engine.pytorch.cpp_extensions.gemm")
    gemm.general_gemm = general_gemm
    stand_ins = {"transformer_engine.pytorch.cpp_extensions.gemm": gemm}
    for pkg in ("transformer_engine", "transformer_engine.common", "transformer_engine.common.triton",
                "transformer_engine.pytorch", "transformer_engine.pytorch.triton",
                "transformer_engine.pytorch.cpp_extensions"):
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(root.joinpath(*pkg.split(".")[1:]))]
        stand_ins[pkg] = mod
    saved = {name: sys.modules.get(name) for name in (*stand_ins, *files)}
    try:
        sys.modules.update(stand_ins)
        loaded = {}
        for name, path in files.items():
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return loaded["transformer_engine.pytorch.triton.mhc"], version


TE, TE_INSTALLED_VERSION = _load_te()


# ------------------------------------------------------------------ layout conversions
def _res_transpose(n: int) -> torch.Tensor:
    """Column order of TE's N = n*n + 2n coefficients in ours: the gates stay, the res block is
    transposed (TE's column 2n + src*n + dst holds our 2n + dst*n + src). Its own inverse."""
    res = torch.arange(n * n).view(n, n).t().reshape(-1) + 2 * n
    return torch.cat([torch.arange(2 * n), res])


PERM = _res_transpose(N_STREAMS)


@functools.lru_cache(maxsize=None)
def _perm_on(device: torch.device) -> torch.Tensor:
    # once per device: a host-to-device copy inside every call would be timed with it
    return PERM.to(device)


def to_te_state(x: torch.Tensor) -> torch.Tensor:
    """[T, n, C] -> TE's (T, 1, C, n). No copy when x's memory is already streams-innermost
    (x.transpose(1, 2) contiguous, e.g. x_next of a te post); else the whole state is copied."""
    T, n, C = x.shape
    return x.transpose(1, 2).contiguous().view(T, 1, C, n)


def streams_innermost(x: torch.Tensor) -> torch.Tensor:
    """x [T, n, C] with the same values, its memory laid out as TE's (T, C, n): what a caller
    converts to once, outside any timed region, so that to_te_state costs nothing."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def from_te_state(y: torch.Tensor) -> torch.Tensor:
    """TE's (s, b, C, n) -> [T, n, C], a view of the same memory."""
    s, b, C, n = y.shape
    return y.view(s * b, C, n).transpose(1, 2)


def to_te_params(phi: torch.Tensor, b: torch.Tensor):
    """phi [nC, N] (rows i*C + c) -> TE's (N, K) with K = c*n + i; b [N] -> beta (1, N); both with
    the res block transposed (PERM). Differentiable; copies phi (N * nC fp32)."""
    N = phi.shape[1]
    n = N_STREAMS
    C = phi.shape[0] // n
    perm = _perm_on(phi.device)
    phi_te = phi.view(n, C, N).permute(2, 1, 0).index_select(0, perm).reshape(N, C * n)
    return phi_te, b.index_select(0, perm).view(1, N)


def from_te_h_res(H_res: torch.Tensor) -> torch.Tensor:
    """TE's H_res (s, b, n, n) [src, dst] -> ours [T, n, n] [dst, src], a view."""
    s, b, n, _ = H_res.shape
    return H_res.view(s * b, n, n).transpose(-1, -2)


def to_te_h_res(h_res: torch.Tensor) -> torch.Tensor:
    """Ours [T, n, n] [dst, src] -> TE's (T, 1, n, n) [src, dst], a view (TE copies it if it is not
    contiguous, i.e. unless it came from a te pre)."""
    return h_res.transpose(-1, -2).unsqueeze(1)


# ------------------------------------------------------------------ the ops
_STATE_ATTR = "_hcbench_te_state"


def _keep_state(h_res: torch.Tensor, x: torch.Tensor, x_te: torch.Tensor) -> None:
    """Tags pre's h_res with the converted x, so that a post of the same site given the same,
    unmodified x takes it instead of copying x again."""
    setattr(h_res, _STATE_ATTR, (weakref.ref(x), x._version, x_te))


def _state_for_post(x: torch.Tensor, h_res: torch.Tensor) -> torch.Tensor:
    kept = getattr(h_res, _STATE_ATTR, None)
    if kept is not None and kept[0]() is x and kept[1] == x._version:
        return kept[2]
    return to_te_state(x)


def _check_params(x, phi, b, alpha, sinkhorn_iters):
    return checks.check_mhc_inputs("te mhc", x, phi, b, alpha, sinkhorn_iters, supports)


def _te_coeffs(x_te, phi_te, alpha, beta, iters: int):
    """TE's H_pre (T, n), H_post (T, n), H_res (T, 1, n, n) [src, dst]: the wrapper's first three calls."""
    s, b, C, n = x_te.shape
    H, ms = TE.mhc_fused_projection(x_te.view(s * b, n * C), phi_te)
    H_pre, H_post, H_res = TE.mhc_fused_scale(H, alpha, beta, ms, n)
    return H_pre, H_post, TE.mhc_fused_sinkhorn(H_res.view(s, b, n, n), n, recompute_hist=True,
                                                iters=iters)


def mhc_coeffs(x, phi, b, alpha, sinkhorn_iters: int = 20):
    """(h_pre [T,n], h_post [T,n], h_res [T,n,n] [dst, src]), all fp32, from TE's kernels."""
    _check_params(x, phi, b, alpha, sinkhorn_iters)
    phi_te, beta = to_te_params(phi, b)
    h_pre, h_post, H_res = _te_coeffs(to_te_state(x), phi_te, alpha, beta, int(sinkhorn_iters))
    return h_pre, h_post, from_te_h_res(H_res)


def mhc_pre(x, phi, b, alpha, sinkhorn_iters: int = 20):
    """(layer_input [T,C] in x's dtype, h_post [T,n], h_res [T,n,n] [dst, src]).

    x in the suite's [T, n, C]-contiguous layout is copied into TE's layout here, inside the call
    (to_te_state; none for x from streams_innermost or a te post); a post of the same site given
    the same x reuses that copy (_keep_state)."""
    T, n, C = _check_params(x, phi, b, alpha, sinkhorn_iters)
    phi_te, beta = to_te_params(phi, b)
    x_te = to_te_state(x)
    if int(sinkhorn_iters) == TE_SINKHORN_ITERS:
        layer_input, H_post, H_res = TE.mhc_generate_mix_and_aggregate(x_te, phi_te, alpha, beta)
    else:
        H_pre, H_post, H_res = _te_coeffs(x_te, phi_te, alpha, beta, int(sinkhorn_iters))
        layer_input = TE.mhc_fused_aggregate(x_te, H_pre.view(T, 1, n), n)
    h_res = from_te_h_res(H_res)
    _keep_state(h_res, x, x_te)
    return layer_input.view(T, C), H_post.view(T, n), h_res


def mhc_post(x, f, h_post, h_res):
    """x_next [T,n,C] = h_res @ x + h_post * f, TE's expand-combine kernel; x_next is a view of
    TE's streams-innermost output (so a following te pre takes it without a copy)."""
    T, n, C = checks.check_post_inputs("te post", x, f, h_post, h_res, supports)
    out = TE.mhc_fused_expand_combine(f.view(T, 1, C), None, h_post.view(T, 1, n),
                                      _state_for_post(x, h_res), to_te_h_res(h_res), n)
    return from_te_state(out)


# ------------------------------------------------------------------ TE's variant of MATH.md
def te_sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """TE's Sinkhorn in our [..., dst, src] terms, exact in fp64: MATH.md's order (columns, then
    rows) without eps_sk. TE's log-space potentials give the same iterates: exp(f_i + L_ij + g_j)
    with f, g the logsumexp normalisers is exp(L) with every sum divided out exactly."""
    return reference.sinkhorn(logits, iters, eps=0.0)


def te_mhc_coeffs(x, phi, b, alpha, sinkhorn_iters: int = 20):
    """MATH.md's coefficients with TE's eps_rms and Sinkhorn (fp32, or fp64 for fp64 inputs)."""
    return reference.mhc_coeffs(x, phi, b, alpha, sinkhorn_iters, sinkhorn_fn=te_sinkhorn,
                                eps_rms=TE_EPS_RMS)


def te_mhc_pre(x, phi, b, alpha, sinkhorn_iters: int = 20):
    h_pre, h_post, h_res = te_mhc_coeffs(x, phi, b, alpha, sinkhorn_iters)
    return reference.apply_pre(x, h_pre), h_post, h_res


DEVIATION = ("Transformer Engine's eps (eps_rms = 1.19e-7, no eps_sk in its log-space Sinkhorn) and a "
             "torch matmul standing in for its cuBLAS grad-phi GEMM (docs: kernels/te.py)")
TE_REFERENCE = Ops("mhc", "te-reference", pre=te_mhc_pre, post=reference.post, coeffs=te_mhc_coeffs)
OPS = {"mhc": Ops("mhc", "te", pre=mhc_pre, post=mhc_post, coeffs=mhc_coeffs, supports=supports,
                  deviation=DEVIATION, reference=TE_REFERENCE, state_layout=streams_innermost)}
