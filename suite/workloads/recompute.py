"""Recompute of the connection per site (mHC paper section 4.3.2, Table 3, Eq. 20) and of whole
blocks of sites.

A *site* is one connection around one sublayer F (suite.workloads.model.Site): a transformer layer has two,
attention and FFN. Everything here counts sites: `L` is the number of sites of the model
(2 x its transformer layers) and `L_r` the number of consecutive sites in one recompute block
(its default, and Eq. 20's memory model, are in suite.core.recompute_size).

Modes (`RECOMPUTE`):
- `none`: every site runs with ordinary autograd.
- `mhc`: per block of L_r sites, keep only the block's input x_l0 ([T, n, C]) and every site's
  sublayer output f ([T, C]); F keeps its own activations exactly as in a residual model (Table 3).
  The connection's states x_l, its coefficients and its pre output are dropped after the forward
  and recomputed in the backward, without rerunning F. The coefficients are recomputed too (the
  paper leaves out whether DeepSeek stores them; recomputing them is the smaller-memory choice).
  In the backward every connection op runs its backward exactly once per site (see `replay` and
  `backprop`), as without recompute: only the forwards of the connection ops run twice (a linked
  boundary's layer_input only once, see `Replayed`). With a fused backend the site link
  (kernels/site_link.py) still sums post's and pre's x gradients inside pre's backward kernel,
  and a fused boundary takes layer_input's gradient into its own backward
  (kernels/boundary_link.py), as without recompute: where both run the same ops the gradients are
  those of no recompute, bit for bit.
  Adjacent sites of one block run their boundary fused where `fused_boundaries` says so, in the
  forward, the replay and the backward alike, and the fused node's backward runs once per boundary.
  A boundary between two blocks runs post and pre apart (without recompute it is fused): blocks
  are joined by x alone (the next block keeps x_l0 and replays from it; a pipeline stage sends x
  and receives its gradient). Fused, the edge would compute the next block's first coefficients
  and layer_input in the block before, and their gradients would have to cross the edge beside x's.
- `full`: ordinary activation checkpointing (torch.utils.checkpoint) of each block of L_r sites:
  F is rerun as well.

The three phases of the `mhc` backward (`keep_forward`, `replay`, `backprop`) are apart so that a
pipeline stage can replay before it waits for the gradient from the next stage (suite.workloads.dist.pipeline).
`RetainedBytes` counts what the recompute blocks keep between forward and backward, to set
beside Eq. 20's `retained_model` (suite.core.recompute_size).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from kernels import boundary_link, site_link
from suite.core.recompute_size import RECOMPUTE


# ---------------------------------------------------------------- running sites
def site_blocks(sites: list, L_r: int) -> list[list]:
    """The recompute blocks: consecutive runs of L_r sites (the last may be shorter)."""
    if L_r < 1:
        raise ValueError(f"L_r must be >= 1, got {L_r}")
    sites = list(sites)
    return [sites[i:i + L_r] for i in range(0, len(sites), L_r)]


def run_sites(sites: list, x: torch.Tensor, mode: str, L_r: int) -> torch.Tensor:
    """Runs the flat list of sites on the state x [T, n, C] with recompute `mode` over blocks of
    L_r consecutive sites. Without grad mode every mode is a plain forward."""
    if mode not in RECOMPUTE:
        raise ValueError(f"recompute {mode!r} is not one of {', '.join(RECOMPUTE)}")
    if mode == "none" or not torch.is_grad_enabled():
        return _run_block(sites, x)
    for block in site_blocks(sites, L_r):
        if mode == "full":
            _note_retained(x, ())
            x = checkpoint(_run_block, block, x, use_reentrant=False)
        else:
            conn = [p for s in block for p in s.conn]
            # F's parameters are inputs too (their gradient goes to .grad inside the backward),
            # so the block is differentiated even when neither x nor a connection needs it.
            seen = {id(p) for p in conn}
            others = []
            for p in (p for s in block for p in s.parameters()):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    others.append(p)
            x = _ConnectionRecompute.apply(block, len(others), x, *conn, *others)
    return x


def run_layers(layers: list, x: torch.Tensor, mode: str, L_r: int) -> torch.Tensor:
    """For callers that hold layers (suite.workloads.dist.pipeline's stages): their sites in order, run by
    run_sites with the same L_r, which counts sites (two per transformer layer), not layers."""
    return run_sites([s for layer in layers for s in layer.sites], x, mode, L_r)


def _run_block(block, x):
    if not fused_boundaries(block):
        for site in block:
            x = site(x)
        return x
    # Each boundary l -> l+1 is one fused call (post of l with the coefficients of l+1), then
    # l+1's layer_input from the x it wrote: x_{l+1} is read once for its coefficients.
    layer_input, h_post, h_res = block[0].pre(x)
    for i, site in enumerate(block):
        f = site.F(layer_input)
        if i + 1 == len(block):
            return site.post(x, f, h_post, h_res)
        nxt = block[i + 1]
        x, h_pre, h_post, h_res = _boundary_into(nxt, x, f, h_post, h_res)
        layer_input = nxt.ops.apply_pre(x, h_pre)
    return x


def fused_boundaries(block) -> bool:
    """Whether a block's adjacent sites run their boundaries fused: every site asks for it and
    shares one backend that has the fused boundary (kernels.Ops.post_coeffs and apply_pre)."""
    ops = getattr(block[0], "ops", None) if block else None
    return (len(block) > 1 and ops is not None and ops.post_coeffs is not None
            and ops.apply_pre is not None
            and all(getattr(s, "boundary_fusion", False) and getattr(s, "ops", None) is ops
                    for s in block))


def _boundary_into(nxt, x, f, h_post, h_res):
    """The fused boundary into site `nxt`: post of the site before (x, f, h_post, h_res) with
    nxt's coefficients. Returns (x_next, h_pre, h_post, h_res), the last three nxt's."""
    return nxt.ops.post_coeffs(x, f, h_post, h_res, *nxt.conn, **nxt.opts)


class _ConnectionRecompute(torch.autograd.Function):
    """One block of sites: forward keeps x0 and each F's output (and F's own graph); backward
    reruns the connection ops from x0 and walks the sites in reverse, backpropagating each F
    through the graph it kept. F's parameter gradients accumulate into .grad (as in a
    reentrant checkpoint), so the model is trained with loss.backward()."""

    @staticmethod
    def forward(ctx, sites, n_others, x0, *params):
        x, f_graphs, li_leaves = keep_forward(sites, x0)
        ctx.sites, ctx.n_others = sites, n_others
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
        return (None, None, g, *param_grads, *[None] * ctx.n_others)


# ---------------------------------------------------------------- the three phases of `mhc`
def keep_forward(sites, x0):
    """Forward of one block without autograd for the connection: (x out, each F's output
    with F's own graph, each F's input leaf). Each connection op runs once here, F once; the
    block's boundaries are fused where `fused_boundaries` says so."""
    _note_retained(x0, None)
    # the block's own boundaries only: its edges stay post and pre (module docstring)
    fused = fused_boundaries(sites)
    x = x0
    f_graphs, li_leaves = [], []
    with torch.no_grad():
        for i, site in enumerate(sites):
            if i == 0 or not fused:
                layer_input, h_post, h_res = site.pre(x)
            li = layer_input.detach().requires_grad_(True)
            with torch.enable_grad():
                f = site.F(li)
            f_graphs.append(f)
            li_leaves.append(li)
            if fused and i + 1 < len(sites):
                nxt = sites[i + 1]
                x, h_pre, h_post, h_res = _boundary_into(nxt, x, f.detach(), h_post, h_res)
                layer_input = nxt.ops.apply_pre(x, h_pre)
            else:
                x = site.post(x, f.detach(), h_post, h_res)
    _note_retained(None, f_graphs)
    return x, f_graphs, li_leaves


