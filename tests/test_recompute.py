"""suite.workloads.recompute on the CPU: per-site blocks, every connection op's backward exactly once under
`mhc` recompute (the fused boundary's too, where a block's sites fuse theirs), gradients equal to no
recompute in fp64 with the boundaries fused or apart, Eq. 20 counted in sites, and the bytes the
recompute blocks keep (RetainedBytes) against the model's resident term."""
import dataclasses
import math
from collections import Counter

import pytest
import torch

from kernels import boundary_link, reference, site_link
from suite.core import recompute_size as rs
from suite.workloads import recompute as rc
from suite.workloads.model import ModelConfig, Transformer
from tests import test_site_link as linked_toy

TINY = {"C": 32, "heads": 2, "seq": 8, "vocab": 64, "n": 4, "dtype": "fp64", "backend": "torch"}
T = 16          # 2 sequences of 8 tokens


def tiny_sites(method, layers=3, seed=1, fusion=True):
    model = Transformer(ModelConfig(method=method, layers=layers, boundary_fusion=fusion, **TINY),
                        seed=seed)
    model.randomise_connections(seed + 4)    # HC's init has zero projections: make them count
    return model, model.sites()


def state(model, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, model.cfg.streams, model.cfg.C, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------- counting each op's calls
class _Tap(torch.autograd.Function):
    """Identity on its tensors; its backward counts one call under `key`. A tap on an op's
    outputs runs once each time a backward enters the op, a tap on its inputs once each time a
    backward leaves it."""

    @staticmethod
    def forward(ctx, counts, key, *ts):
        ctx.counts, ctx.key = counts, key
        return tuple(t.view_as(t) for t in ts)

    @staticmethod
    def backward(ctx, *grads):
        ctx.counts[ctx.key] += 1
        return (None, None, *grads)


def _tapped(counts, key, values):
    """Taps the tensors among values (None stays None)."""
    present = [v for v in values if v is not None]
    if not present:
        return tuple(values)
    it = iter(_Tap.apply(counts, key, *present))
    return tuple(next(it) if v is not None else None for v in values)


def _counted(counts, i, what, fn, *args, **opts):
    counts[i, f"{what} fwd"] += 1
    args = _tapped(counts, (i, f"{what} bwd leaves"), args)
    out = fn(*args, **opts)
    single = not isinstance(out, tuple)
    out = _tapped(counts, (i, f"{what} bwd enters"), (out,) if single else out)
    return out[0] if single else out


def count_calls(sites):
    """Wraps every site's pre, post and F, and the fused boundary's two ops (post_coeffs and
    apply_pre, counted as "boundary" and "apply_pre" of the site they lead into); returns the
    Counter, keyed (site index, what). The sites keep one Ops between them, so they fuse their
    boundaries exactly when they did before."""
    counts = Counter()
    ops = sites[0].ops
    for i, site in enumerate(sites):
        post0, F0 = site.post, site.F
        site.pre = lambda x, i=i, site=site: _counted(counts, i, "pre", ops.pre, x, *site.conn,
                                                      **site.opts)
        site.post = lambda *args, i=i, post0=post0: _counted(counts, i, "post", post0, *args)
        site.F = lambda li, i=i, F0=F0: _counted(counts, i, "F", F0, li)
    if ops.post_coeffs is None:
        return counts
    index = {id(s.conn[0]): i for i, s in enumerate(sites)}
    led = []

    def post_coeffs(x, f, h_post, h_res, *params, **opts):
        led.append(index[id(params[0])])
        return _counted(counts, led[-1], "boundary", ops.post_coeffs, x, f, h_post, h_res,
                        *params, **opts)

    def apply_pre(x, h_pre):
        return _counted(counts, led[-1], "apply_pre", ops.apply_pre, x, h_pre)

    shared = dataclasses.replace(ops, post_coeffs=post_coeffs, apply_pre=apply_pre)
    for site in sites:
        site.ops = shared
    return counts


def per_site(counts, i):
    return {what: c for (j, what), c in counts.items() if j == i}


def expected(n_sites, L_r, fused, forwards):
    """What each site's ops run: their forwards `forwards` times (2 under mhc recompute: the
    forward and the replay), F's once, every backward once. With fused boundaries only a block's
    first site runs pre and only its last post; the boundary between two sites of a block is the
    fused one (post_coeffs, then apply_pre), counted for the site it leads into."""
    def op(what, fwd=forwards):
        return {f"{what} fwd": fwd, f"{what} bwd leaves": 1, f"{what} bwd enters": 1}
    out = []
    for block in rc.site_blocks(range(n_sites), L_r):
        for j in range(len(block)):
            e = op("F", 1)
            e.update(op("pre") if j == 0 or not fused else {**op("boundary"), **op("apply_pre")})
            if j + 1 == len(block) or not fused:
                e.update(op("post"))
            out.append(e)
    return out


def test_sites_fuse_their_boundaries_as_counted():
    """The counting keeps the sites' fused boundaries; boundary_fusion off turns them off."""
    for fusion in (True, False):
        sites = tiny_sites("mhc", layers=1, fusion=fusion)[1]
        count_calls(sites)
        assert rc.fused_boundaries(sites) is fusion


@pytest.mark.parametrize("method,fusion", [("mhc", True), ("mhc", False), ("hc", True),
                                           ("residual", True)])
def test_each_op_backward_runs_once_per_site_under_mhc_recompute(method, fusion):
    model, sites = tiny_sites(method, layers=2, fusion=fusion)          # 4 sites
    fused = method == "mhc" and fusion
    counts = count_calls(sites)
    for L_r in (1, 2, 3, len(sites)):
        counts.clear()
        x = state(model).requires_grad_(True)
        out = rc.run_sites(sites, x, "mhc", L_r)
        assert sum(c for (_, w), c in counts.items() if "bwd" in w) == 0
        out.backward(torch.ones_like(out))
        want = expected(len(sites), L_r, fused, 2)
        for i in range(len(sites)):
            assert per_site(counts, i) == want[i], (L_r, i)
        boundaries = sum(len(b) - 1 for b in rc.site_blocks(sites, L_r)) if fused else 0
        assert sum(c for (_, w), c in counts.items() if w == "boundary bwd enters") == boundaries
        assert (sum(c for (_, w), c in counts.items() if w == "post bwd enters")
                == len(sites) - boundaries)


@pytest.mark.parametrize("method,fusion", [("mhc", True), ("mhc", False), ("hc", True)])
def test_each_op_runs_once_without_recompute(method, fusion):
    model, sites = tiny_sites(method, layers=2, fusion=fusion)
    counts = count_calls(sites)
    x = state(model).requires_grad_(True)
    out = rc.run_sites(sites, x, "none", 2)
    out.backward(torch.ones_like(out))
    want = expected(len(sites), len(sites), method == "mhc" and fusion, 1)
    for i in range(len(sites)):
        assert per_site(counts, i) == want[i]


@pytest.mark.parametrize("fusion", [True, False])
def test_each_op_backward_runs_once_through_the_pipeline_phases(fusion):
    """keep_forward / replay / backprop as suite.workloads.dist.pipeline calls them, replay before the gradient
    is known (early recompute)."""
    model, sites = tiny_sites("mhc", layers=2, fusion=fusion)
    counts = count_calls(sites)
    x0 = state(model)
    blocks = []
    x = x0
    for block in rc.site_blocks(sites, 3):
        out, fg, li = rc.keep_forward(block, x)
        blocks.append((block, x, fg, li))
        x = out
    rec = [rc.replay(b, x0_, fg) for b, x0_, fg, _ in blocks]
    g = torch.ones_like(x)
    for (block, _, fg, li), r in zip(reversed(blocks), reversed(rec)):
        g, pg = rc.backprop(block, fg, li, r, g)
        assert len(pg) == sum(len(s.conn) for s in block) and all(p is not None for p in pg)
    want = expected(len(sites), 3, fusion, 2)
    for i in range(len(sites)):
        assert per_site(counts, i) == want[i]


# ---------------------------------------------------------------- gradients
def grads(sites, x, mode, L_r, w):
    for s in sites:
        for p in s.parameters():
            p.grad = None
    x = x.clone().requires_grad_(True)
    out = rc.run_sites(sites, x, mode, L_r)
    (out * w).sum().backward()
    named = {f"{i}.{k}": p.grad for i, s in enumerate(sites) for k, p in s.named_parameters()}
    return out.detach(), x.grad, named


@pytest.mark.parametrize("method", ["mhc", "hc", "residual"])
def test_recompute_gradients_equal_no_recompute_in_fp64(method):
    """Against no recompute with every boundary apart: each mode, with the boundaries fused
    (mhc: within each recompute block, and across all sites without recompute) and apart."""
    model, sites = tiny_sites(method, layers=3, fusion=False)
    sites = sites[:5]                                    # blocks that do not divide evenly
    x = state(model)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=x.dtype)
    out0, gx0, gp0 = grads(sites, x, "none", 1, w)
    assert all(g is not None and g.abs().sum() > 0 for g in gp0.values())
    for fusion in (True, False):
        sites = tiny_sites(method, layers=3, fusion=fusion)[1][:5]
        assert rc.fused_boundaries(sites) is (fusion and method == "mhc")
        for mode, L_r in (("none", 1), ("mhc", 1), ("mhc", 2), ("mhc", 3), ("mhc", 5), ("mhc", 7),
                          ("full", 2), ("full", 5)):
            out, gx, gp = grads(sites, x, mode, L_r, w)
            assert torch.equal(out, out0), (fusion, mode, L_r)
            assert ((gx - gx0).norm() / gx0.norm()).item() < 1e-12, (fusion, mode, L_r)
            assert gp.keys() == gp0.keys()
            for name in gp0:
                err = ((gp[name] - gp0[name]).norm() / gp0[name].norm()).item()
                assert err < 1e-12, (fusion, mode, L_r, name, err)


