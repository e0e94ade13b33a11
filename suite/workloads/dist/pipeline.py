"""Pipeline parallelism over suite.workloads.model.Transformer: stages, links and the 1F1B schedule.

A stage holds a contiguous slice of the layers; the first also holds the embedding (and the
copy into n streams), the last the final norm, the head and the loss. What crosses a boundary
is the whole residual state [T_mb, n, C] forward and its gradient backward: n times the bytes
of a residual model (MATH.md, pipeline communication).

The schedule is 1F1B (PipeDream-Flush, as in Megatron-LM): stage s of P runs min(P-s-1, M)
warm-up forwards, then alternates one forward and one backward, then drains the backwards.
The loss of each micro-batch is divided by M, so the gradients equal those of one step over
all M micro-batches in one process (tests/test_dist.py checks it).

Each direction of each boundary has its own process group, so activations and gradients never
queue behind each other in one communicator (with NCCL, two sends in opposite directions on one
communicator can each wait for the other's receive). Messages carry the micro-batch as tag.

The three overlap techniques of the mHC paper (section 4.3.3), each switchable:
- `stream`: communication off the compute stream: receives are posted one micro-batch ahead
  and sends are waited for only at the end of the step. Without it every send and receive is
  complete before the next computation starts, as if they ran on the compute stream.
- `priority`: the MLP sites' post kernels run on a high-priority CUDA stream (no effect on a
  CPU, where there are no streams; the record says so).
- `early_recompute`: with recompute mhc or full, a stage replays the connection ops (or the
  whole stage) from its cached input before it waits for the gradient from the next stage.
Recompute here works on whole stages: `full` keeps only the stage input and reruns the stage;
`mhc` keeps each block's input x_l0 and every F output (suite.workloads.recompute) and replays the
connection ops.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from suite.workloads import recompute as rc

TECHNIQUES = ("stream", "priority", "early_recompute")


def parse_overlap(value: str | None) -> set[str]:
    if not value or value == "none":
        return set()
    return set(value.split("+"))


def split_layers(layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) per stage, as even as possible; earlier stages take the extra layers
    (the last stage also computes the head and the loss)."""
    base, extra = divmod(layers, stages)
    out, lo = [], 0
    for s in range(stages):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


# ---------------------------------------------------------------- one stage
class _Saved:
    __slots__ = ("blocks", "embed_out", "loss", "out", "out_leaf", "recomputed", "x_leaf")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, None)


class Stage:
    """Layers [lo, hi) of `model` (a suite.workloads.model.Transformer built identically on every rank),
    with the embedding when first and the head and loss when last."""

    def __init__(self, model, lo: int, hi: int, first: bool, last: bool, recompute: str = "none",
                 L_r: int = 1, microbatches: int = 1):
        self.model = model
        self.layers = list(model.layers)[lo:hi]
        self.first, self.last = first, last
        self.recompute = recompute
        self.L_r = max(1, L_r)
        self.M = microbatches
        self.saved: dict[int, _Saved] = {}
        self.losses: list[torch.Tensor] = []

    def parameters(self) -> list:
        ps = [p for layer in self.layers for p in layer.parameters()]
        if self.first:
            ps.insert(0, self.model.embed)
        if self.last:
            ps += [self.model.final_norm, self.model.head]
        return ps

    def named_parameters(self) -> dict:
        mine = {id(p) for p in self.parameters()}
        return {k: p for k, p in self.model.named_parameters() if id(p) in mine}

    def forward(self, mb: int, x_in=None, tokens=None, targets=None):
        """Runs micro-batch mb; returns the state to send (detached), or on the last stage the
        micro-batch's loss (already divided by M)."""
        st = _Saved()
        if self.first:
            with torch.enable_grad():
                st.embed_out = self.model.streams_in(tokens)
            x_in = st.embed_out
        st.x_leaf = x_in.detach().requires_grad_(True)
        if self.recompute == "none":
            with torch.enable_grad():
                st.out = rc.run_layers(self.layers, st.x_leaf, "none", 1)
            out = st.out
        elif self.recompute == "full":
            with torch.no_grad():
                out = rc.run_layers(self.layers, st.x_leaf, "none", 1)
        else:
            st.blocks = []
            x = st.x_leaf.detach()
            every = [s for layer in self.layers for s in layer.sites]
            for start in range(0, len(every), self.L_r):      # L_r counts sites
                sites = every[start:start + self.L_r]
                x0 = x
                x, f_graphs, li_leaves = rc.keep_forward(sites, x0)
                st.blocks.append((sites, x0, f_graphs, li_leaves))
            out = x
        self.saved[mb] = st
        if not self.last:
            return out.detach()
        st.out_leaf = out.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model.logits(st.out_leaf)
            st.loss = F.cross_entropy(logits.float(), targets.reshape(-1)) / self.M
        self.losses.append(st.loss.detach())
        return st.loss.detach()

    def backward(self, mb: int, wait_grad=None, early: bool = False):
        """Backward of micro-batch mb. `wait_grad()` returns the gradient of this stage's output
        (from the next stage); the last stage makes its own from the loss. Returns the gradient
        of the stage input to send back, or None on the first stage."""
        st = self.saved.pop(mb)
        if early:
            self._replay(st)
        if self.last:
            st.loss.backward()
            g = st.out_leaf.grad
        else:
            g = wait_grad()
        if not early:
            self._replay(st)
        g_in = self._backprop(st, g)
        if self.first:
            st.embed_out.backward(g_in)
            return None
        return g_in.contiguous()

    def _replay(self, st: _Saved) -> None:
        if self.recompute == "full":
            with torch.enable_grad():
                st.out = rc.run_layers(self.layers, st.x_leaf, "none", 1)
        elif self.recompute == "mhc":
            st.recomputed = [rc.replay(sites, x0, fg) for sites, x0, fg, _ in st.blocks]

    def _backprop(self, st: _Saved, g):
        if self.recompute in ("none", "full"):
            st.out.backward(g)
            return st.x_leaf.grad
        for (sites, _, fg, li), rec in zip(reversed(st.blocks), reversed(st.recomputed)):
            g, param_grads = rc.backprop(sites, fg, li, rec, g)
            params = [p for s in sites for p in s.conn]
            for p, gp in zip(params, param_grads):
                if gp is not None:
                    p.grad = gp if p.grad is None else p.grad + gp
        return g


