"""Backend `torch`: the reference functions run eagerly in the case dtype."""
from kernels import Ops, reference as ref

OPS = {
    "mhc": Ops("mhc", "torch", pre=ref.mhc_pre, post=ref.post, coeffs=ref.mhc_coeffs,
               post_coeffs=ref.mhc_post_coeffs, apply_pre=ref.apply_pre),
    "hc": Ops("hc", "torch", pre=ref.hc_pre, post=ref.post, coeffs=ref.hc_coeffs),
    "residual": Ops("residual", "torch", pre=ref.residual_pre, post=ref.residual_post),
}
