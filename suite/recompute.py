"""Recompute of the connection (mHC paper section 4.3.2, Table 3, Eq. 20) and of whole layers.

`mhc`: for each block of L_r layers, keep only the block's input x_l0 ([T, n, C]) and every
sublayer output f ([T, C]); F keeps its own activations exactly as in a residual model. The
connection's states x_l, its coefficients and its pre output are dropped after the forward and
recomputed in the backward, without rerunning F. The coefficients are recomputed too (the paper
leaves out whether DeepSeek stores them; recomputing them is the smaller-memory choice).
`full`: ordinary activation checkpointing of each block of L_r layers (torch.utils.checkpoint):
F is rerun as well.

The memory model (Eq. 20), per token in state elements: resident n*C*ceil(L/L_r) for the block
inputs, transient (n+2)*C*L_r while one block is recomputed; its minimum is near
L_r* = sqrt(n*L/(n+2)).
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

RECOMPUTE = ("none", "mhc", "full")


def lr_star(n: int, L: int) -> float:
    """The paper's continuous optimum of the block length, sqrt(n L / (n + 2))."""
    return math.sqrt(n * L / (n + 2))


def memory_model(n: int, C: int, L: int, L_r: int) -> int:
    """Eq. 20's activation elements per token: n C ceil(L/L_r) + (n+2) C L_r."""
    return n * C * math.ceil(L / L_r) + (n + 2) * C * L_r


def best_lr(n: int, L: int) -> int:
    """The integer L_r that minimises memory_model (C cancels); ties go to the smaller L_r."""
    return min(range(1, L + 1), key=lambda r: (memory_model(n, 1, L, r), r))


def run_layers(layers: list, x: torch.Tensor, mode: str, L_r: int) -> torch.Tensor:
    if mode not in RECOMPUTE:
        raise ValueError(f"recompute {mode!r} is not one of {', '.join(RECOMPUTE)}")
    if mode == "none" or not torch.is_grad_enabled():
        for layer in layers:
            x = layer(x)
        return x
    for start in range(0, len(layers), L_r):
        block = layers[start:start + L_r]
        if mode == "full":
            x = checkpoint(_run_block, block, x, use_reentrant=False)
        else:
            sites = [s for layer in block for s in layer.sites]
            params = [p for s in sites for p in s.conn]
            x = _ConnectionRecompute.apply(sites, x, *params)
    return x


def _run_block(block, x):
    for layer in block:
        x = layer(x)
    return x


class _ConnectionRecompute(torch.autograd.Function):
    """One block of sites: forward keeps x0 and each F's output (and F's own graph); backward
    reruns the connection ops from x0 and walks the sites in reverse, backpropagating each F
    through the graph it kept. F's parameter gradients accumulate into .grad (as in a
    reentrant checkpoint), so the model is trained with loss.backward()."""

    @staticmethod
    def forward(ctx, sites, x0, *params):
        x, f_graphs, li_leaves = keep_forward(sites, x0)
        ctx.sites = sites
        ctx.n_params = [len(s.conn) for s in sites]
        # f (C per token per site) is what Table 3 stores; F's graph holds li like a residual F.
        ctx.save_for_backward(x0, *f_graphs)
        ctx.li_leaves = li_leaves
        return x

    @staticmethod
    def backward(ctx, grad_x):
        x0, *f_graphs = ctx.saved_tensors
        sites, li_leaves = ctx.sites, ctx.li_leaves
        recomputed = replay(sites, x0, f_graphs)
        g, param_grads = backprop(sites, f_graphs, li_leaves, recomputed, grad_x)
        ctx.li_leaves = None
        return (None, g, *param_grads)


# The three phases of the connection recompute, apart so that a pipeline stage can run the
# replay before it waits for the gradient from the next stage (suite.pipeline).
def keep_forward(sites, x0):
    """Forward of one block without autograd for the connection: (x out, each F's output
    with F's own graph, each F's input leaf)."""
    x = x0
    f_graphs, li_leaves = [], []
    with torch.no_grad():
        for site in sites:
            layer_input, h_post, h_res = site.pre(x)
            li = layer_input.detach().requires_grad_(True)
            with torch.enable_grad():
                f = site.F(li)
            x = site.post(x, f.detach(), h_post, h_res)
            f_graphs.append(f)
            li_leaves.append(li)
    return x, f_graphs, li_leaves


def replay(sites, x0, f_graphs) -> list:
    """Reruns the connection ops from the block input x0 with autograd (F is not rerun)."""
    recomputed = []
    with torch.enable_grad():
        x = x0.detach()
        for site, f in zip(sites, f_graphs):
            x_in = x.detach().requires_grad_(True)
            layer_input, h_post, h_res = site.pre(x_in)
            f_leaf = f.detach().requires_grad_(True)
            x = site.post(x_in, f_leaf, h_post, h_res)
            recomputed.append((x_in, layer_input, f_leaf, x))
    return recomputed


def backprop(sites, f_graphs, li_leaves, recomputed, grad_x):
    """Walks the sites in reverse: the gradient at the block input and the connection
    parameters' gradients (F's accumulate into .grad)."""
    g = grad_x
    param_grads: list = []
    for site, f, li, (x_in, layer_input, f_leaf, x_out) in zip(
            reversed(sites), reversed(f_graphs), reversed(li_leaves), reversed(recomputed)):
        (g_f,) = torch.autograd.grad(x_out, f_leaf, g, retain_graph=True)
        torch.autograd.backward(f, g_f)                   # F's weights and li.grad
        params = list(site.conn)
        outs, grads = [x_out], [g]
        if li.grad is not None:
            outs.append(layer_input)
            grads.append(li.grad)
        got = torch.autograd.grad(outs, [x_in] + params, grads, allow_unused=True)
        g = got[0]
        param_grads = list(got[1:]) + param_grads
        li.grad = None
    return g, param_grads


class SavedBytes:
    """Counts the bytes autograd keeps for backward during a forward (CPU-friendly accounting):
    every tensor packed by a saved-tensor hook, each storage counted once."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def _pack(self, t):
        try:
            st = t.untyped_storage()
            self.storages[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass    # no plain storage (sparse, nested, fake tensors): nothing this count can size
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())
