"""fp32 operands for 16-bit tensor-core products: t ~ hi + lo with both halves in x's dtype, so two
products with fp32 accumulation carry t to ~16 significant bits while x goes in as loaded. Used by
the TileLang mHC / HC GEMMs and the Triton HC forward."""
import weakref

import torch


def split_hi_lo(t: torch.Tensor, dtype: torch.dtype, cols: int):
    """t [R, K] fp32 -> (hi, lo) [R, cols] in dtype, zero padded: hi + lo ~ t to ~16 bits."""
    R, K = t.shape
    hi = torch.zeros(R, cols, device=t.device, dtype=dtype)
    lo = torch.zeros(R, cols, device=t.device, dtype=dtype)
    hi[:, :K] = t.to(dtype)
    lo[:, :K] = (t - hi[:, :K].float()).to(dtype)
    return hi, lo


# Weights keep their split between calls: id(w) -> (weakref to w, w._version, dtype, cols, hi, lo).
# The weakref identity check stops a new tensor that reuses a dead one's id from hitting, and
# _version (bumped by every in-place write, e.g. an optimizer step) from serving a stale split.
_WEIGHT_SPLITS: dict = {}


def split_weight_hi_lo(w: torch.Tensor, dtype: torch.dtype, cols: int):
    """split_hi_lo for a weight that many calls share (phi, w): computed once per weight version.

    Saves the split's small kernels (8 launches, ~35 us per call on an H100 at n = 4, C = 4096)
    on every forward and backward after the first."""
    key = id(w)
    hit = _WEIGHT_SPLITS.get(key)
    if hit is not None:
        ref, version, dt, c, hi, lo = hit
        if ref() is w and version == w._version and dt == dtype and c == cols:
            return hi, lo
    hi, lo = split_hi_lo(w.detach(), dtype, cols)
    if len(_WEIGHT_SPLITS) > 64:                      # drop entries of weights that are gone
        for k in [k for k, v in _WEIGHT_SPLITS.items() if v[0]() is None]:
            del _WEIGHT_SPLITS[k]
    _WEIGHT_SPLITS[key] = (weakref.ref(w), w._version, dtype, cols, hi, lo)
    return hi, lo
