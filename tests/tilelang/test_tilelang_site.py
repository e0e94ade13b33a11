"""A whole site with backend tilelang: pre (mhc_pre / hc_pre) and post (F_post,res) of the same x
through autograd, so x gets two gradients. With the site link (kernels/site_link.py) post's dx is
handed to pre's backward, whose dx kernel adds its own into it in place (no separate add); these
tests check that the link is used (SiteLink.put is counted) and that every gradient, both x
gradients summed, matches the fp64 reference.

CPU ("c" target, fp16) or GPU: TileLang's post with a toy pre (plain torch, using the link as a
fused pre does): the post side of the link, a second post on the same h_res (not linked), a post
whose h_res carries no link. GPU (`gpu`): mhc_pre / hc_pre with post, on the tile dx kernel
(C a multiple of 64) and the row kernel (C = 264, n = 3), against the reference on the weight the
GEMMs use (mhc_pre.phi_as_used), as tests/pre_check.py does.
"""
import importlib

import pytest
import torch

from kernels import reference as ref, site_link
from suite.core.tolerance import rel_err, tolerance

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16


def _post():
    return importlib.import_module("kernels.tilelang.post").post


@pytest.fixture
def puts(monkeypatch):
    """Shapes of the dx tensors posts hand over through a link."""
    seen = []
    real = site_link.SiteLink.put
    monkeypatch.setattr(site_link.SiteLink, "put",
                        lambda self, dx: (seen.append(tuple(dx.shape)), real(self, dx))[1])
    return seen


# ------------------------------------------------------------------ toy pre, CPU or GPU
class _ToyPre(torch.autograd.Function):
    """h_res[t, i, j] = mean_c x[t, j, c] in fp32: an h_res that depends on x, linked to x the way
    the fused pres do it (holder filled after apply, accumulator taken first in backward)."""

    @staticmethod
    def forward(ctx, x, holder):
        ctx.save_for_backward(x)
        ctx.holder = holder
        n = x.shape[1]
        return x.float().mean(-1)[:, None, :].expand(-1, n, -1).contiguous()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        acc = site_link.accumulator(ctx.holder[0], x)
        d = (g.sum(1) / x.shape[-1])[:, :, None].expand_as(x).to(x.dtype)
        if acc is None:
            return d.contiguous(), None
        return acc.add_(d), None


def _toy_pre(x, link=True):
    holder = [None]
    h_res = _ToyPre.apply(x, holder)
    if link:
        holder[0] = site_link.attach(h_res, x)
    return h_res


def _toy_inputs(T, n, C, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, C, generator=g).to(DTYPE)
    fs = [torch.randn(T, C, generator=g).to(DTYPE) for _ in range(2)]
    h_post = 2 * torch.sigmoid(torch.randn(T, n, generator=g))
    ups = [torch.randn(T, n, C, generator=g).to(DTYPE) for _ in range(2)]
    return x, fs, h_post, ups


def _toy_site(T, n, C, posts, link=True, seed=0):
    """(x gradient, f gradients, h_post gradient) of sum_k post(x, f_k, h_post, h_res(x)) with
    the tilelang post, and the same in fp64 with the reference post."""
    x, fs, h_post, ups = _toy_inputs(T, n, C, seed)
    leaves = [t.to(DEVICE).clone().requires_grad_() for t in (x, *fs[:posts], h_post)]
    xl, fl, hp = leaves[0], leaves[1:1 + posts], leaves[-1]
    h_res = _toy_pre(xl, link)
    outs = [_post()(xl, f, hp, h_res) for f in fl]
    got = torch.autograd.grad(outs, leaves, [u.to(DEVICE) for u in ups[:posts]])
    ref_leaves = [t.double().requires_grad_() for t in (x, *fs[:posts], h_post)]
    rx = ref_leaves[0]
    rh = rx.mean(-1)[:, None, :].expand(-1, n, -1)
    routs = [ref.post(rx, f, ref_leaves[-1], rh) for f in ref_leaves[1:1 + posts]]
    want = torch.autograd.grad(routs, ref_leaves, [u.double() for u in ups[:posts]])
    return got, want