def test_run_layers_is_run_sites_over_the_layers_sites():
    model, sites = tiny_sites("mhc", layers=3)
    x = state(model)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    out_s, gx_s, gp_s = grads(sites, x, "mhc", 4, w)
    for p in model.parameters():
        p.grad = None
    xl = x.clone().requires_grad_(True)
    with rc.RetainedBytes() as kept:
        out_l = rc.run_layers(list(model.layers), xl, "mhc", 4)   # L_r = 4 SITES: 2 blocks
    (out_l * w).sum().backward()
    assert kept.blocks == 2 and kept.sites == 6
    assert torch.equal(out_l, out_s) and torch.equal(xl.grad, gx_s)
    assert torch.no_grad()(rc.run_sites)(sites, x, "mhc", 4).equal(out_s)
    with pytest.raises(ValueError):
        rc.run_sites(sites, x, "some", 1)
    with pytest.raises(ValueError):
        rc.run_sites(sites, x, "mhc", 0)


# ---------------------------------------------------------------- Eq. 20 in sites
def test_memory_model_counts_sites():
    assert rs.memory_model(4, 10, 24, 4) == 4 * 10 * 6 + 6 * 10 * 4
    assert rs.memory_model(4, 10, 60, 6) == 4 * 10 * 10 + 6 * 10 * 6
    assert rs.memory_model(4, 10, 5, 2) == 4 * 10 * 3 + 6 * 10 * 2
    assert rs.retained_model(4, 10, 5, 2) == 4 * 10 * 3
    assert rs.retained_model(4, 10, 5, 2, f_outputs=True) == 4 * 10 * 3 + 10 * 5
    assert rs.transient_model(4, 10, 5, 2) == 6 * 10 * 2
    assert rs.transient_model(4, 10, 5, 9) == 6 * 10 * 5     # a block holds at most L sites
    for L, L_r in ((24, 4), (60, 6), (7, 3)):
        assert rs.memory_model(4, 8, L, L_r) == (rs.retained_model(4, 8, L, L_r)
                                                 + rs.transient_model(4, 8, L, L_r))
    assert rs.lr_star(4, 24) == 4.0
    assert rs.lr_star(4, 60) == pytest.approx(math.sqrt(40))
    assert rs.best_lr(4, 24) == 4            # 12 layers: 2 layers a block, as measured
    assert rs.best_lr(4, 60) == 6            # 30 layers: 3 layers a block, as measured
    assert rs.default_lr(4, 12) == 4 and rs.default_lr(4, 30) == 6
    # The integer argmin lies within 1 of sqrt(nL/(n+2)) except where two block lengths tie,
    # one on each side (the ceil makes the cost lumpy); ties go to the smaller, and the larger
    # one is then within 1. For n = 4 and L in 2..120 that happens at L = 55, 78, 97, 98, 105.
    tied = []
    for L in range(2, 121):
        best, star = rs.best_lr(4, L), rs.lr_star(4, L)
        costs = [rs.memory_model(4, 1, L, r) for r in range(1, L + 1)]
        argmin = [r for r in range(1, L + 1) if costs[r - 1] == min(costs)]
        assert best == argmin[0]
        assert min(abs(r - star) for r in argmin) < 1.0, L
        assert abs(best - star) < 1.5, L
        if abs(best - star) >= 1.0:
            assert len(argmin) == 2 and argmin[1] - star < 1.0
            tied.append(L)
    assert tied == [55, 78, 97, 98, 105]


