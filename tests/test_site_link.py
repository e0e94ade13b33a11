"""kernels/site_link.py on its own: a toy pre and post (plain torch) that use the link exactly as
the fused backends do, against the same functions without the link. The toy's x gradient only
comes out right if post's share travels through the link and pre adds it."""
import pytest
import torch

from kernels import site_link


class _Pre(torch.autograd.Function):
    """layer_input = sum_i x[i] * w[i], h_res = mean_c x * 1 (an [T, n, n] stand-in)."""

    @staticmethod
    def forward(ctx, x, w, holder):
        ctx.save_for_backward(x, w)
        ctx.holder = holder
        h_res = x.mean(-1, keepdim=True).expand(-1, -1, x.shape[1]).contiguous()
        return (x * w[:, None]).sum(1), h_res

    @staticmethod
    def backward(ctx, g_li, g_res):
        x, w = ctx.saved_tensors
        acc = site_link.accumulator(ctx.holder[0], x)
        dx = torch.zeros_like(x) if acc is None else acc
        if g_li is not None:
            dx.add_(g_li[:, None, :] * w[:, None])
        if g_res is not None:
            dx.add_(g_res.sum(-1, keepdim=True) / x.shape[-1])
        dw = (g_li[:, None, :] * x).sum((0, 2)) if g_li is not None else None
        return dx, dw, None


class _Post(torch.autograd.Function):
    """x_next = h_res @ x + f."""

    @staticmethod
    def forward(ctx, x, f, h_res, link):
        ctx.save_for_backward(x, h_res)
        ctx.link = link
        return h_res @ x + f[:, None, :]

    @staticmethod
    def backward(ctx, g):
        x, h_res = ctx.saved_tensors
        dx = h_res.transpose(-1, -2) @ g
        dx = site_link.hand_over(ctx, ctx.link, dx, 2)
        return dx, g.sum(1), g @ x.transpose(-1, -2), None


def pre(x, w):
    holder = [None]
    li, h_res = _Pre.apply(x, w, holder)
    if torch.is_grad_enabled() and x.requires_grad:
        holder[0] = site_link.attach(h_res, x)
    return li, h_res


def post(x, f, h_res):
    return _Post.apply(x, f, h_res, site_link.claim(h_res, x))


def plain_pre(x, w):
    return (x * w[:, None]).sum(1), x.mean(-1, keepdim=True).expand(-1, -1, x.shape[1])


def plain_post(x, f, h_res):
    return h_res @ x + f[:, None, :]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 8, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    f = torch.randn(5, 8, generator=g, dtype=torch.float64).requires_grad_()
    return x, w, f


def _site(pre_fn, post_fn, x, w, f, posts=1):
    li, h_res = pre_fn(x, w)
    y = sum(post_fn(x, f, h_res) for _ in range(posts))
    return li, y


@pytest.mark.parametrize("posts", (1, 2))
def test_linked_site_matches_plain(posts, monkeypatch):
    puts = []
    real_put = site_link.SiteLink.put
    monkeypatch.setattr(site_link.SiteLink, "put", lambda self, dx: (puts.append(1), real_put(self, dx)))
    x, w, f = _inputs()
    gl, gy = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 3, 8, dtype=torch.float64)
    li, y = _site(pre, post, x, w, f, posts)
    got = torch.autograd.grad([li, y], [x, w, f], [gl, gy])
    li2, y2 = _site(plain_pre, plain_post, x, w, f, posts)
    want = torch.autograd.grad([li2, y2], [x, w, f], [gl, gy])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert len(puts) == 1          # only the first post on an h_res is linked


def test_gradient_for_f_alone_leaves_nothing_behind():
    """A backward that needs only f runs post's backward without pre's: dx must not be parked in
    the link, or a later backward through pre alone would add it."""
    x, w, f = _inputs(1)
    li, y = _site(pre, post, x, w, f)
    gy = torch.randn_like(y)
    (df,) = torch.autograd.grad(y, f, gy, retain_graph=True)
    torch.testing.assert_close(df, gy.sum(1))
    gl = torch.randn_like(li)
    (dx,) = torch.autograd.grad(li, x, gl, retain_graph=True)
    x2 = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(plain_pre(x2, w)[0], x2, gl)
    torch.testing.assert_close(dx, want)
    # and the whole site afterwards is still right
    got = torch.autograd.grad([li, y], [x], [gl, gy])[0]
    li2, y2 = _site(plain_pre, plain_post, x2, w, f)
    torch.testing.assert_close(got, torch.autograd.grad([li2, y2], [x2], [gl, gy])[0])


def test_other_x_or_detached_h_res_is_not_linked():
    x, w, f = _inputs(2)
    li, h_res = pre(x, w)
    assert site_link.claim(h_res, x.detach().requires_grad_()) is None
    assert site_link.claim(h_res.detach(), x) is None
    assert site_link.claim(h_res, x) is not None
    assert site_link.claim(h_res, x) is None          # claimed once
    with torch.no_grad():
        _, h_nograd = pre(x, w)
    assert site_link.claim(h_nograd, x) is None
