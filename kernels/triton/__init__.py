"""Backend `triton`: fused Triton kernels, forward and backward, one file per fused op.

mhc_pre.py   coefficients (norm + GEMM) + Sinkhorn + F_pre, and their backward
hc_pre.py    HC's per-stream norm, projections, tanh + F_pre, and their backward
post.py      F_post,res (shared by HC and mHC) and its backward
post_coeffs.py  F_post,res of one mHC site fused with the next site's coefficients, the
             layer_input op that goes with it, and their backward (a chain's boundary)
residual.py  the plain add x + f

Modules are imported as modules, so `kernels.triton.post` stays the module, not its function.
"""
from kernels import Ops
from kernels.triton import hc_pre as _hc
from kernels.triton import mhc_pre as _mhc
from kernels.triton import post as _post
from kernels.triton import post_coeffs as _post_coeffs
from kernels.triton import residual as _residual
from kernels.triton.common import supports

OPS = {
    "mhc": Ops("mhc", "triton", pre=_mhc.mhc_pre, post=_post.post, coeffs=_mhc.mhc_coeffs,
               post_coeffs=_post_coeffs.post_coeffs, apply_pre=_post_coeffs.layer_input,
               supports=supports),
    "hc": Ops("hc", "triton", pre=_hc.hc_pre, post=_post.post, coeffs=_hc.hc_coeffs,
              supports=supports),
    "residual": Ops("residual", "triton", pre=_residual.residual_pre, post=_residual.residual_post,
                    supports=supports),
}
