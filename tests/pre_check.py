"""One comparison of a fused coefficient/pre op with the fp64 reference, for the TileLang tests
of mHC and HC: every output and every requested gradient, on the weight the kernel really
multiplies by (its declared rounding), under the state dtype's tolerance."""
import torch

from suite.core.tolerance import rel_err, tolerance


def assert_pre_matches(fn, ref_fn, inputs, dtype, g, grad_names, weight_as_used, label,
                       opts=None, needs=(True, True, True, True), use=(True, True, True)):
    """inputs: (x, weight, b, scale) on the device; g: the generator that made them (it draws the
    upstream gradients next); weight_as_used(weight, dtype): what the kernel's GEMM uses."""
    opts = opts or {}
    leaves = [t.clone().requires_grad_(r) for t, r in zip(inputs, needs)]
    leaves_ref = [t.detach().double().requires_grad_(r) for t, r in zip(inputs, needs)]
    out = fn(*leaves, **opts)
    ref_in = list(leaves_ref)
    w = leaves_ref[1]
    ref_in[1] = w + (weight_as_used(inputs[1], dtype).double() - w).detach()
    out_ref = ref_fn(*ref_in, **opts)
    errs = {nm: rel_err(o, e) for nm, o, e in zip(("first", "h_post", "h_res"), out, out_ref)}
    ups = [torch.randn(o.shape, generator=g).to(o.dtype) for o in out]
    sel = [i for i, u in enumerate(use) if u]
    dev = inputs[0].device
    torch.autograd.backward([out[i] for i in sel], [ups[i].to(dev) for i in sel])
    torch.autograd.backward([out_ref[i] for i in sel], [ups[i].to(dev).double() for i in sel])
    for nm, t, t_ref, r in zip(grad_names, leaves, leaves_ref, needs):
        if r:
            assert t.grad is not None, nm
            errs[nm] = rel_err(t.grad, t_ref.grad)
    tol = tolerance(dtype)
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= tol}
    assert not bad, f"{label} {dtype}: above {tol}: {bad} (all {errs})"
