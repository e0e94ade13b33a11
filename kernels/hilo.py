"""fp32 operands for 16-bit tensor-core products: t ~ hi + lo with both halves in x's dtype, so two
products with fp32 accumulation carry t to ~16 significant bits while x goes in as loaded. Used by
the TileLang mHC / HC GEMMs and the Triton HC forward (fwd_impl=gemm)."""
import torch


def split_hi_lo(t: torch.Tensor, dtype: torch.dtype, cols: int):
    """t [R, K] fp32 -> (hi, lo) [R, cols] in dtype, zero padded: hi + lo ~ t to ~16 bits."""
    R, K = t.shape
    hi = torch.zeros(R, cols, device=t.device, dtype=dtype)
    lo = torch.zeros(R, cols, device=t.device, dtype=dtype)
    hi[:, :K] = t.to(dtype)
    lo[:, :K] = (t - hi[:, :K].float()).to(dtype)
    return hi, lo