# ---------------------------------------------------------------- what the blocks keep
@pytest.mark.parametrize("method,fusion", [("mhc", True), ("mhc", False), ("residual", True)])
def test_retained_bytes_equal_the_resident_model(method, fusion):
    """Only the block inputs and the F outputs are kept, boundaries fused or apart."""
    model, sites = tiny_sites(method, layers=3, fusion=fusion)          # 6 sites
    n, C, L, s = model.cfg.streams, model.cfg.C, len(sites), 8
    for L_r in (1, 2, 4, 6):
        x = state(model).requires_grad_(True)
        with rc.RetainedBytes() as kept:
            out = rc.run_sites(sites, x, "mhc", L_r)
        blocks = math.ceil(L / L_r)
        assert (kept.blocks, kept.sites) == (blocks, L)
        assert kept.x0_bytes == n * C * T * s * blocks == rs.retained_model(n, C, L, L_r) * T * s
        assert kept.f_bytes == C * T * s * L
        assert kept.total == rs.retained_model(n, C, L, L_r, f_outputs=True) * T * s
        out.sum().backward()
    x = state(model).requires_grad_(True)
    with rc.RetainedBytes() as kept:
        rc.run_sites(sites, x, "full", 4)
    assert (kept.x0_bytes, kept.f_bytes) == (n * C * T * s * 2, 0)
    with rc.RetainedBytes() as kept:
        rc.run_sites(sites, x, "none", 4)
        with torch.no_grad():
            rc.run_sites(sites, x, "mhc", 4)
    assert kept.total == 0 and kept.blocks == 0
    rc.run_sites(sites, x, "mhc", 4)                     # nothing counted outside the context
    assert kept.total == 0


