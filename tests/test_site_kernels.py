"""harness.py site-kernels: a clear refusal without a GPU; on one, a per-kernel table per backend."""
import pytest
import torch

from suite import cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_it_says_so_and_exits_2(capsys):
    assert cli.main(["site-kernels", "--C", "64"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lists_kernels_and_totals_per_backend(capsys):
    assert cli.main(["site-kernels", "--method", "residual", "--C", "256", "--T", "64",
                                      "--backends", "torch,nosuch", "--min-us", "0"]) == 0
    out = capsys.readouterr().out
    assert "residual C=256 totals: torch" in out
    assert "nosuch: FAILED" in out