def _assert_close(got, want, names, dtype=DTYPE, label=""):
    tol = tolerance(dtype)
    errs = {nm: rel_err(a, b) for nm, a, b in zip(names, got, want)}
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= tol}
    assert not bad, f"{label}above {tol}: {bad} (all {errs})"


@pytest.mark.parametrize("n,C,T", [(4, 264, 5), (1, 40, 3), (3, 40, 7)])
def test_post_hands_dx_to_linked_pre(n, C, T, puts):
    got, want = _toy_site(T, n, C, posts=1)
    _assert_close(got, want, ("dx", "df", "dh_post"))
    assert puts == [(T, n, C)], "post's x gradient did not go through the link"


def test_second_post_on_one_h_res_is_not_linked(puts):
    T, n, C = 5, 4, 264
    got, want = _toy_site(T, n, C, posts=2)
    _assert_close(got, want, ("dx", "df0", "df1", "dh_post"))
    assert puts == [(T, n, C)], "exactly the first post hands its dx over"


def test_post_without_link(puts):
    T, n, C = 3, 2, 264
    got, want = _toy_site(T, n, C, posts=1, link=False)
    _assert_close(got, want, ("dx", "df", "dh_post"))
    assert puts == []


def test_post_other_x_not_linked(puts):
    """A post given a different x object than the pre's (even with equal values) is not linked."""
    T, n, C = 3, 4, 40
    x, fs, h_post, ups = _toy_inputs(T, n, C, 1)
    x1 = x.to(DEVICE).clone().requires_grad_()
    x2 = x.to(DEVICE).clone().requires_grad_()
    h_res = _toy_pre(x1)
    out = _post()(x2, fs[0].to(DEVICE), h_post.to(DEVICE), h_res)
    _, g2 = torch.autograd.grad(out, [x1, x2], ups[0].to(DEVICE))
    assert puts == []
    rx = x.double()
    want2 = torch.einsum("tij,tic->tjc", rx.mean(-1)[:, None, :].expand(-1, n, -1),
                         ups[0].double())
    assert rel_err(g2, want2) <= tolerance(DTYPE)


# ------------------------------------------------------------------ GPU: the fused pres
def _params(method, n, C, g):
    return [t.cuda() for t in ref.random_params(method, n, C, g)]


def _site_grads(method, n, C, T, posts, seed):
    """Gradients of (layer_input, h_post, h_res, x_next per post) with random upstream gradients:
    tilelang (bf16) and the fp64 reference on the GEMM weight as used. Returns (got, want, names)."""
    mod = importlib.import_module("kernels.tilelang.mhc_pre" if method == "mhc"
                                  else "kernels.tilelang.hc_pre")
    pre = mod.mhc_pre if method == "mhc" else mod.hc_pre
    ref_pre = ref.mhc_pre if method == "mhc" else ref.hc_pre
    phi_as_used = importlib.import_module("kernels.tilelang.mhc_pre").phi_as_used
    g = torch.Generator().manual_seed(seed)
    params = _params(method, n, C, g)
    x = torch.randn(T, n, C, generator=g).to(torch.bfloat16).cuda()
    fs = [torch.randn(T, C, generator=g).to(torch.bfloat16).cuda() for _ in range(posts)]
    ups = [torch.randn(T, C, generator=g), torch.randn(T, n, generator=g),
           torch.randn(T, n, n, generator=g)] + [torch.randn(T, n, C, generator=g)
                                                 for _ in range(posts)]
    ups = [u.cuda() for u in ups]

    leaves = [t.clone().requires_grad_() for t in (x, *params, *fs)]
    xl, pl, fl = leaves[0], leaves[1:4], leaves[4:]
    li, h_post, h_res = pre(xl, *pl)
    outs = [li, h_post, h_res] + [_post()(xl, f, h_post, h_res) for f in fl]
    got = torch.autograd.grad(outs, leaves, [u.to(o.dtype) for u, o in zip(ups, outs)])

    rl = [t.detach().double().requires_grad_() for t in (x, *params, *fs)]
    rx, rp, rf = rl[0], list(rl[1:4]), rl[4:]
    rp_in = list(rp)
    rp_in[0] = rp[0] + (phi_as_used(params[0], torch.bfloat16).double() - rp[0]).detach()
    rli, rhp, rhr = ref_pre(rx, *rp_in)
    routs = [rli, rhp, rhr] + [ref.post(rx, f, rhp, rhr) for f in rf]
    want = torch.autograd.grad(routs, rl, [u.double() for u in ups])
    names = ["dx", "dw", "db", "dscale"] + [f"df{k}" for k in range(posts)]
    return got, want, names