class Replayed:
    """One site's recomputed connection, cut into graphs joined only by leaves. The site's input
    op makes (layer_input, h_post, h_res), one of
      pre:       x_in -> (layer_input, h_post, h_res)                       [+ the site's parameters]
      boundary:  (x_in, f_leaf, hp_leaf, hr_leaf of the site before) -> (x_made, h_pre, h_post,
                 h_res), then layer_input from (x_made, h_pre)              [+ the site's parameters]
    where x_in is x_made detached at a fused boundary into the site. The site's output op is
      post:      (x_in, f_leaf, hp_leaf, hr_leaf) -> x_out
    or, when the next site's input op is a fused boundary, that boundary (x_out None).
    hp_leaf / hr_leaf are detached copies of h_post / h_res (None where the input op returns None,
    as for residual), so a backward through the output op stops at them and never enters the
    input op's graph. At a boundary with a boundary link (kernels/boundary_link.py) `link` is that
    link and layer_input None: the boundary's backward takes layer_input's gradient from the
    link, so layer_input's own backward, and with it its recomputed forward, is not needed."""

    __slots__ = ("x_in", "layer_input", "h_post", "h_res", "f_leaf", "hp_leaf", "hr_leaf",
                 "x_out", "x_made", "link")

    def __init__(self, x_in, layer_input, h_post, h_res, f_leaf, hp_leaf, hr_leaf, x_out,
                 x_made=None, link=None):
        self.x_in, self.layer_input, self.h_post, self.h_res = x_in, layer_input, h_post, h_res
        self.f_leaf, self.hp_leaf, self.hr_leaf, self.x_out = f_leaf, hp_leaf, hr_leaf, x_out
        self.x_made, self.link = x_made, link