def test_saved_bytes_still_counts_the_block_inputs():
    """SavedBytes (autograd's saved tensors) sees one x0 [T, n, C] per block more for shorter
    blocks, as the resident term says, and not a byte more with the boundaries fused."""
    totals = {}
    for fusion in (True, False):
        model, sites = tiny_sites("mhc", layers=3, fusion=fusion)
        x = state(model).requires_grad_(True)
        for L_r in (1, 6):
            with rc.SavedBytes() as saved:
                rc.run_sites(sites, x, "mhc", L_r)
            totals[fusion, L_r] = saved.total
    n, C = model.cfg.n, model.cfg.C
    assert totals[True, 1] - totals[True, 6] == (rs.retained_model(n, C, 6, 1)
                                                 - rs.retained_model(n, C, 6, 6)) * T * 8
    assert totals[True, 6] == totals[False, 6] and totals[True, 1] == totals[False, 1]


# ---------------------------------------------------------------- site link (fused backends)
class ToySite(torch.nn.Module):
    """A Site-shaped module (pre, F, post, conn) on the toy ops, linked or plain."""

    def __init__(self, n, C, linked, gen):
        super().__init__()
        self.linked = linked
        self.conn = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))])
        self.lin = torch.nn.Parameter(torch.randn(C, C, generator=gen, dtype=torch.float64) / C ** 0.5)

    def pre(self, x):
        (w,) = self.conn
        if not self.linked:
            return (x * w[:, None]).sum(1), None, x.mean(-1, keepdim=True).expand(-1, -1, x.shape[1])
        li, h_res = linked_toy.pre(x, w)      # the fused backends' link protocol, in torch
        return li, None, h_res

    def F(self, li):
        return torch.tanh(li @ self.lin)

    def post(self, x, f, h_post, h_res):
        if not self.linked:
            return h_res @ x + f[:, None, :]
        return linked_toy.post(x, f, h_res)

    def forward(self, x):
        li, h_post, h_res = self.pre(x)
        return self.post(x, self.F(li), h_post, h_res)