SITE_CASES = [("mhc", 4, 2560, 37), ("mhc", 4, 2560, 1), ("mhc", 3, 264, 5),
              ("hc", 4, 2560, 37), ("hc", 3, 264, 5), ("hc", 2, 264, 17)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method,n,C,T", SITE_CASES, ids=[f"{m}-n{n}-C{C}-T{T}" for m, n, C, T in SITE_CASES])
def test_gpu_site(method, n, C, T, puts):
    got, want, names = _site_grads(method, n, C, T, 1, seed=n * 31 + T)
    _assert_close(got, want, names, torch.bfloat16, f"{method} n={n} C={C} T={T}: ")
    assert puts == [(T, n, C)], "post's x gradient did not go through the link"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["mhc", "hc"])
def test_gpu_site_two_posts_share_h_res(method, puts):
    n, C, T = 4, 2560, 17
    got, want, names = _site_grads(method, n, C, T, 2, seed=11)
    _assert_close(got, want, names, torch.bfloat16, f"{method} two posts: ")
    assert puts == [(T, n, C)], "exactly the first post hands its dx over"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["mhc", "hc"])
def test_gpu_site_only_post_output_used(method, puts):
    """Only x_next gets a gradient: pre's backward still runs (through h_post / h_res) and its dx
    kernel adds into post's handed-over dx; and with only x's gradient asked for."""
    n, C, T = 4, 2560, 37
    mod = importlib.import_module("kernels.tilelang.mhc_pre" if method == "mhc"
                                  else "kernels.tilelang.hc_pre")
    pre = mod.mhc_pre if method == "mhc" else mod.hc_pre
    ref_pre = ref.mhc_pre if method == "mhc" else ref.hc_pre
    phi_as_used = importlib.import_module("kernels.tilelang.mhc_pre").phi_as_used
    g = torch.Generator().manual_seed(5)
    params = _params(method, n, C, g)
    x = torch.randn(T, n, C, generator=g).to(torch.bfloat16).cuda()
    f = torch.randn(T, C, generator=g).to(torch.bfloat16).cuda()
    up = torch.randn(T, n, C, generator=g).to(torch.bfloat16).cuda()
    xl = x.clone().requires_grad_()
    pl = [p.clone().requires_grad_() for p in params]
    _, h_post, h_res = pre(xl, *pl)
    (dx,) = torch.autograd.grad(_post()(xl, f, h_post, h_res), [xl], up)
    rx = x.double().requires_grad_()
    rp = [p.double() for p in params]
    rp[0] = phi_as_used(params[0], torch.bfloat16).double()
    _, rhp, rhr = ref_pre(rx, *rp)
    (want,) = torch.autograd.grad(ref.post(rx, f.double(), rhp, rhr), [rx], up.double())
    assert rel_err(dx, want) <= tolerance(torch.bfloat16)
    assert puts == [(T, n, C)]


