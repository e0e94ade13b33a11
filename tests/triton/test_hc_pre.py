"""kernels.triton.hc_pre (HC: per-stream RMSNorm, tanh projections, F_pre) against the fp64 reference.

Forward outputs and every gradient (x, w, b, s) of hc_pre and hc_coeffs are compared with
kernels.reference on float64 copies of the same inputs, norm-wise (suite.core.tolerance). Without a GPU
the kernels run in the Triton interpreter (tests/conftest.py) on small shapes, with the interpreter's
tiling (big token blocks, few programs); one case also runs the GPU tiling. The `gpu` cases run the
compiled kernels on the widths the benchmarks use.
"""
import importlib

import pytest
import torch

from kernels import reference, site_link
from suite.core.tolerance import rel_err, tolerance

H = importlib.import_module("kernels.triton.hc_pre")   # the package re-exports the function hc_pre

DTYPES = (torch.bfloat16, torch.float16)
FNS = {"hc_pre": (H.hc_pre, reference.hc_pre), "hc_coeffs": (H.hc_coeffs, reference.hc_coeffs)}
OUT_NAMES = {"hc_pre": ("layer_input", "h_post", "h_res"), "hc_coeffs": ("h_pre", "h_post", "h_res")}
# The GPU tiling (small token blocks, many programs), forced on the interpreter for one case.
GPU_TILING = {k: v for k, v in H.DEFAULT_CONFIG.items() if k in H.INTERPRETER_CONFIG}


def make_inputs(T, n, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed * 100003 + T * 1009 + n * 101 + C)
    w, b, s = reference.random_params("hc", n, C, g)
    x = torch.randn(T, n, C, generator=g).to(dtype)
    return [t.to(device) for t in (x, w, b, s)], g


def check(fn_name, T, n, C, dtype, device, config=None, needs=(True, True, True, True), seed=0,
          skip_grads=()):
    """Runs one case; returns {name: error}. needs: which of (x, w, b, s) require grad."""
    fn, ref_fn = FNS[fn_name]
    (x, w, b, s), g = make_inputs(T, n, C, dtype, device, seed)
    ins = [t.clone().requires_grad_(need) for t, need in zip((x, w, b, s), needs)]
    outs = fn(*ins, config=config)
    names = OUT_NAMES[fn_name]
    want_shapes = {"layer_input": (T, C), "h_pre": (T, n), "h_post": (T, n), "h_res": (T, n, n)}
    for name, o in zip(names, outs):
        assert tuple(o.shape) == want_shapes[name], name
        assert o.dtype == (dtype if name == "layer_input" else torch.float32), name
        assert o.device == x.device, name
    ups = [torch.randn(o.shape, generator=g).to(o.dtype).to(device) for o in outs]
    keep = [i for i, name in enumerate(names) if name not in skip_grads]
    diff = [i for i, need in enumerate(needs) if need]
    grads = torch.autograd.grad([outs[i] for i in keep], [ins[i] for i in diff], [ups[i] for i in keep])

    ins64 = [t.detach().double().requires_grad_(need) for t, need in zip((x, w, b, s), needs)]
    ref = ref_fn(*ins64)
    ref_grads = torch.autograd.grad([ref[i] for i in keep], [ins64[i] for i in diff],
                                    [ups[i].double() for i in keep])
    errs = {name: rel_err(o, r) for name, o, r in zip(names, outs, ref)}
    for i, got, want in zip(diff, grads, ref_grads):
        name = "d" + "xwbs"[i]
        assert got.shape == ins[i].shape and got.dtype == ins[i].dtype, name
        errs[name] = rel_err(got, want)
    tol = tolerance(dtype)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{fn_name} T={T} n={n} C={C} {dtype}: errors over {tol}: {bad} (all: {errs})"
    return errs


# (function, T, n, C, dtype): hc_pre on every n in {1, 2, 3, 4, 8} x T in {1, 7, 33} x dtype, with C
# alternating between widths with a partial last chunk (40, 264: multiples of 8, not of 16) and a
# power of two (64, still a partial chunk; whole chunks: test_width_multiple_of_chunk); hc_coeffs on
# a subset.
CASES = [("hc_pre", T, n, (40, 264, 64)[(i + j) % 3], dtype)
         for i, n in enumerate((1, 2, 3, 4, 8)) for j, T in enumerate((1, 7, 33)) for dtype in DTYPES]
