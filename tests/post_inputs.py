"""Inputs and the fp64 answer for F_post,res tests, shared by every backend's post tests."""
import torch

from kernels import reference


def make_inputs(T, n, C, dtype, device, seed=0):
    """x, f, h_post, h_res and an upstream gradient, seeded by the shape (never zeros)."""
    g = torch.Generator().manual_seed(seed * 1000 + T * 100 + n * 10 + C)
    x = torch.randn(T, n, C, generator=g).to(dtype)
    f = torch.randn(T, C, generator=g).to(dtype)
    h_post = 2 * torch.sigmoid(torch.randn(T, n, generator=g))
    h_res = reference.sinkhorn(torch.randn(T, n, n, generator=g))
    grad = torch.randn(T, n, C, generator=g).to(dtype)
    return [t.to(device) for t in (x, f, h_post, h_res, grad)]


def reference_outputs(x, f, h_post, h_res, grad):
    """The fp64 reference's x_next and its gradients for x, f, h_post, h_res."""
    ins = [t.detach().double().requires_grad_() for t in (x, f, h_post, h_res)]
    out = reference.post(*ins)
    grads = torch.autograd.grad(out, ins, grad.double())
    return out, grads
