"""Properties of the reference (the oracle): Sinkhorn, HC init, n = 1 reductions, fp64 gradcheck."""
import pytest
import torch

from kernels import reference as ref


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sinkhorn_rows_sum_to_one_and_columns_nearly():
    for n in (1, 2, 3, 4, 8):
        for scale in (1.0, 3.0):
            logits = torch.randn(64, n, n, generator=gen(n), dtype=torch.float64) * scale
            h = ref.sinkhorn(logits, 20)
            assert (h.sum(-1) - 1).abs().max() < 1e-5       # the last step normalises rows
            assert (h >= 0).all()
        # Columns converge, but 20 iterations leave a few % at large logits; at O(1) logits:
        h = ref.sinkhorn(torch.randn(64, n, n, generator=gen(n), dtype=torch.float64), 20)
        assert (h.sum(-2) - 1).abs().max() < 1e-3


def test_sinkhorn_is_shift_invariant_per_matrix():
    logits = torch.randn(8, 4, 4, generator=gen(), dtype=torch.float64)
    a = ref.sinkhorn(logits, 20)
    b = ref.sinkhorn(logits + 7.5, 20)
    assert torch.allclose(a, b, atol=1e-12)


def test_mhc_n1_is_a_gated_residual():
    T, C = 16, 24
    x = torch.randn(T, 1, C, generator=gen(), dtype=torch.float64)
    f = torch.randn(T, C, generator=gen(1), dtype=torch.float64)
    phi, b, alpha = [p.double() for p in ref.random_params("mhc", 1, C, gen(2))]
    h_pre, h_post, h_res = ref.mhc_coeffs(x, phi, b, alpha)
    assert (h_res - 1).abs().max() < 3e-6
    layer_input, _, _ = ref.mhc_pre(x, phi, b, alpha)
    assert torch.allclose(layer_input, h_pre * x[:, 0])
    x_next = ref.post(x, f, h_post, h_res)
    assert torch.allclose(x_next[:, 0], h_res[:, 0] * x[:, 0] + h_post * f)
    assert ((0 < h_pre) & (h_pre < 1)).all() and ((0 < h_post) & (h_post < 2)).all()


def test_hc_n1_at_init_is_the_residual_connection():
    T, C = 8, 16
    x = torch.randn(T, 1, C, generator=gen(), dtype=torch.float64)
    f = torch.randn(T, C, generator=gen(1), dtype=torch.float64)
    w, b, s = [p.double() for p in ref.init_params("hc", 1, C)]
    layer_input, h_post, h_res = ref.hc_pre(x, w, b, s)
    assert torch.equal(layer_input, x[:, 0])
    assert torch.equal(ref.post(x, f, h_post, h_res), ref.residual_post(x, f))


@pytest.mark.parametrize("n, site", [(2, 0), (4, 1), (4, 6)])
def test_hc_at_init_is_a_prenorm_residual_on_every_stream(n, site):
    T, C = 8, 16
    stream = torch.randn(T, 1, C, generator=gen(), dtype=torch.float64)
    x = stream.expand(T, n, C).contiguous()          # the embedding copied into every stream
    f = torch.randn(T, C, generator=gen(1), dtype=torch.float64)
    w, b, s = [p.double() for p in ref.init_params("hc", n, C, site_index=site)]
    layer_input, h_post, h_res = ref.hc_pre(x, w, b, s)
    assert torch.equal(layer_input, x[:, site % n])
    x_next = ref.post(x, f, h_post, h_res)
    assert torch.allclose(x_next, (stream[:, 0] + f).unsqueeze(1).expand(T, n, C))


def test_hc_source_stream_fills_its_column():
    n, C = 3, 8
    x = torch.randn(1, n, C, generator=gen(), dtype=torch.float64)
    w, b, s = [p.double() for p in ref.random_params("hc", n, C, gen(1))]
    _, _, h_res = ref.hc_coeffs(x, w, b, s)
    xn = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + ref.EPS_RMS)
    for i in range(n):           # source
        for j in range(n):       # destination
            want = s[0] * torch.tanh(xn[0, i] @ w[:, 2 + j]) + b[2 * n + j * n + i]
            assert torch.allclose(h_res[0, j, i], want)


def test_mhc_identity_init_starts_near_the_identity():
    n, C = 4, 16
    x = torch.randn(32, n, C, generator=gen(), dtype=torch.float64)
    phi, b, alpha = [p.double() for p in ref.init_params("mhc", n, C, identity_init=True,
                                                          generator=gen(1))]
    _, _, h_res = ref.mhc_coeffs(x, phi, b, alpha)
    assert (h_res.diagonal(dim1=-2, dim2=-1) > 0.9).all()


def test_reference_computes_in_fp32_for_bf16_and_returns_state_dtype():
    n, C = 4, 16
    x = torch.randn(8, n, C, generator=gen()).to(torch.bfloat16)
    params = ref.random_params("mhc", n, C, gen(1))
    li, hp, hr = ref.mhc_pre(x, *params)
    assert li.dtype == torch.bfloat16 and hp.dtype == torch.float32 and hr.dtype == torch.float32


def _double(params):
    return tuple(p.double().requires_grad_() for p in params)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_gradcheck_mhc(n):
    C, T = 4, 3
    x = torch.randn(T, n, C, generator=gen(), dtype=torch.float64, requires_grad=True)
    params = _double(ref.random_params("mhc", n, C, gen(1)))
    assert torch.autograd.gradcheck(lambda *a: ref.mhc_coeffs(*a, sinkhorn_iters=5), (x, *params))
    assert torch.autograd.gradcheck(lambda *a: ref.mhc_pre(*a, sinkhorn_iters=5), (x, *params))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_gradcheck_hc(n):
    C, T = 4, 3
    x = torch.randn(T, n, C, generator=gen(), dtype=torch.float64, requires_grad=True)
    params = _double(ref.random_params("hc", n, C, gen(1)))
    assert torch.autograd.gradcheck(ref.hc_coeffs, (x, *params))
    assert torch.autograd.gradcheck(ref.hc_pre, (x, *params))


@pytest.mark.parametrize("n", [1, 3])
def test_gradcheck_post_and_residual(n):
    T, C = 3, 5
    x = torch.randn(T, n, C, generator=gen(), dtype=torch.float64, requires_grad=True)
    f = torch.randn(T, C, generator=gen(1), dtype=torch.float64, requires_grad=True)
    h_post = torch.rand(T, n, generator=gen(2), dtype=torch.float64, requires_grad=True)
    h_res = torch.rand(T, n, n, generator=gen(3), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ref.post, (x, f, h_post, h_res))
    x1 = torch.randn(T, 1, C, generator=gen(4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ref.residual_post, (x1, f))
    assert torch.autograd.gradcheck(lambda a: ref.residual_pre(a)[0], (x1,))


def test_residual_pre_rejects_several_streams():
    with pytest.raises(ValueError, match=r"\[T, 1, C\]"):
        ref.residual_pre(torch.randn(2, 3, 4))


def test_random_params_are_seeded_and_never_zero():
    for method, n in (("mhc", 4), ("hc", 4)):
        a = ref.random_params(method, n, 16, gen(5))
        b = ref.random_params(method, n, 16, gen(5))
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)
            assert (pa != 0).float().mean() > 0.5
