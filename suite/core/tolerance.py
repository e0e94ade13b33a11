"""How close a backend must come to the fp64 reference, per state dtype.

Error is norm-wise: ||out - ref|| / ||ref||, the largest over every output and gradient.
- fp32 allows tf32 tensor-core products (about 3e-4 relative) in the coefficient GEMM.
- bf16 / fp16 outputs are rounded to 8 / 11 significant bits (about 1e-3 / 2.5e-4 norm-wise);
  the tolerances leave room for fp32 accumulation orders, not for wrong math.
"""
from __future__ import annotations

import math

import torch

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float64: 1e-10}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error in fp64; NaN or Inf anywhere gives inf (never passes).

    The output is moved to the reference's device: references are often computed on the CPU."""
    out = out.detach().to(device=ref.device, dtype=torch.float64)
    ref = ref.detach().to(torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {list(out.shape)} vs reference {list(ref.shape)}")
    if not torch.isfinite(out).all():
        return math.inf
    denom = torch.linalg.vector_norm(ref).item()
    diff = torch.linalg.vector_norm(out - ref).item()
    return diff / denom if denom > 0 else diff