def test_post_dx_goes_through_the_site_link_under_mhc_recompute(monkeypatch):
    """With a fused backend, pre's backward adds post's dx in its own kernel (site link); under
    mhc recompute backprop hands it over itself (post sees a detached h_res and cannot claim the
    link), once per site, and the gradients stay those of no recompute."""
    n, C, S = 3, 8, 5
    puts, takes = [], []
    real_put, real_take = site_link.SiteLink.put, site_link.SiteLink.take
    monkeypatch.setattr(site_link.SiteLink, "put", lambda self, dx: (puts.append(1), real_put(self, dx))[1])

    def take(self):
        dx = real_take(self)
        takes.append(dx is not None)
        return dx
    monkeypatch.setattr(site_link.SiteLink, "take", take)

    def run(linked, mode, L_r):
        sites = [ToySite(n, C, linked, torch.Generator().manual_seed(i)) for i in range(S)]
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(6, n, C, generator=gen, dtype=torch.float64).requires_grad_(True)
        out = rc.run_sites(sites, x, mode, L_r)
        (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum().backward()
        return [x.grad] + [p.grad for s in sites for p in s.parameters()]

    ref = run(False, "none", 1)
    for linked, mode, L_r in ((True, "none", 1), (True, "mhc", 2), (True, "mhc", 5),
                              (False, "mhc", 2)):
        puts.clear()
        takes.clear()
        got = run(linked, mode, L_r)
        for a, b in zip(got, ref):
            assert ((a - b).norm() / b.norm()).item() < 1e-12, (linked, mode, L_r)
        assert len(puts) == sum(takes) == (S if linked else 0), (linked, mode, L_r)


# ---------------------------------------------------------------- boundary link (fused backends)
class _LinkedPostCoeffs(torch.autograd.Function):
    """The reference's fused boundary with the fused backends' boundary link
    (kernels/boundary_link.py): its backward takes layer_input's gradient from the link."""

    @staticmethod
    def forward(ctx, x, f, h_post, h_res, phi, b, alpha, iters, holder):
        ctx.save_for_backward(x, f, h_post, h_res, phi, b, alpha)
        ctx.iters, ctx.holder = iters, holder
        return reference.mhc_post_coeffs(x, f, h_post, h_res, phi, b, alpha, iters)

    @staticmethod
    def backward(ctx, *grads):
        g_li = ctx.holder[0].take() if ctx.holder[0] is not None else None
        ins = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            outs = list(reference.mhc_post_coeffs(*ins, ctx.iters))
            grads = list(grads)
            if g_li is not None:
                outs.append(reference.apply_pre(outs[0], outs[1]))
                grads.append(g_li)
            outs, grads = zip(*[(o, g) for o, g in zip(outs, grads) if g is not None])
            return (*torch.autograd.grad(outs, ins, grads, allow_unused=True), None, None)


class _LinkedApplyPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre, link):
        ctx.save_for_backward(x, h_pre)
        ctx.link = link
        return reference.apply_pre(x, h_pre)

    @staticmethod
    def backward(ctx, g):
        if boundary_link.hand_over(ctx, ctx.link, g):
            return None, None, None
        ins = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            return (*torch.autograd.grad(reference.apply_pre(*ins), ins, g), None)