def _leaf(t):
    if t is None:
        return None
    return t.detach().requires_grad_(t.requires_grad)


def replay(sites, x0, f_graphs) -> list:
    """Reruns the connection ops from the block input x0 with autograd (F is not rerun): one
    Replayed per site, the block's boundaries fused where `fused_boundaries` says so (as
    keep_forward ran them). The graphs are joined only by leaves."""
    fused = fused_boundaries(sites)
    recomputed = []
    with torch.enable_grad():
        x = x0.detach()
        for i, (site, f) in enumerate(zip(sites, f_graphs)):
            x_made = link = None
            if i == 0 or not fused:
                x_in = x.detach().requires_grad_(True)
                layer_input, h_post, h_res = site.pre(x_in)
            else:
                prev = recomputed[-1]
                x_made, h_pre, h_post, h_res = _boundary_into(site, prev.x_in, prev.f_leaf,
                                                              prev.hp_leaf, prev.hr_leaf)
                link = boundary_link.link_of(x_made)
                layer_input = site.ops.apply_pre(x_made, h_pre) if link is None else None
                x_in = x_made.detach().requires_grad_(True)
            hp_leaf, hr_leaf = _leaf(h_post), _leaf(h_res)
            f_leaf = f.detach().requires_grad_(True)
            x_out = None
            if not fused or i + 1 == len(sites):
                x_out = site.post(x_in, f_leaf, hp_leaf, hr_leaf)
                x = x_out.detach()
            recomputed.append(Replayed(x_in, layer_input, h_post, h_res, f_leaf, hp_leaf,
                                       hr_leaf, x_out, x_made, link))
    return recomputed


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def _handed_over(h_res, g_x_post):
    """Post's x gradient handed to pre's backward through pre's site link (kernels/site_link.py),
    as a fused post does itself without recompute: a linked pre's dx kernel then adds its own
    share into it in place, so the two shares are summed once, in the kernel's precision,
    exactly as without recompute. Post here is fed a detached h_res, so it never claims the link
    itself. Returns the link, or None (no link: a backend without one, or nothing to hand)."""
    if h_res is None or g_x_post is None:
        return None
    link = site_link.link_of(h_res)
    if link is not None:
        link.put(g_x_post)
    return link


def _joined(link, g_x_post, g_x_pre):
    """The site's input gradient: pre's, which includes post's when pre took it from the link;
    else the sum of the two."""
    if link is None:
        return _add(g_x_post, g_x_pre)
    left = link.take()
    if left is not None:                  # pre did not take it (a path without the link)
        return _add(left, g_x_pre)
    return g_x_pre if g_x_pre is not None else g_x_post


def _coefficients(rec):
    """(output, leaf) of the coefficients that reach the site's output op with a gradient."""
    return [(out, leaf) for out, leaf in ((rec.h_post, rec.hp_leaf), (rec.h_res, rec.hr_leaf))
            if leaf is not None and leaf.requires_grad]


def _output_inputs(rec):
    """What a backward through the site's output op differentiates for: f, x_in, coefficients."""
    return [rec.f_leaf, rec.x_in] + [leaf for _, leaf in _coefficients(rec)]


