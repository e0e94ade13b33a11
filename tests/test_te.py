"""The `te` peer backend (kernels/te.py): Transformer Engine's mHC against its declared variant of
the fp64 reference, the translation of its conventions, and the skips.

TE's kernels are Triton, so without a GPU they run in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) on small CPU shapes. There TE's autotuners keep the configuration its pruning
puts first (the interpreter cannot time configurations), TMA is off (TE asks CUDA for the compute
capability), and tl.dot on bf16 operands is computed from their values (the interpreter of
Triton 3.9 multiplies their bit patterns). The interpreter also rounds fp32 -> bf16 toward zero,
where a GPU rounds to nearest: bf16 outputs carry up to twice the rounding error there.
Tests that run TE skip when transformer_engine is not installed; the skip reasons and the loader
are tested without it.
"""
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference
from suite.core.scenario import Case
from suite.core.tolerance import rel_err, tolerance
from suite.run import check as checking

ROOT = Path(__file__).resolve().parent.parent
HAS_TE = importlib.util.find_spec("transformer_engine") is not None
NO_TE = "transformer_engine is not installed (pip install --no-deps transformer-engine==2.20.2)"
COEFFICIENTS = ("h_pre", "h_post", "h_res")    # fp32 tolerance, as in suite/run/check.py
N = 4


@pytest.fixture
def te(monkeypatch, kernel_device):
    """kernels.te, with TE's autotuners made runnable in the interpreter on the CPU."""
    if not HAS_TE:
        pytest.skip(NO_TE)
    K = importlib.import_module("kernels.te")
    if kernel_device == "cpu":
        import triton
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder

        dot = InterpreterBuilder.create_dot

        def create_dot(self, a, b, *args):
            # the interpreter multiplies bf16 operands as their raw uint16 bits; TE's aggregate and
            # expand-combine backwards reduce bf16 with tl.dot, as a GPU does exactly in fp32
            a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
            return dot(self, a, b, *args)

        monkeypatch.setattr(InterpreterBuilder, "create_dot", create_dot)
        for obj in vars(K.TE).values():
            if isinstance(obj, triton.runtime.autotuner.Autotuner):
                # every configuration "takes" the same time, so the first after pruning is kept;
                # the pruning itself (it sizes blocks from C and M) still runs
                monkeypatch.setitem(vars(obj), "do_bench", lambda fn, quantiles: [1.0, 1.0, 1.0])
        monkeypatch.setattr(K.TE, "_support_tma", lambda x: False)
    return K


def inputs(T, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(T, N, 1, generator=g))
    x = (torch.randn(T, N, C, generator=g) * scale).to(dtype)
    phi, b, alpha = reference.random_params("mhc", N, C, g)
    f = torch.randn(T, C, generator=g).to(dtype)
    g_li, g_out = torch.randn(T, C, generator=g), torch.randn(T, N, C, generator=g)
    return [t.to(device) for t in (x, phi, b, alpha, f, g_li, g_out)]


def run(pre, post, x, phi, b, alpha, f, g_li, g_out, **opts):
    """pre -> post with a loss on both outputs; returns outputs and grads of x, phi, b, alpha, f."""
    ins = [t.detach().clone().requires_grad_() for t in (x, phi, b, alpha, f)]
    li, h_post, h_res = pre(*ins[:4], **opts)
    out = post(ins[0], ins[4], h_post, h_res)
    loss = (li.double() * g_li.double()).sum() + (out.double() * g_out.double()).sum()
    grads = torch.autograd.grad(loss, ins)
    return dict(layer_input=li, h_post=h_post, h_res=h_res, x_next=out,
                dx=grads[0], dphi=grads[1], db=grads[2], dalpha=grads[3], df=grads[4])


def errors(got, want, dtype):
    errs = {k: rel_err(got[k], want[k]) for k in want}
    bad = {k: v for k, v in errs.items()
           if not v <= tolerance(torch.float32 if k in COEFFICIENTS else dtype)}
    return errs, bad


CASES = [(7, 16, torch.bfloat16), (5, 40, torch.float32), (3, 264, torch.bfloat16)]


