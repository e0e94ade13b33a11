"""mHC recompute (suite.workloads.recompute) on Triton's fused boundary: inside a block the
boundaries run fused in the forward, the replay and the backward, with both links engaged
(layer_input's gradient into each fused boundary's backward, the x gradient of each block's
first boundary into the block's mhc_pre). Where recompute runs the very ops of no recompute (one block) its gradients are
those of no recompute bit for bit; a block edge is post and pre apart, so there only close.

CPU runs go through TRITON_INTERPRET=1 (tests/conftest.py) on a 4-site model of width 32, the
coefficient backwards at 64 tokens per program (as tests/triton/test_chain.py runs them)."""
import torch

from kernels import boundary_link, site_link
from suite.core.tolerance import rel_err, tolerance
from suite.workloads import recompute as rc
from suite.workloads.model import ModelConfig, Transformer

T = 16


def _count_puts(monkeypatch, cls):
    puts = []
    real = cls.put
    monkeypatch.setattr(cls, "put", lambda self, g: (puts.append(1), real(self, g))[1])
    return puts


def _grads(sites, x, mode, L_r, w):
    for s in sites:
        for p in s.parameters():
            p.grad = None
    x = x.clone().requires_grad_(True)
    (rc.run_sites(sites, x, mode, L_r).float() * w).sum().backward()
    return [x.grad] + [p.grad for s in sites for p in s.parameters()]


def test_mhc_recompute_fuses_the_boundaries_of_a_block(kernel_device, monkeypatch):
    monkeypatch.setenv("HCBENCH_MHC_PRE_B1_BT", "64")
    monkeypatch.setenv("HCBENCH_POST_COEFFS_B1_BT", "64")
    boundary_puts = _count_puts(monkeypatch, boundary_link.BoundaryLink)
    site_puts = _count_puts(monkeypatch, site_link.SiteLink)
    cfg = ModelConfig(method="mhc", backend="triton", C=32, layers=2, heads=2, seq=8, vocab=64,
                      n=4, dtype="bf16")
    model = Transformer(cfg, seed=1, device=kernel_device)
    model.randomise_connections(5)
    sites = model.sites()
    assert rc.fused_boundaries(sites)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, cfg.n, cfg.C, generator=g).to(torch.bfloat16).to(kernel_device)
    w = torch.randn(T, cfg.n, cfg.C, generator=g).to(kernel_device)
    want = _grads(sites, x, "none", 1, w)
    assert (len(boundary_puts), len(site_puts)) == (3, 1)
    for L_r, equal in ((4, True), (2, False)):
        boundary_puts.clear()
        site_puts.clear()
        got = _grads(sites, x, "mhc", L_r, w)
        blocks = rc.site_blocks(sites, L_r)
        assert (len(boundary_puts), len(site_puts)) == (len(sites) - len(blocks), len(blocks))
        for i, (a, b) in enumerate(zip(got, want)):
            if equal:
                assert torch.equal(a, b), (L_r, i)
            else:
                assert rel_err(a, b) <= tolerance(torch.bfloat16), (L_r, i)