def backprop(sites, f_graphs, li_leaves, recomputed, grad_x):
    """Walks the sites in reverse: returns (the gradient at the block input, the connection
    parameters' gradients in the order of [p for s in sites for p in s.conn], None for a
    parameter that gets none). F's parameter gradients accumulate into .grad. Per site:
      1. the output op's backward once: one autograd call through post for d/d(f, x_in, h_post,
         h_res) of x_out, or, where the next site's input op is a fused boundary, what that
         boundary's backward gave in step 3 of the next site;
      2. F's backward once, through the graph keep_forward kept: fills li.grad and F's weights;
      3. the input op's backward once:
         pre, with (li.grad, g_h_post, g_h_res): d/d(x_in, params); the gradient into the site's
         input is the sum of post's and pre's x_in gradients (added by a linked pre's own kernel
         when the backend has site links, see _handed_over);
         a fused boundary, with (x_in's gradient from step 1, li.grad, g_h_post, g_h_res):
         d/d(params) and step 1 of the site before; li.grad goes in through the boundary link
         where there is one, as layer_input's own backward hands it over without recompute
         (kernels/boundary_link.py; here every input of the boundary is a leaf, where
         torch.autograd.grad keeps layer_input from handing it over itself).
    Each site's entry of `recomputed` is set to None once used, so its graph is freed as the
    walk goes on."""
    g = grad_x
    param_grads: list = []
    out_grads = None        # step 1 of the site, when the next site's boundary did it
    for i in range(len(sites) - 1, -1, -1):
        site, f, li, rec = sites[i], f_graphs[i], li_leaves[i], recomputed[i]
        recomputed[i] = None
        coef = _coefficients(rec)
        # 1. post, once (unless the next site's boundary was it)
        if out_grads is None:
            out_grads = torch.autograd.grad(rec.x_out, _output_inputs(rec), g, allow_unused=True)
        g_f, g_x, *g_coef = out_grads
        out_grads = None
        # 2. F, once
        if g_f is not None and f.requires_grad:
            torch.autograd.backward(f, g_f)
        # 3. the input op, once
        outs, grads = [], []
        if rec.x_made is not None:
            # x_made always gets a gradient, so the boundary's backward runs in this call and
            # takes what the link holds
            outs.append(rec.x_made)
            grads.append(g_x if g_x is not None else torch.zeros_like(rec.x_made))
        if li.grad is not None:
            if rec.link is not None:
                rec.link.put(li.grad)
            else:
                outs.append(rec.layer_input)
                grads.append(li.grad)
        for (out, _), gc in zip(coef, g_coef):
            if gc is not None and out.requires_grad:
                outs.append(out)
                grads.append(gc)
        params = list(site.conn)
        wanted = [p for p in params if p.requires_grad]
        g_params = {}
        if rec.x_made is not None:
            inputs = _output_inputs(recomputed[i - 1])
            got = torch.autograd.grad(outs, inputs + wanted, grads, allow_unused=True)
            out_grads = got[:len(inputs)]
            g_params = {id(p): gp for p, gp in zip(wanted, got[len(inputs):])}
        elif outs:
            link = _handed_over(rec.h_res, g_x)
            pre_got = torch.autograd.grad(outs, [rec.x_in] + wanted, grads, allow_unused=True)
            g_x = _joined(link, g_x, pre_got[0])
            g_params = {id(p): gp for p, gp in zip(wanted, pre_got[1:])}
        param_grads = [g_params.get(id(p)) for p in params] + param_grads
        li.grad = None
        g = g_x if g_x is not None else torch.zeros_like(rec.x_in)
    return g, param_grads


# ---------------------------------------------------------------- memory accounting
class SavedBytes:
    """Counts the bytes autograd keeps for backward during a forward (CPU-friendly accounting):
    every tensor packed by a saved-tensor hook, each storage counted once."""

    def __init__(self):
        self.storages: dict[tuple, int] = {}

    def _pack(self, t):
        key, nbytes = _storage(t)
        if key is not None:
            self.storages[key] = nbytes
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


_ACTIVE: list["RetainedBytes"] = []


def _note_retained(x0, fs) -> None:
    if not _ACTIVE:
        return
    for counter in _ACTIVE:
        if x0 is not None:
            counter._add("x0", x0)
        for f in fs or ():
            counter._add("f", f)


def _storage(t):
    """(a key of t's storage, its bytes), or (None, 0) where t has no plain storage (sparse,
    nested, fake tensors): nothing a byte count can size."""
    try:
        st = t.untyped_storage()
        return (t.device.type, t.device.index, st.data_ptr()), st.nbytes()
    except (RuntimeError, NotImplementedError):
        return None, 0


class RetainedBytes:
    """What the recompute blocks keep between forward and backward, counted while the context is
    open (works on any device, CPU included): the storage of every block input x_l0 and, under
    `mhc`, of every site's sublayer output f, each storage counted once (a tensor counted as a
    block input is not counted again as an f). Blocks run through run_sites / run_layers and
    through keep_forward directly (suite.workloads.dist.pipeline) are counted; under `full` only the block inputs
    are kept and counted. F's own saved activations are not counted (a residual model keeps
    them too; SavedBytes sees them).

    With L sites of a state [T, n, C] in a dtype of s bytes and blocks of L_r sites:
        x0_bytes == n*C*T*s*ceil(L/L_r) == retained_model(n, C, L, L_r) * T * s
        f_bytes  == C*T*s*L   (mhc only)
        total    == x0_bytes + f_bytes == retained_model(n, C, L, L_r, f_outputs=True) * T * s
    `blocks` is the number of blocks counted, `sites` the number of f tensors."""

    def __init__(self):
        self.x0: dict = {}
        self.f: dict = {}
        self.blocks = 0
        self.sites = 0

    def _add(self, kind: str, t) -> None:
        key, nbytes = _storage(t)
        if kind == "x0":
            self.blocks += 1
        else:
            self.sites += 1
        if key is None or key in self.x0 or key in self.f:
            return
        (self.x0 if kind == "x0" else self.f)[key] = nbytes

    def __enter__(self):
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return False

    @property
    def x0_bytes(self) -> int:
        return sum(self.x0.values())

    @property
    def f_bytes(self) -> int:
        return sum(self.f.values())

    @property
    def total(self) -> int:
        return self.x0_bytes + self.f_bytes