@pytest.mark.parametrize("T,C,dtype", CASES, ids=[f"T{T}-C{C}-{str(d)[6:]}" for T, C, d in CASES])
def test_te_matches_its_reference(te, T, C, dtype, kernel_device):
    """Every output and gradient of TE's site against TE's variant of MATH.md in fp64, at the
    gate's tolerances (C = 264: more than one of TE's 256-wide column blocks)."""
    dev = inputs(T, C, dtype, kernel_device, seed=C)
    got = run(te.mhc_pre, te.mhc_post, *dev)
    ref = te.TE_REFERENCE
    want = run(ref.pre, ref.post, *[t.double() for t in dev[:5]], *dev[5:])
    errs, bad = errors(got, want, dtype)
    assert not bad, f"te T={T} C={C} {dtype}: {errs}"
    assert got["layer_input"].dtype == dtype and got["x_next"].dtype == dtype
    assert got["dx"].dtype == dtype and got["df"].dtype == dtype
    assert all(got[k].dtype == torch.float32 for k in ("h_post", "h_res", "dphi", "db", "dalpha"))


def test_te_coeffs_and_sinkhorn_iters(te, kernel_device):
    """coeffs returns h_pre too, and a Sinkhorn count other than TE's fixed 20 reaches TE's
    Sinkhorn (pre composes TE's calls then): 3 iterations match the 3-iteration variant and
    differ from the 20-iteration one."""
    x, phi, b, alpha = inputs(6, 32, torch.bfloat16, kernel_device)[:4]
    want = te.te_mhc_coeffs(x.double(), phi.double(), b.double(), alpha.double(), 3)
    got = te.mhc_coeffs(x, phi, b, alpha, sinkhorn_iters=3)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and rel_err(g, w) < 1e-5
    _, _, h_res3 = te.mhc_pre(x, phi, b, alpha, sinkhorn_iters=3)
    assert rel_err(h_res3, want[2]) < 1e-5
    h_res20 = te.te_mhc_coeffs(x.double(), phi.double(), b.double(), alpha.double(), 20)[2]
    assert rel_err(h_res3, h_res20) > 1e-3


def test_te_sinkhorn_is_math_md_order_without_eps(te, kernel_device):
    """With the res logits transposed going in and H_res transposed coming out, TE's row-first
    log-space Sinkhorn is MATH.md's column-first one without eps_sk: its rows sum to 1, and TE's
    order on untransposed logits (columns last) is measurably different. phi = 0, so the logits
    are b_res."""
    T, C = 3, 16
    x = torch.randn(T, N, C, generator=torch.Generator().manual_seed(0)).bfloat16()
    phi = torch.zeros(N * C, reference.n_coeffs(N))
    b = torch.zeros(reference.n_coeffs(N))
    # two near-copies of a row that shuns half the columns: Sinkhorn converges slowly
    logits = torch.tensor([[3.0, 3.5, -3.0, -3.0], [3.0, 3.0, -3.0, -2.7],
                           [0.2, 0.0, 0.0, 0.0], [0.0, 0.0, -0.4, 0.0]])
    b[2 * N:] = logits.flatten()
    alpha = torch.ones(3)
    _, _, h_res = te.mhc_coeffs(*[t.to(kernel_device) for t in (x, phi, b, alpha)])
    L = logits.double().expand(T, N, N)
    assert rel_err(h_res, te.te_sinkhorn(L, 20)) < 1e-5
    assert (h_res.sum(-1) - 1).abs().max() < 1e-5                # rows: MATH.md's last step,
    assert (h_res.sum(-2) - 1).abs().max() > 1e-4                # so columns are not yet exact
    assert rel_err(h_res, reference.sinkhorn(L, 20)) < 1e-5      # eps_sk: a ~1e-6 gap
    # TE's own order on untransposed logits (rows first, columns last) is measurably different
    rows_first = torch.exp(L)
    for _ in range(20):
        rows_first = rows_first / rows_first.sum(-1, keepdim=True)
        rows_first = rows_first / rows_first.sum(-2, keepdim=True)
    assert rel_err(h_res, rows_first) > 1e-3
    # the untranslated convention (TE's H_res read as [dst, src]) is far off
    assert rel_err(h_res.transpose(-1, -2), te.te_sinkhorn(L, 20)) > 1e-2


