"""Stability as the mHC paper plots it: Amax Gain Magnitude of composite h_res products over depth.

For sites 1..K (attention and MLP counted separately, as the paper's x-axis does), the composite
mapping after site k is P_k = h_res(k) ... h_res(1), per token, multiplied in fp64.
Forward gain = max_i |sum_j P[i, j]| (worst row sum), backward gain = max_j |sum_i P[i, j]|
(worst column sum), each averaged over the tokens of one sequence (MATH.md; the paper averages
"over all tokens in a selected sequence"; whether it averages matrices or per-token gains is not
stated, this takes the per-token gain). The paper's 27B figures: HC up to about 3000, mHC at
most about 1.6.

`train` runs a short training run on synthetic data: sequences from a fixed random Markov chain
whose next token is one of a few likely successors, so the loss has somewhere to fall.
"""
from __future__ import annotations

import torch

from suite.workloads.model import Transformer

PAPER_MAX_GAIN = {"hc": 3000.0, "mhc": 1.6}


@torch.no_grad()
def h_res_per_site(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """h_res [T, n, n] of every site in order, on one forward pass of `tokens`."""
    x = model.streams_in(tokens)
    out = []
    for site in model.sites():
        layer_input, h_post, h_res = site.pre(x)
        out.append(h_res)
        x = site.post(x, site.F(layer_input), h_post, h_res)
    return out


def amax_gains(h_res: list[torch.Tensor], seq: int) -> dict:
    """Per depth: forward and backward gain of the composite product, averaged over the tokens
    of the first sequence; also the single-site gains."""
    P = None
    fwd, bwd, single_fwd, single_bwd = [], [], [], []
    for h in h_res:
        h = h[:seq].to(torch.float64)
        P = h if P is None else torch.bmm(h, P)
        fwd.append(P.sum(dim=-1).abs().amax(dim=-1).mean().item())
        bwd.append(P.sum(dim=-2).abs().amax(dim=-1).mean().item())
        single_fwd.append(h.sum(dim=-1).abs().amax(dim=-1).mean().item())
        single_bwd.append(h.sum(dim=-2).abs().amax(dim=-1).mean().item())
    return {"forward": fwd, "backward": bwd, "single_forward": single_fwd,
            "single_backward": single_bwd}


def markov_batches(vocab: int, batch: int, seq: int, seed: int, device, branching: int = 4):
    """An endless iterator of (tokens, targets) from one fixed random Markov chain."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, branching), generator=gen).to(device)
    dgen = torch.Generator(device=device).manual_seed(seed + 1)
    while True:
        tok = torch.empty(batch, seq + 1, dtype=torch.long, device=device)
        tok[:, 0] = torch.randint(0, vocab, (batch,), generator=dgen, device=device)
        choice = torch.randint(0, branching, (batch, seq), generator=dgen, device=device)
        for t in range(seq):
            tok[:, t + 1] = successors[tok[:, t], choice[:, t]]
        yield tok[:, :-1], tok[:, 1:]


def train(model: Transformer, steps: int, batch: int, lr: float = 1e-3, seed: int = 0,
          device="cpu") -> list[float]:
    """AdamW on the synthetic chain; returns the loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = markov_batches(model.cfg.vocab, batch, model.cfg.seq, seed, device)
    losses = []
    for _ in range(steps):
        tokens, targets = next(data)
        opt.zero_grad(set_to_none=True)
        loss = model(tokens, targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
