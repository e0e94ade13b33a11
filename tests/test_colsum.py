"""kernels/colsum.py against torch's own sums, in fp64 and fp32, on odd shapes."""
import pytest
import torch

from kernels.colsum import column_sums, segment_sums


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_column_sums_concatenate_the_dim0_sums(dtype):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 5, generator=g, dtype=dtype)
    b = torch.randn(37, 3, 3, generator=g, dtype=dtype)
    got = column_sums(a, b)
    want = torch.cat([a.sum(0), b.sum(0).flatten()])
    assert got.shape == (14,)
    torch.testing.assert_close(got, want)


def test_column_sums_of_no_rows_are_zero():
    assert torch.equal(column_sums(torch.empty(0, 4)), torch.zeros(4))


def test_segment_sums():
    v = torch.arange(1.0, 25.0)
    got = segment_sums(v, (4, 4, 16))
    assert torch.equal(got, torch.tensor([v[:4].sum(), v[4:8].sum(), v[8:].sum()]))