def linked_post_coeffs(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters=20):
    holder = [None]
    out = _LinkedPostCoeffs.apply(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters, holder)
    if torch.is_grad_enabled() and out[0].requires_grad:
        holder[0] = boundary_link.attach(out[0], out[1])
    return out


def linked_apply_pre(x, h_pre):
    return _LinkedApplyPre.apply(x, h_pre, boundary_link.claim(x, h_pre))


def test_layer_input_gradient_goes_through_the_boundary_link_under_mhc_recompute(monkeypatch):
    """With a backend whose fused boundary has the boundary link, mhc recompute puts layer_input's
    gradient in the link itself (under torch.autograd.grad the boundary's inputs are all leaves,
    where apply_pre would keep it), once per fused boundary, and replays no layer_input; the
    gradients stay those of no recompute with the boundaries apart."""
    puts = []
    real_put = boundary_link.BoundaryLink.put
    monkeypatch.setattr(boundary_link.BoundaryLink, "put",
                        lambda self, g: (puts.append(1), real_put(self, g))[1])
    model, sites = tiny_sites("mhc", layers=3, fusion=False)
    x = state(model)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    out0, gx0, gp0 = grads(sites, x, "none", 1, w)
    model, sites = tiny_sites("mhc", layers=3)
    applied = []
    linked = dataclasses.replace(sites[0].ops, post_coeffs=linked_post_coeffs,
                                 apply_pre=lambda *a: (applied.append(1), linked_apply_pre(*a))[1])
    for site in sites:
        site.ops = linked
    for mode, L_r in (("none", 1), ("mhc", 2), ("mhc", 4), ("mhc", 6)):
        puts.clear()
        applied.clear()
        out, gx, gp = grads(sites, x, mode, L_r, w)
        boundaries = sum(len(b) - 1 for b in rc.site_blocks(sites, L_r if mode == "mhc" else 6))
        assert len(puts) == len(applied) == boundaries, (mode, L_r)
        assert torch.equal(out, out0)
        assert ((gx - gx0).norm() / gx0.norm()).item() < 1e-12, (mode, L_r)
        for name in gp0:
            err = ((gp[name] - gp0[name]).norm() / gp0[name].norm()).item()
            assert err < 1e-12, (mode, L_r, name, err)


def test_mhc_recompute_reaches_F_when_only_F_needs_gradients():
    """A residual block (no connection parameters) on an x without grad: F's weights still get
    their gradients."""
    model, sites = tiny_sites("residual", layers=1)
    x = state(model)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    ref = {}
    for mode in ("none", "mhc"):
        for p in model.parameters():
            p.grad = None
        (rc.run_sites(sites, x, mode, 2) * w).sum().backward()
        got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        ref = ref or got
        assert got.keys() == ref.keys() and len(got) == sum(
            1 for s in sites for _ in s.sublayer.parameters())
        for k in ref:
            assert torch.allclose(got[k], ref[k], rtol=1e-12, atol=0)