def post_on_stream(model, stream) -> None:
    """Runs the MLP sites' post op on `stream` (the paper's high-priority stream). The stream
    waits for everything enqueued before, and the compute stream waits for it after, so every
    tensor is used in order on both streams; autograd runs the backward of those ops on the
    same stream. Every site's boundary runs unfused here: a post fused into the next site's
    coefficients is no longer a post kernel of its own that could move to the stream."""
    for layer in model.layers:
        for site in (layer.attn, layer.mlp):
            site.boundary_fusion = False
        site = layer.mlp
        plain = site.post

        def on_stream(x, f, h_post, h_res, plain=plain):
            current = torch.cuda.current_stream()
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                out = plain(x, f, h_post, h_res)
            current.wait_stream(stream)
            return out
        site.post = on_stream


# ---------------------------------------------------------------- links between stages
class _Done:
    """A finished message (inline copies, or nothing to do)."""

    def __init__(self, value=None):
        self.value = value

    def wait(self):
        return self.value


class _Work:
    def __init__(self, work, value):
        self.work, self.value = work, value

    def wait(self):
        self.work.wait()
        return self.value


class DistLink:
    """Messages to the neighbouring stages through torch.distributed.

    full=False sends one element per message instead of the state (the dependencies stay, the
    bytes go): the compute-only run. The receiver then computes on its own random state of the
    right shape."""

    def __init__(self, ranks: list[int], stage: int, groups: dict, shape, dtype, device,
                 microbatches: int, full: bool = True, seed: int = 0, fakes=None):
        self.ranks, self.s, self.groups, self.full = ranks, stage, groups, full
        P = len(ranks)
        self.has_prev, self.has_next = stage > 0, stage < P - 1
        size = shape if full else (1,)
        self.act_buf = [torch.empty(size, dtype=dtype, device=device) for _ in range(microbatches)]
        self.grad_buf = [torch.empty(size, dtype=dtype, device=device) for _ in range(microbatches)]
        # Random stand-ins for what is not received (full=False) or not computed (comm-only):
        # one state and one gradient, shared by every micro-batch (and with `fakes`' link).
        if fakes is None:
            gen = torch.Generator(device=device).manual_seed(seed + 7919 * stage)
            act = torch.randn(shape, generator=gen, device=device).to(dtype)
            grad = torch.randn(shape, generator=gen, device=device).to(dtype)
            fakes = ([act] * microbatches, [grad] * microbatches)
        self.fake_act, self.fake_grad = fakes
        self.token = torch.ones(1, dtype=dtype, device=device)

    def _payload(self, t):
        return t if self.full else self.token

    def _received(self, buf, fake):
        return buf if self.full else fake

    def recv_act(self, i):
        g = self.groups[("fwd", self.s - 1)]
        w = dist.irecv(self.act_buf[i], src=self.ranks[self.s - 1], group=g, tag=i)
        return _Work(w, self._received(self.act_buf[i], self.fake_act[i]))

    def send_act(self, i, t):
        g = self.groups[("fwd", self.s)]
        return _Work(dist.isend(self._payload(t), dst=self.ranks[self.s + 1], group=g, tag=i), t)

    def recv_grad(self, i):
        g = self.groups[("bwd", self.s)]
        w = dist.irecv(self.grad_buf[i], src=self.ranks[self.s + 1], group=g, tag=i)
        return _Work(w, self._received(self.grad_buf[i], self.fake_grad[i]))

    def send_grad(self, i, t):
        g = self.groups[("bwd", self.s - 1)]
        return _Work(dist.isend(self._payload(t), dst=self.ranks[self.s - 1], group=g, tag=i), t)


