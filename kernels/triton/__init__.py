"""Backend `triton`: fused Triton kernels, forward and backward, one file per fused op.

mhc_pre.py   coefficients (norm + GEMM) + Sinkhorn + F_pre, and their backward
hc_pre.py    HC's per-stream norm, projections, tanh + F_pre, and their backward
post.py      F_post,res (shared by HC and mHC) and its backward
residual.py  the plain add x + f
"""
from kernels import Ops
from kernels.triton.common import supports
from kernels.triton.hc_pre import hc_coeffs, hc_pre
from kernels.triton.mhc_pre import mhc_coeffs, mhc_pre
from kernels.triton.post import post
from kernels.triton.residual import residual_post, residual_pre

OPS = {
    "mhc": Ops("mhc", "triton", pre=mhc_pre, post=post, coeffs=mhc_coeffs, supports=supports),
    "hc": Ops("hc", "triton", pre=hc_pre, post=post, coeffs=hc_coeffs, supports=supports),
    "residual": Ops("residual", "triton", pre=residual_pre, post=residual_post, supports=supports),
}
