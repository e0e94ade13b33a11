"""kernels/hilo.py: the hi + lo split and its per-weight cache."""
import torch

from kernels.hilo import split_hi_lo, split_weight_hi_lo


def test_split_carries_sixteen_bits():
    w = torch.randn(40, 24, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    hi, lo = split_hi_lo(w, torch.bfloat16, 32)
    assert hi.shape == (40, 32) and hi[:, 24:].abs().sum() == 0 and lo[:, 24:].abs().sum() == 0
    err = (hi[:, :24].double() + lo[:, :24].double() - w.double()).abs().max() / w.abs().max()
    assert err < 2 ** -15


def test_weight_cache_follows_versions_and_objects():
    w = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    a = split_weight_hi_lo(w, torch.bfloat16, 16)
    assert split_weight_hi_lo(w, torch.bfloat16, 16)[0] is a[0]          # same version: cached
    assert split_weight_hi_lo(w, torch.float16, 16)[0] is not a[0]       # another dtype
    with torch.no_grad():
        w.mul_(2)                                                        # an optimizer step
    b = split_weight_hi_lo(w, torch.bfloat16, 16)
    torch.testing.assert_close(b[0][:, :6].float(), (2 * a[0][:, :6].float()))
    del w, a, b
    other = torch.randn(16, 6)                                           # may reuse the id
    hi, lo = split_weight_hi_lo(other, torch.bfloat16, 16)
    torch.testing.assert_close(hi[:, :6].float() + lo[:, :6].float(), other, atol=1e-4, rtol=1e-4)