def test_te_sinkhorn_transcription(te):
    """te_sinkhorn (the variant reference) is TE's log-space iteration exactly: a line-by-line
    transcription of TE's kernel in fp64, run on TE's matrix (our logits transposed), agrees to
    rounding; MATH.md's (eps_sk = 1e-6) does not."""
    L = torch.randn(50, N, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    x = L.transpose(-1, -2)                                   # TE's H_res logits, [src, dst]
    f = g = torch.zeros(50, N, dtype=torch.float64)
    for _ in range(20):
        f = -torch.logsumexp(x + g[:, None, :], dim=2)       # log_mu = 0
        g = -torch.logsumexp(x + f[:, :, None], dim=1)       # log_nu = 0
    te_out = torch.exp(f[:, :, None] + x + g[:, None, :]).transpose(-1, -2)
    assert rel_err(te.te_sinkhorn(L, 20), te_out) < 1e-13
    assert rel_err(reference.sinkhorn(L, 20), te_out) > 5e-7


def test_te_eps_rms(te, kernel_device):
    """Where the mean square is near eps, eps_rms shows: TE's is float32's eps (1.19e-7), not
    MATH.md's 1e-6. x ~ 1e-3 puts the mean square at ~1e-6."""
    x, phi, b, alpha = inputs(6, 32, torch.bfloat16, kernel_device)[:4]
    x = (x.float() * 1e-3 / x.float().pow(2).mean(dim=(1, 2), keepdim=True).sqrt()).bfloat16()
    got = te.mhc_coeffs(x, phi, b, alpha)[0]
    up = [t.double() for t in (x, phi, b, alpha)]
    assert rel_err(got, te.te_mhc_coeffs(*up)[0]) < 1e-5
    assert rel_err(got, reference.mhc_coeffs(*up)[0]) > 1e-3


def test_te_variant_is_math_md_within_its_eps(te):
    """The declared variant differs from MATH.md by its eps only: ~1e-6, far inside the fp32
    tolerance, and not zero (the variant is what it says)."""
    x, phi, b, alpha = (t.double() for t in inputs(64, 32, torch.bfloat16, "cpu")[:4])
    for got, want in zip(te.te_mhc_coeffs(x, phi, b, alpha), reference.mhc_coeffs(x, phi, b, alpha)):
        assert 0 < rel_err(got, want) < 1e-5


def test_gate_passes_te_and_fails_a_wrong_convention(te, kernel_device, monkeypatch):
    """The runner's gate (suite.run.check) on a site fwd+bwd case: TE passes against its variant;
    h_res handed to TE's expand-combine untransposed, or the res logits not transposed going in,
    fails it. So the translation is what the gate measures."""
    case = Case(method="mhc", C=16, T=8, backend="te", mode="fwd+bwd", device=kernel_device)
    ops = kernels.get("mhc", "te")
    result = checking.check(ops, case, kernel_device)
    assert result["passed"], result["errors"]
    assert result["reference"] == te.DEVIATION and not result["wrong_dtype"]
    translate = te.to_te_h_res
    monkeypatch.setattr(te, "to_te_h_res", lambda h_res: h_res.unsqueeze(1))
    result = checking.check(ops, case, kernel_device)
    assert not result["passed"] and result["errors"]["x_next"] > 0.1, result["errors"]
    monkeypatch.setattr(te, "to_te_h_res", translate)
    untransposed = lambda phi, b: (phi.view(N, 16, -1).permute(2, 1, 0).reshape(-1, 16 * N),  # noqa: E731
                                   b.view(1, -1))
    monkeypatch.setattr(te, "to_te_params", untransposed)
    result = checking.check(ops, case, kernel_device)
    assert not result["passed"] and result["errors"]["h_res"] > 0.1, result["errors"]


def test_layout_round_trips(te):
    T, C = 5, 12
    x = torch.randn(T, N, C)
    x_te = te.to_te_state(x)
    assert x_te.shape == (T, 1, C, N) and x_te.is_contiguous()
    assert torch.equal(x_te[:, 0], x.transpose(1, 2))            # TE's K index is c*n + i
    back = te.from_te_state(x_te)
    assert torch.equal(back, x) and back.data_ptr() == x_te.data_ptr()
    # state already streams-innermost (a te post's x_next) goes in without a copy
    assert te.to_te_state(back).data_ptr() == x_te.data_ptr()
    native = te.streams_innermost(x)
    assert torch.equal(native, x) and native.shape == x.shape
    assert te.to_te_state(native).data_ptr() == native.data_ptr()

    phi = torch.randn(N * C, reference.n_coeffs(N))
    b = torch.randn(reference.n_coeffs(N))
    phi_te, beta = te.to_te_params(phi, b)
    assert phi_te.shape == (reference.n_coeffs(N), C * N) and beta.shape == (1, reference.n_coeffs(N))
    # TE's column 2n + src*n + dst holds our 2n + dst*n + src; the gates keep their places
    for q, p in ((0, 0), (2 * N - 1, 2 * N - 1), (2 * N + 1, 2 * N + N),
                 (2 * N + 2 * N + 3, 2 * N + 3 * N + 2)):
        assert int(te.PERM[q]) == p
        assert torch.equal(phi_te[q].view(C, N), phi[:, p].view(N, C).t())
        assert beta[0, q] == b[p]
    assert torch.equal(te.PERM[te.PERM], torch.arange(reference.n_coeffs(N)))

    H = torch.rand(T, 1, N, N)
    h = te.from_te_h_res(H)
    assert torch.equal(h, H[:, 0].transpose(-1, -2)) and h.data_ptr() == H.data_ptr()
    again = te.to_te_h_res(h)
    assert torch.equal(again, H) and again.is_contiguous() and again.data_ptr() == H.data_ptr()


def test_post_reuses_the_pre_copy_of_x(te, kernel_device, monkeypatch):
    """In a site, post given pre's x (the same, unmodified tensor) takes pre's converted copy;
    another x, or x changed in place since, is converted again, and the results stay right."""
    x, phi, b, alpha, f = inputs(4, 16, torch.bfloat16, kernel_device)[:5]
    copies = []
    convert = te.to_te_state
    monkeypatch.setattr(te, "to_te_state", lambda t: copies.append(t) or convert(t))
    _, h_post, h_res = te.mhc_pre(x, phi, b, alpha)
    want = reference.post(x.double(), f.double(), h_post.double(), h_res.double())
    assert rel_err(te.mhc_post(x, f, h_post, h_res), want) < 1e-2 and len(copies) == 1
    assert rel_err(te.mhc_post(x.clone(), f, h_post, h_res), want) < 1e-2 and len(copies) == 2
    x.mul_(2)
    want2 = reference.post(x.double(), f.double(), h_post.double(), h_res.double())
    assert rel_err(te.mhc_post(x, f, h_post, h_res), want2) < 1e-2 and len(copies) == 3


def test_general_gemm_stand_in(te):
    """The stand-in computes cuBLAS's column-major layouts in row-major terms, as the wrapper
    calls it (x (M, K), grad_H (M, 32), "NT" -> grad_phi (32, K)), and refuses what it does not do."""
    g = torch.Generator().manual_seed(1)
    x, grad_H = torch.randn(9, 20, generator=g), torch.randn(9, 32, generator=g)
    out = te.general_gemm(x, grad_H, out_dtype=torch.float32, layout="NT")[0]
    assert out.shape == (32, 20) and torch.allclose(out, grad_H.t() @ x)
    w, inp = torch.randn(7, 20, generator=g), torch.randn(9, 20, generator=g)
    assert torch.allclose(te.general_gemm(w, inp, layout="TN")[0], inp @ w.t())   # y = x W^T
    before = torch.backends.cuda.matmul.fp32_precision
    te.general_gemm(x, grad_H, layout="NT")
    assert torch.backends.cuda.matmul.fp32_precision == before
    with pytest.raises(NotImplementedError, match="plain GEMMs only"):
        te.general_gemm(x, grad_H, layout="NT", bias=torch.zeros(32))
    with pytest.raises(ValueError, match="layout"):
        te.general_gemm(x, grad_H, layout="TT")


def test_te_loads_without_its_package_init(te):
    """TE's own package is not left in sys.modules (a real Transformer Engine imported later is
    unaffected), and the wrapper took the stand-in for cuBLAS."""
    assert not [m for m in sys.modules if m.startswith("transformer_engine")]
    assert te.TE.general_gemm is te.general_gemm
    assert te.TE_INSTALLED_VERSION.startswith(te.TE_VERSION + ".")


def test_te_supports(te):
    assert te.supports(4, 4096, torch.bfloat16) is None
    assert te.supports(4, 4096, torch.float32) is None
    for n in (1, 2, 3, 8):
        assert "n = 4 only" in te.supports(n, 4096, torch.bfloat16)
    assert "bf16 or fp32" in te.supports(4, 4096, torch.float16)
    assert kernels.get("mhc", "te").supports(2, 64, torch.bfloat16)


def test_te_bad_inputs(te, kernel_device):
    C = 16
    x = torch.zeros(2, N, C, dtype=torch.bfloat16, device=kernel_device)
    phi, b, alpha = (t.to(kernel_device) for t in reference.random_params("mhc", N, C, torch.Generator()))
    with pytest.raises(ValueError, match="phi must have shape"):
        te.mhc_coeffs(x, phi[:-1], b, alpha)
    with pytest.raises(ValueError, match="alpha must have shape"):
        te.mhc_pre(x, phi, b, alpha[:2])
    with pytest.raises(ValueError, match="n = 4 only"):
        te.mhc_post(x[:, :2], x[:, 0], torch.zeros(2, 2), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="h_res must have shape"):
        te.mhc_post(x, x[:, 0], torch.zeros(2, N, device=kernel_device),
                    torch.zeros(2, N, device=kernel_device))


# ------------------------------------------------------------------ skips, with and without TE
def test_skip_reason_when_te_is_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformer_engine" else real(name, *a))
    assert kernels.unavailable_reason("mhc", "te", "cuda") == \
        "backend te needs transformer-engine==2.20.2, which is not installed"
    assert "needs a cuda device" in kernels.unavailable_reason("mhc", "te", "cpu")


def _reason_with(site: Path) -> str:
    code = "import kernels; print(kernels.unavailable_reason('mhc', 'te', 'cuda'))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _fake_te(site: Path, version: str, files=()):
    """A transformer_engine whose package __init__ raises: the loader must never run it."""
    pkg = site / "transformer_engine"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('package __init__ executed')\n")
    for rel in files:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text("")
    meta = site / f"transformer_engine-{version}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: transformer_engine\nVersion: {version}\n")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_skip_reason_for_another_te_version_or_layout(tmp_path):
    _fake_te(tmp_path / "old", "2.19.0")
    assert _reason_with(tmp_path / "old") == ("backend te failed to load: ImportError: the te "
                                              "backend wraps Transformer Engine 2.20.x, found 2.19.0")
    _fake_te(tmp_path / "partial", "2.20.9", files=("common/triton/mhc.py",))
    assert _reason_with(tmp_path / "partial") == (
        "backend te failed to load: ImportError: Transformer Engine 2.20.9 has no "
        "transformer_engine/pytorch/triton/mhc.py")


def test_the_suite_makes_te_inputs_in_its_layout_before_any_timing():
    """workload.make_inputs applies a backend's state_layout: te gets x streams-innermost, so its
    pre never copies the state inside a timed call; every other backend keeps [T, n, C]."""
    import kernels
    from suite.core.scenario import Case
    from suite.workloads import workload
    case = Case(method="mhc", C=16, T=8, backend="te", n=4, dtype="fp32", device="cpu")
    spec = kernels.BACKENDS["te"]
    assert kernels.Ops.__dataclass_fields__["state_layout"].default is None
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("transformer_engine not importable")
    ops = kernels.get("mhc", "te")
    assert ops.state_layout is not None and spec.name == "te"
    x = workload.make_inputs(case, "cpu", 0)["x"]
    assert x.shape == (8, 4, 16) and x.transpose(1, 2).is_contiguous()
    plain = workload.make_inputs(Case(method="mhc", C=16, T=8, backend="torch", n=4, dtype="fp32",
                                      device="cpu"), "cpu", 0)["x"]
    assert plain.is_contiguous() and torch.equal(plain, x)