# ------------------------------------------------------------------ GPU: the dx / dphi kernel alone
# (n, C, T, hc, has_li, acc, dtype): tile kernel (n = 8: KP = 80; n = 1; HC with a column tail at
# C = 264; fp16) and row kernel (mHC at C = 264), with and without g_li and the in-place add
DX_CASES = [(8, 2560, 67, False, True, False, "bf16"), (1, 4096, 1, False, True, True, "bf16"),
            (2, 7168, 33, False, False, False, "fp16"), (8, 264, 9, True, True, True, "bf16"),
            (1, 2560, 5, True, True, True, "bf16"), (4, 4096, 129, True, False, True, "fp16"),
            (3, 264, 7, False, True, True, "fp16")]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,C,T,hc,has_li,acc,dt", DX_CASES,
                         ids=[f"{'hc' if c[3] else 'mhc'}-n{c[0]}-C{c[1]}-T{c[2]}-li{int(c[4])}"
                              f"-acc{int(c[5])}-{c[6]}" for c in DX_CASES])
def test_gpu_dx_dphi(n, C, T, hc, has_li, acc, dt):
    m = importlib.import_module("kernels.tilelang.mhc_pre")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
    g = torch.Generator(device="cuda").manual_seed(n * 1000 + T)
    K = n + 2 if hc else n * n + 2 * n
    rows, D = (T * n, C) if hc else (T, n * C)
    x = torch.randn(T, n, C, generator=g, device="cuda").to(dtype)
    g_li = torch.randn(T, C, generator=g, device="cuda").to(dtype) if has_li else None
    a = torch.randn(T, n, C, generator=g, device="cuda").to(dtype) if acc else None
    h_pre = torch.sigmoid(torch.randn(T, n, generator=g, device="cuda"))
    phi = 0.02 * torch.randn(D, K, generator=g, device="cuda")
    du = 1e-3 * torch.randn(rows, K, generator=g, device="cuda")
    coef = 1e-4 * torch.randn(rows, generator=g, device="cuda")
    x2 = x.reshape(rows, D).double()
    want_phi = x2.t() @ du.double()
    want = (du.double() @ m.phi_as_used(phi, dtype).double().t()
            + coef.double()[:, None] * x2).view(T, n, C)
    if has_li:
        want += h_pre.double()[:, :, None] * g_li.double()[:, None, :]
    if acc:
        want += a.double()
    ptr = a.data_ptr() if acc else None
    dx, dphi = m.dx_dphi(x, phi, du, coef, h_pre, g_li, True, hc=hc, acc=a)
    assert rel_err(dx, want) <= tolerance(dtype) and rel_err(dphi, want_phi) <= 1e-4
    assert not acc or dx.data_ptr() == ptr, "dx was not accumulated in place"


# ------------------------------------------------------------------ the dx kernel's input pass
@pytest.mark.parametrize("n,T,hc", [(4, 37, False), (1, 5, False), (8, 3, False), (3, 7, True),
                                    (4, 1, True)])
def test_dx_prep_matches_torch_split(n, T, hc):
    """build_dx_prep (CPU "c" target or GPU) gives the torch split's du_hi, du_lo and inv_scale
    bit for bit, and rowc = coef, h_pre (mHC transposed), zeros past the rows."""
    m = importlib.import_module("kernels.tilelang.mhc_pre")
    g = torch.Generator().manual_seed(n * 7 + T)
    K = n + 2 if hc else n * n + 2 * n
    rows = T * n if hc else T
    du = (1e-3 * torch.randn(rows, K, generator=g)).to(DEVICE)
    coef = torch.randn(rows, generator=g).to(DEVICE)
    h_pre = torch.rand(T, n, generator=g).to(DEVICE)
    hi, lo, inv, rowc = m.dx_prep(du, coef, h_pre, DTYPE, hc)
    hi_t, lo_t, inv_t = m._du_split(du, DTYPE, m.kp(n, hc))
    assert torch.equal(inv, inv_t)
    assert torch.equal(hi, hi_t) and torch.equal(lo, lo_t)
    assert torch.equal(rowc[0, :rows], coef)
    want = h_pre.reshape(1, rows) if hc else h_pre.t()
    assert torch.equal(rowc[1:, :rows], want)
    assert (rowc[:, rows:] == 0).all()