CASES += [("hc_coeffs", T, n, C, dtype) for T, n, C, dtype in (
    (7, 4, 264, torch.float16), (33, 2, 40, torch.bfloat16), (1, 3, 40, torch.bfloat16),
    (7, 8, 40, torch.float16), (33, 1, 264, torch.bfloat16), (7, 3, 64, torch.float16))]


@pytest.mark.parametrize("fn_name,T,n,C,dtype", CASES,
                         ids=[f"{c[0]}-T{c[1]}-n{c[2]}-C{c[3]}-{str(c[4])[6:]}" for c in CASES])
def test_matches_reference(fn_name, T, n, C, dtype, kernel_device):
    check(fn_name, T, n, C, dtype, kernel_device)


def test_gpu_tiling_and_no_prefetch(kernel_device):
    """The GPU's small token blocks in the coefficient backward (partial last block, several
    programs), then without its prefetch."""
    check("hc_pre", 7, 3, 264, torch.bfloat16, kernel_device, config=GPU_TILING)
    check("hc_pre", 5, 4, 40, torch.float16, kernel_device,
          config=dict(GPU_TILING, b1_prefetch=0, b1_bt=2))


@pytest.mark.parametrize("prefetch", [1, 0])
def test_many_chunks(prefetch, kernel_device):
    """One warp per program in the coefficient backward: its chunks of 64 int32 pairs make
    C = 264 and 1032 several chunks with a partial last one."""
    cfg = dict(b1_warps=1, b1_prefetch=prefetch)
    check("hc_pre", 5, 4, 264, torch.bfloat16, kernel_device, config=cfg)
    check("hc_pre", 3, 3, 1032, torch.float16, kernel_device, config=dict(cfg, b1_cp=1))
    check("hc_coeffs", 3, 2, 264, torch.bfloat16, kernel_device, config=cfg)


GEMM = {"gemm_bm": 16, "gemm_bk": 16, "apply_bt": 4, "apply_bc": 32}


@pytest.mark.parametrize("fn_name,T,n,C,dtype", [
    ("hc_pre", 1, 1, 40, torch.bfloat16), ("hc_pre", 7, 3, 264, torch.float16),
    ("hc_pre", 33, 4, 64, torch.bfloat16), ("hc_pre", 5, 8, 40, torch.float16),
    ("hc_coeffs", 7, 2, 264, torch.bfloat16), ("hc_coeffs", 3, 4, 40, torch.float16)],
    ids=["pre-n1", "pre-n3", "pre-n4", "pre-n8", "coeffs-n2", "coeffs-n4"])
def test_gemm_forward(fn_name, T, n, C, dtype, kernel_device):
    """The forward: rows (token, stream) on tensor cores with w as hi + lo, several K chunks with
    a partial last one (C = 40, 264 over 16-column chunks), row blocks that straddle tokens
    (n = 3) and a partial last block; the backward (shared) sees its z and r."""
    check(fn_name, T, n, C, dtype, kernel_device, config=GEMM)


def test_gemm_config_errors():
    with pytest.raises(ValueError, match="gemm_bk must be a power of two >= 16"):
        H.parse_config({"gemm_bk": 8})


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, True, False),
                                   (False, False, False, True)], ids=["x", "w+b", "s"])
def test_partial_gradients(needs, kernel_device):
    check("hc_pre", 7, 4, 40, torch.bfloat16, kernel_device, needs=needs)


def test_unused_outputs(kernel_device):
    """Only layer_input reaches the loss (h_post, h_res get no gradient), and only h_res."""
    check("hc_pre", 7, 2, 40, torch.bfloat16, kernel_device, skip_grads=("h_post", "h_res"))
    check("hc_coeffs", 7, 2, 40, torch.float16, kernel_device, skip_grads=("h_pre", "h_post"))


