"""The whole site (pre, then post, through autograd) with backend triton, through the suite's own
correctness gate (suite.run.check: fresh inputs, fp64 reference, every output and gradient), with the
site link (kernels/site_link.py) engaged: post's x gradient must reach pre's backward and be
added there, once. The interpreter runs the kernels on the CPU; `gpu` cases use benchmark widths."""
import pytest
import torch

import kernels
from kernels import site_link
from suite.core.scenario import Case
from suite.run.check import check

METHODS = ("mhc", "hc")


def _gate(method, n, C, T, dtype, device, monkeypatch):
    puts = []
    real = site_link.SiteLink.put
    monkeypatch.setattr(site_link.SiteLink, "put", lambda self, dx: (puts.append(dx.shape), real(self, dx)))
    case = Case(method=method, C=C, T=T, n=n, dtype=dtype, mode="fwd+bwd", backend="triton",
                device=device, sinkhorn_iters=20 if method == "mhc" else None)
    res = check(kernels.get(method, "triton"), case, device)
    assert res["passed"], f"{method} n={n} C={C} T={T} {dtype}: {res['errors']} vs {res['tols']}"
    # the gate may check fewer tokens than the case has (suite.run.check.check_tokens: GPU memory)
    assert puts == [(res["T"], n, C)], "post's x gradient did not go through the link"


SMALL = [(n, C, T, dt) for n, C, T, dt in ((1, 264, 7, "bf16"), (4, 264, 1, "bf16"),
                                          (4, 40, 33, "fp16"), (3, 264, 5, "bf16"),
                                          (8, 40, 3, "bf16"))]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,C,T,dtype", SMALL, ids=[f"n{n}-C{C}-T{T}-{d}" for n, C, T, d in SMALL])
def test_site_link_small(method, n, C, T, dtype, kernel_device, monkeypatch):
    _gate(method, n, C, T, dtype, kernel_device, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("C", (2560, 7168))
def test_site_link_gpu(method, C, monkeypatch):
    _gate(method, 4, C, 4097, "bf16", "cuda", monkeypatch)
