"""Column sums of tall, narrow fp32 matrices: the per-token (or per-program) rows that the
coefficient gradients (mHC's db and dalpha, HC's db and dsum) are summed from.

torch's sum over dim 0 of a [T, K] matrix with K around 24 runs few blocks: the mHC backward's
db and dalpha sums took 62 us at T = 16384 on an H100, where one transposed copy and a sum along
contiguous rows take 21 us (dev/logs/tuning-20261124-h100/colsum_probe.txt)."""
import functools
import math

import torch


def column_sums(*mats: torch.Tensor) -> torch.Tensor:
    """The dim-0 sums of matrices with the same number of rows, concatenated: [sum of widths].
    Each matrix is flattened past dim 0 ([T, n, n] counts as n*n columns)."""
    cols = torch.cat([m.reshape(m.shape[0], math.prod(m.shape[1:])) for m in mats], 1)
    return cols.t().contiguous().sum(1)


@functools.cache
def _segment_ids(sizes: tuple, device: str) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)


def segment_sums(v: torch.Tensor, sizes: tuple) -> torch.Tensor:
    """v [sum(sizes)] -> [len(sizes)]: sums of consecutive segments (the segment ids are built
    once per device, so no host-to-device copy per call)."""
    return v.new_zeros(len(sizes)).index_add_(0, _segment_ids(tuple(sizes), str(v.device)), v)