@pytest.mark.parametrize("n,site", [(1, 0), (4, 6), (3, 1)])
def test_init_is_residual(n, site, kernel_device):
    """At HC's init with all streams equal: layer_input = x[site mod n], h_res = I, h_post = 1."""
    T, C = 5, 40
    w, b, s = (t.to(kernel_device) for t in reference.init_params("hc", n, C, site_index=site))
    v = torch.randn(T, 1, C, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    x = v.expand(T, n, C).contiguous().to(kernel_device)
    li, h_post, h_res = H.hc_pre(x, w, b, s)
    assert torch.equal(li, x[:, site % n])
    assert torch.equal(h_post, torch.ones(T, n, device=x.device))
    assert torch.equal(h_res, torch.eye(n, device=x.device).expand(T, n, n))
    h_pre, _, _ = H.hc_coeffs(x, w, b, s)
    assert torch.equal(h_pre, torch.nn.functional.one_hot(torch.full((T,), site % n), n)
                       .float().to(x.device))


def test_errors(kernel_device):
    dev = kernel_device
    (x, w, b, s), _ = make_inputs(3, 4, 40, torch.bfloat16, dev)
    with pytest.raises(ValueError, match=r"\bx\b.*\[T, n, C\]"):
        H.hc_pre(x[0], w, b, s)
    with pytest.raises(ValueError, match="bf16 or fp16.*x shape"):
        H.hc_pre(x.float(), w, b, s)
    with pytest.raises(ValueError, match="multiple of 8.*x shape"):
        H.hc_pre(torch.zeros(3, 4, 36, dtype=torch.bfloat16, device=dev), w[:36], b, s)
    with pytest.raises(ValueError, match="n in 1..8.*x shape"):
        H.hc_pre(torch.zeros(3, 9, 40, dtype=torch.bfloat16, device=dev),
                 torch.zeros(40, 11, device=dev), torch.zeros(99, device=dev), s)
    with pytest.raises(ValueError, match=r"\bw\b must have shape \[40, 6\]"):
        H.hc_pre(x, w[:, :5], b, s)
    with pytest.raises(ValueError, match=r"\bw\b must have shape \[40, 6\]"):
        H.hc_coeffs(x, w.t(), b, s)
    with pytest.raises(ValueError, match=r"\bw\b must be torch.float32"):
        H.hc_pre(x, w.double(), b, s)
    with pytest.raises(ValueError, match=r"\bb\b must have shape \[24\]"):
        H.hc_pre(x, w, b[:-1], s)
    with pytest.raises(ValueError, match=r"\bs\b must have shape \[2\]"):
        H.hc_coeffs(x, w, b, s[:1])
    with pytest.raises(ValueError, match="unknown config key"):
        H.hc_pre(x, w, b, s, config="fwd_bogus=1")


def test_config_string(kernel_device):
    cfg = H.parse_config("gemm_warps=2, b2_bc=32,b2_dw=tf32")
    assert cfg["gemm_warps"] == 2 and cfg["b2_bc"] == 32 and cfg["b2_dw"] == "tf32"
    with pytest.raises(ValueError, match="b2_dw"):
        H.parse_config({"b2_dw": "fp8"})
    with pytest.raises(ValueError, match="unknown config key 'fwd_impl'"):   # the FMA forward left
        H.parse_config("fwd_impl=fma")


# ------------------------------------------------------------ dx / dw on tensor cores
MMA_TILINGS = {
    "blocks": {"b2_bm": 16, "b2_bc": 32, "b2_ctas": 8},           # several row groups and columns
    "tiny": {"b2_bm": 16, "b2_bc": 16, "b2_ctas": 64, "b2_stages": 2},
    "tf32": {"b2_dw": "tf32", "b2_bc": 128},                       # dw in tf32 instead of bf16 hi + lo
}


@pytest.mark.parametrize("tiling", list(MMA_TILINGS))
@pytest.mark.parametrize("fn_name,T,n,C,dtype", [
    ("hc_pre", 7, 3, 264, torch.bfloat16),      # row blocks straddle tokens (n = 3), column tails
    ("hc_pre", 16, 4, 64, torch.bfloat16),      # whole row and column blocks (EVEN_R, EVEN_C)
    ("hc_pre", 5, 8, 40, torch.float16),
    ("hc_pre", 33, 1, 264, torch.bfloat16),
    ("hc_pre", 9, 5, 64, torch.bfloat16),       # n = 5: no power of two
    ("hc_coeffs", 16, 2, 128, torch.float16)],
    ids=["pre-n3", "pre-n4-even", "pre-n8", "pre-n1", "pre-n5", "coeffs-n2"])
def test_mma_backward_tilings(fn_name, T, n, C, dtype, tiling, kernel_device):
    check(fn_name, T, n, C, dtype, kernel_device, config=MMA_TILINGS[tiling])


# ------------------------------------------------------------------------- site link (dx handed over)
class _EmulatedPost(torch.autograd.Function):
    """F_post,res in torch with kernels/triton/post.py's link protocol: claims the link, puts its
    dx there (site_link.hand_over) and returns no x gradient."""

    @staticmethod
    def forward(ctx, x, f, h_post, h_res, link):
        ctx.save_for_backward(x, f, h_post, h_res)
        ctx.link = link
        out = torch.einsum("tij,tjc->tic", h_res, x.float()) + h_post[..., None] * f.float()[:, None]
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, f, h_post, h_res = ctx.saved_tensors
        g = g.float()
        dx = torch.einsum("tij,tic->tjc", h_res, g).to(x.dtype)
        df = (h_post[..., None] * g).sum(1).to(f.dtype)
        dhp = (g * f.float()[:, None]).sum(-1)
        dhr = torch.einsum("tic,tjc->tij", g, x.float())
        dx = site_link.hand_over(ctx, ctx.link, dx, 3)
        return dx, df, dhp, dhr, None


def _emulated_post(x, f, h_post, h_res):
    return _EmulatedPost.apply(x, f, h_post, h_res, site_link.claim(h_res, x))


def _triton_post(x, f, h_post, h_res):
    from kernels.triton.post import post
    return post(x, f, h_post, h_res)


def _site_grads(post_fn, fn, x, w, b, s, m, up, link=True):
    """x -> pre -> F = layer_input * m (apply(h_pre) * m for hc_coeffs) -> post(x, F, h_post,
    h_res) -> (out, gradients of x, w, b, s). link=False hands post a view of x (no link)."""
    ins = [t.clone().requires_grad_() for t in (x, w, b, s)]
    if fn in (H.hc_coeffs, reference.hc_coeffs) or getattr(fn, "coeffs", False):
        h_pre, h_post, h_res = fn(*ins)
        li = reference.apply_pre(ins[0], h_pre).to(x.dtype)
    else:
        li, h_post, h_res = fn(*ins)
    xp = ins[0] if link else ins[0].view_as(ins[0])
    out = post_fn(xp, li * m.to(li.dtype), h_post, h_res)
    return out, torch.autograd.grad(out, ins, up.to(out.dtype))


def _site_case(fn_name, T, n, C, dtype, device, config, monkeypatch):
    (x, w, b, s), g = make_inputs(T, n, C, dtype, device, seed=3)
    m = torch.randn(T, C, generator=g).to(dtype).to(device)
    up = torch.randn(T, n, C, generator=g).to(dtype).to(device)
    taken = []
    real = site_link.accumulator

    def spy(link, xx):
        acc = real(link, xx)
        taken.append(acc is not None)
        return acc
    monkeypatch.setattr(H.site_link, "accumulator", spy)
    fn = H.hc_pre if fn_name == "hc_pre" else H.hc_coeffs

    def kfn(*a):
        return fn(*a, config=config)
    kfn.coeffs = fn_name == "hc_coeffs"
    ref_fn = reference.hc_pre if fn_name == "hc_pre" else reference.hc_coeffs
    ref = _site_grads(reference.post, ref_fn, *(t.double() for t in (x, w, b, s, m, up)))
    return kfn, (x, w, b, s, m, up), ref, taken


def _errs(got, want):
    out, grads = got
    rout, rgrads = want
    errs = {"out": rel_err(out, rout)}
    errs.update({"d" + k: rel_err(a, r) for k, a, r in zip("xwbs", grads, rgrads)})
    return errs


@pytest.mark.parametrize("config", [None, MMA_TILINGS["blocks"]], ids=["default", "blocks"])
@pytest.mark.parametrize("fn_name,T,n,C,dtype", [
    ("hc_pre", 7, 4, 264, torch.bfloat16), ("hc_pre", 16, 4, 64, torch.bfloat16),
    ("hc_pre", 5, 3, 40, torch.float16), ("hc_pre", 1, 1, 64, torch.bfloat16),
    ("hc_coeffs", 9, 2, 40, torch.bfloat16)],
    ids=["pre-n4", "pre-n4-even", "pre-n3", "pre-n1-T1", "coeffs-n2"])
def test_site_link_accumulates_dx(fn_name, T, n, C, dtype, config, kernel_device, monkeypatch):
    """pre + a post that hands its dx over (site_link): pre's backward takes it once and adds it in
    place (ACC), no torch add; every gradient still matches fp64."""
    kfn, ins, ref, taken = _site_case(fn_name, T, n, C, dtype, kernel_device, config, monkeypatch)
    errs = _errs(_site_grads(_emulated_post, kfn, *ins), ref)
    assert taken == [True]
    bad = {k: v for k, v in errs.items() if not v <= tolerance(dtype)}
    assert not bad, f"site {fn_name} T={T} n={n} C={C} {dtype} {config}: {bad} (all: {errs})"


@pytest.mark.parametrize("fn_name,T,n,C,dtype", [
    ("hc_pre", 7, 4, 264, torch.bfloat16), ("hc_pre", 8, 8, 64, torch.float16),
    ("hc_pre", 3, 2, 40, torch.bfloat16), ("hc_coeffs", 5, 3, 40, torch.bfloat16)],
    ids=["pre-n4", "pre-n8", "pre-n2", "coeffs-n3"])
def test_site_with_triton_post(fn_name, T, n, C, dtype, kernel_device, monkeypatch):
    """hc_pre + kernels.triton.post through autograd, with the link (post hands dx over) and
    without (post given a view of x: autograd adds the two x gradients): the same gradients, and
    dx matches fp64. (The whole site rounds F, df and the output to 16 bits, so the small
    coefficient gradients are compared between the two paths, not with fp64.)"""
    kfn, ins, ref, taken = _site_case(fn_name, T, n, C, dtype, kernel_device, None, monkeypatch)
    linked = _site_grads(_triton_post, kfn, *ins)
    plain = _site_grads(_triton_post, kfn, *ins, link=False)
    tol = tolerance(dtype)
    errs = _errs(linked, plain)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"linked vs plain {fn_name} T={T} n={n} C={C} {dtype}: {bad} (all: {errs})"
    errs = _errs(linked, ref)
    assert errs["dx"] <= tol and errs["out"] <= tol, errs
    import kernels.triton.post as post_module
    linking = hasattr(post_module, "site_link")      # post.py hands dx over (site_link.hand_over)
    assert taken == [linking, False]     # linked: one accumulator; plain: none


def test_site_link_not_taken(kernel_device):
    """No link: h_res detached from pre, x without grad, or a second post on the same h_res."""
    (x, w, b, s), g = make_inputs(5, 4, 40, torch.bfloat16, kernel_device)
    x = x.clone().requires_grad_()
    li, h_post, h_res = H.hc_pre(x, w, b, s)
    assert site_link.claim(h_res, x.detach()) is None           # another x object
    assert site_link.claim(h_res, x) is not None
    assert site_link.claim(h_res, x) is None                    # claimed once only
    li, h_post, h_res = H.hc_pre(x.detach(), w, b, s)
    assert getattr(h_res, site_link._ATTR, None) is None         # x without grad: no link


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("T", [1, 17, 4097])
@pytest.mark.parametrize("C", [264, 2560, 4096, 7168])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_gpu_matches_reference(n, C, T, dtype):
    check("hc_pre", T, n, C, dtype, "cuda")
    if T == 17:
        check("hc_coeffs", T, n, C, dtype, "cuda")


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """T * n * C > 2^31: the last tokens match the reference computed on those tokens alone."""
    T, n, C = (2**31) // (4 * 4096) + 3, 4, 4096
    g = torch.Generator().manual_seed(7)
    w, b, s = (t.cuda() for t in reference.random_params("hc", n, C, g))
    x = torch.empty(T, n, C, dtype=torch.bfloat16, device="cuda").normal_()
    li, h_post, h_res = H.hc_pre(x, w, b, s)
    tail = x[-64:].clone()
    r_li, r_post, r_res = reference.hc_pre(tail.double(), w.double(), b.double(), s.double())
    tol = tolerance(torch.bfloat16)
    assert rel_err(li[-64:], r_li) <= tol
    assert rel_err(h_post[-64:], r_post) <= tol and rel_err(h_res[-64:], r_res) <= tol
    head = reference.hc_pre(x[:64].double(), w.double(), b.double(), s.double())[0]
    assert rel_err(li[:64], head) <= tol
