"""Backend `tilelang`: TileLang kernels, forward and backward, one file per fused op.

post.py      F_post,res (shared by HC and mHC) and its backward
residual.py  the plain add x + f
common.py    import check, compilation and its cache, input checks
probe.py     availability: can a TileLang kernel compile and run on this GPU (the registry probe)

mhc_pre.py   mHC coefficients (norm + GEMM + Sinkhorn) with F_pre, and their backward
post_coeffs.py  F_post,res of one mHC site fused with the next site's coefficients, the
             layer_input op that goes with it, and their backward (a chain's boundary; dphi
             in a pass of its own: its docstring says why)
hc_pre.py    HC coefficients (per-stream norm + projections, tanh) with F_pre, and their backward
Importing this package imports tilelang; the registry only does so after checking it is installed.
"""
from kernels import Ops
from kernels.tilelang import hc_pre as _hc_pre
from kernels.tilelang import mhc_pre as _mhc_pre
from kernels.tilelang import post as _post
from kernels.tilelang import post_coeffs as _post_coeffs
from kernels.tilelang import residual as _residual
from kernels.tilelang.common import supports

OPS = {
    "mhc": Ops("mhc", "tilelang", pre=_mhc_pre.mhc_pre, post=_post.post, coeffs=_mhc_pre.mhc_coeffs,
               post_coeffs=_post_coeffs.post_coeffs, apply_pre=_post_coeffs.layer_input,
               supports=supports),
    "hc": Ops("hc", "tilelang", pre=_hc_pre.hc_pre, post=_post.post, coeffs=_hc_pre.hc_coeffs,
              supports=supports),
    "residual": Ops("residual", "tilelang", pre=_residual.residual_pre, post=_residual.residual_post,
                    supports=supports),
}
