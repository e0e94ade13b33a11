"""Backend `tilelang`: TileLang kernels, forward and backward, one file per fused op.

post.py      F_post,res (shared by HC and mHC) and its backward
residual.py  the plain add x + f
common.py    import check, compilation and its cache, input checks
probe.py     availability: can a TileLang kernel compile and run on this GPU (the registry probe)

Not written yet: the coefficient passes with F_pre (mHC: norm + GEMM + Sinkhorn; HC: per-stream
norm + projections). Their `pre` / `coeffs` are None, so the runner records `site`, `pre` and
`coeffs` cases of this backend as skipped with that reason; `post` cases run.
Importing this package imports tilelang; the registry only does so after checking it is installed.
"""
from kernels import Ops
from kernels.tilelang import post as _post
from kernels.tilelang import residual as _residual
from kernels.tilelang.common import supports

OPS = {
    "mhc": Ops("mhc", "tilelang", pre=None, post=_post.post, coeffs=None, supports=supports),
    "hc": Ops("hc", "tilelang", pre=None, post=_post.post, coeffs=None, supports=supports),
    "residual": Ops("residual", "tilelang", pre=_residual.residual_pre, post=_residual.residual_post,
                    supports=supports),
}
