"""Backend `compile`: torch.compile of the reference, one compiled graph per op."""
import torch

from kernels import Ops, reference as ref


def _c(fn):
    # dynamic=False: every benchmarked shape gets its own specialised graph, as a user would get.
    return torch.compile(fn, dynamic=False)


OPS = {
    "mhc": Ops("mhc", "compile", pre=_c(ref.mhc_pre), post=_c(ref.post), coeffs=_c(ref.mhc_coeffs)),
    "hc": Ops("hc", "compile", pre=_c(ref.hc_pre), post=_c(ref.post), coeffs=_c(ref.hc_coeffs)),
    "residual": Ops("residual", "compile", pre=ref.residual_pre, post=_c(ref.residual_post)),
}