def boundary_groups(ranks: list[int]) -> dict:
    """One group per direction per boundary; every rank of the world must call this, in the
    same order (torch.distributed.new_group is collective)."""
    groups = {}
    for s in range(len(ranks) - 1):
        for direction in ("fwd", "bwd"):
            groups[(direction, s)] = dist.new_group([ranks[s], ranks[s + 1]])
    return groups


class _CopyWork:
    def __init__(self, event, value, keep=None):
        self.event, self.value, self.keep = event, value, keep

    def wait(self):
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
        self.keep = None
        return self.value


class CopyLink:
    """The single-GPU stand-in: one middle stage whose neighbours are host memory. A receive is a
    host-to-device copy from pinned memory, a send a device-to-host copy into it, both on a copy
    engine; with `stream` they run on their own CUDA stream. This is not NVLink or InfiniBand:
    PCIe copies stand in for the link, and every record made with it says so."""

    has_prev = has_next = True

    def __init__(self, shape, dtype, device, microbatches: int, on_side_stream: bool,
                 seed: int = 0):
        self.cuda = torch.device(device).type == "cuda"
        pin = self.cuda
        gen = torch.Generator().manual_seed(seed + 104729)
        def host():
            return torch.randn(shape, generator=gen).to(dtype)
        self.host_act = [host().pin_memory() if pin else host() for _ in range(microbatches)]
        self.host_grad = [host().pin_memory() if pin else host() for _ in range(microbatches)]
        self.host_out = [torch.empty(shape, dtype=dtype, pin_memory=pin)
                         for _ in range(2 * microbatches)]
        self.act_buf = [torch.empty(shape, dtype=dtype, device=device) for _ in range(microbatches)]
        self.grad_buf = [torch.empty(shape, dtype=dtype, device=device) for _ in range(microbatches)]
        self.fake_act = [h.to(device) for h in self.host_act]
        self.fake_grad = [h.to(device) for h in self.host_grad]
        self.stream = torch.cuda.Stream() if (self.cuda and on_side_stream) else None

    def _copy(self, dst, src, value, keep=None):
        if self.stream is None:
            dst.copy_(src, non_blocking=self.cuda)
            return _Done(value)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return _CopyWork(event, value, keep)

    def recv_act(self, i):
        return self._copy(self.act_buf[i], self.host_act[i], self.act_buf[i])

    def recv_grad(self, i):
        return self._copy(self.grad_buf[i], self.host_grad[i], self.grad_buf[i])

    def send_act(self, i, t):
        return self._copy(self.host_out[2 * i], t, t, keep=t)

    def send_grad(self, i, t):
        return self._copy(self.host_out[2 * i + 1], t, t, keep=t)


class NoLink:
    """Compute-only for the stand-in: inputs are already on the device, nothing is sent."""

    has_prev = has_next = True

    def __init__(self, copy_link: CopyLink):
        self.fake_act, self.fake_grad = copy_link.fake_act, copy_link.fake_grad

    def recv_act(self, i):
        return _Done(self.fake_act[i])

    def recv_grad(self, i):
        return _Done(self.fake_grad[i])

    def send_act(self, i, t):
        return _Done(t)

    def send_grad(self, i, t):
        return _Done(t)


# ---------------------------------------------------------------- the 1F1B schedule
def schedule(stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    warmup = min(stages - stage - 1, microbatches)
    order = [("F", i) for i in range(warmup)]
    for i in range(microbatches - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", j) for j in range(microbatches - warmup, microbatches)]
    return order


def run_1f1b(order, stage: Stage | None, link, microbatches: int, overlap: set,
             tokens=None, targets=None) -> None:
    """One step. stage=None runs the messages alone (comm-only): sends carry the link's
    stand-in values. Every posted message is complete when this returns."""
    ahead = "stream" in overlap
    early = "early_recompute" in overlap
    pending: list = []
    posted_act: dict = {}
    posted_grad: dict = {}

    def drain():
        while pending:
            pending.pop(0).wait()

    def receive(posted, post, i):
        if i not in posted:
            posted[i] = post(i)
        if not ahead:
            drain()          # inline: sends complete before the next computation
        value = posted.pop(i).wait()
        if ahead and i + 1 < microbatches and i + 1 not in posted:
            posted[i + 1] = post(i + 1)
        return value

    for kind, i in order:
        if kind == "F":
            x = receive(posted_act, link.recv_act, i) if link.has_prev else None
            if not ahead and not link.has_prev:
                drain()
            if stage is None:
                out = link.fake_act[i]
            else:
                out = stage.forward(i, x, None if tokens is None else tokens[i],
                                    None if targets is None else targets[i])
            if link.has_next:
                pending.append(link.send_act(i, out))
        else:
            wait = (lambda i=i: receive(posted_grad, link.recv_grad, i)) if link.has_next else None
            if not ahead and not link.has_next:
                drain()
            if stage is None:
                if wait:
                    wait()
                g_in = link.fake_grad[i]
            else:
                g_in = stage.backward(i, wait, early)
            if link.has_prev:
                pending.append(link.send_grad(i, g_in))
    drain()
    for w in list(posted_act.values()) + list(posted_grad.values()):
        w.wait()
