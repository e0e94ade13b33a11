"""Scope stability: one training run of the case's model on real text, and the mHC paper's
stability metric measured on it as the paper defines it (section 3.1, Figs. 3 and 7).

The metric, Amax Gain Magnitude. Sites are counted separately (attention and FFN, two per layer),
as the paper's x-axis does. For site l of L, the composite mapping from site l to the output is

    P_l = H_res(L) @ H_res(L-1) @ ... @ H_res(l)        (sites counted 1..L)

which is PAPERS.md B.2's prod_{i=1}^{L-l} H_res_{L-i} (Eq. 4, layers counted from 0 there): a
signal entering at site l meets H_res(l) first and H_res(L) last, x_L = P_l x_l + (the branch
terms). Forward gain = max_i |sum_j P_l[i, j]| (the largest absolute row sum), backward
gain = max_j |sum_i P_l[i, j]| (the largest absolute column sum). Per token in fp64, then
averaged over the tokens of one sequence (the first validation window): the paper averages "over
all tokens in a selected sequence" without saying whether before or after the max; this takes
the per-token gain. The single-site gains of H_res(l) alone are kept beside (the paper's Fig. 7a).
The paper's 27B figures (60 sites, trained): HC up to about 3000, mHC at most about 1.6.

Training (constants below; the record's `stability.optimizer` repeats them):
- data: suite.workloads.corpus (bytes of the standard library's sources), T tokens per step in
  windows of seq, the same order for every method of a seed;
- the model of suite.workloads.model (dense or deepseek family) at the case's dtype, with fp32
  master weights: AdamW (the paper's betas 0.9 / 0.95, weight decay 0.1 on matrices only, eps
  1e-8 where the paper prints 1e-20) updates fp32 copies, which are copied back into the model;
  a bf16 weight near 1 (a norm) would otherwise not move at all under updates below 2^-8;
- gradient norm clipped at 1.0 (DeepSeek-V3's setting), the norm before clipping recorded;
- learning rate: linear warmup over the first 5% of steps, then the case's lr, then the paper's
  step decay (x0.316 from 80% of the steps, x0.1 from 90%; Table 5);
- initialisation: the papers' (kernels.reference.init_params), mHC's b per the case's `init`:
  `paper` is b = 0 (h_res starts near uniform 1/n: every product of such matrices is again
  near uniform, so its gain is 1 by construction), `identity` puts +4 on b_res's
  diagonal (kernels.reference.IDENTITY_LOGIT: h_res starts near I, as HC's does).
  alpha = 0.01 in both.

What a run records: the loss of every step, the gradient norm of every step, the validation loss
at EVAL_POINTS evenly spaced steps and at the end, the gains per depth at GAIN_POINTS of the
steps, and the loss spikes: step t is a spike when its loss is not finite or exceeds
SPIKE_FACTOR x the median of the SPIKE_WINDOW losses before it (from step SPIKE_WINDOW on); a run
of consecutive spike steps is one spike. A loss or gradient norm that is not finite ends the run
at that step (`diverged_at`); nothing is measured on the model after it.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from kernels import reference
from suite.core.scenario import Case
from suite.workloads import corpus
from suite.workloads.model import Transformer, model_config

PAPER_MAX_GAIN = {"hc": 3000.0, "mhc": 1.6}
PAPER_SOURCE = ("mHC paper (arXiv 2512.24880v2) sec. 3.1 and 5.4, Figs. 3 and 7: the 27B model, "
                "60 sites, trained")
GAIN_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)
EVAL_POINTS = 20
SPIKE_FACTOR, SPIKE_WINDOW = 1.5, 50
FINAL_WINDOW = 50           # the final train loss: the mean of the last 50 steps (or last tenth)
WARMUP_FRACTION = 0.05
DECAY = ((0.8, 0.316), (0.9, 0.1))
BETAS, ADAM_EPS, WEIGHT_DECAY, CLIP = (0.9, 0.95), 1e-8, 0.1, 1.0


# ---------------------------------------------------------------- the metric
@torch.no_grad()
def h_res_per_site(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """h_res [tokens, n, n] of every site in order on one forward pass (empty for residual)."""
    x = model.streams_in(tokens)
    out = []
    for site in model.sites():
        layer_input, h_post, h_res = site.pre(x)
        if h_res is not None:
            out.append(h_res)
        x = site.post(x, site.F(layer_input), h_post, h_res)
    return out


def composites(h_res: list[torch.Tensor]) -> list[torch.Tensor]:
    """[P_1, ..., P_L] with P_l = H_res(L) @ ... @ H_res(l), per token, in fp64."""
    out, P = [], None
    for h in reversed(h_res):
        h = h.to(torch.float64)
        P = h if P is None else torch.bmm(P, h)     # P_l = P_{l+1} @ H_res(l)
        out.append(P)
    return out[::-1]


def forward_gain(P: torch.Tensor) -> torch.Tensor:
    """Per token: the largest absolute row sum of [..., n, n]."""
    return P.sum(dim=-1).abs().amax(dim=-1)


def backward_gain(P: torch.Tensor) -> torch.Tensor:
    """Per token: the largest absolute column sum of [..., n, n]."""
    return P.sum(dim=-2).abs().amax(dim=-1)


def amax_gains(h_res: list[torch.Tensor]) -> dict:
    """Per depth l = 1..L (lists of L): the composite's forward and backward gains and the single
    site's, each the mean over the tokens of the per-token gain."""
    mean = lambda t: t.mean().item()   # noqa: E731
    P = composites(h_res)
    return {"forward": [mean(forward_gain(p)) for p in P],
            "backward": [mean(backward_gain(p)) for p in P],
            "single_forward": [mean(forward_gain(h.to(torch.float64))) for h in h_res],
            "single_backward": [mean(backward_gain(h.to(torch.float64))) for h in h_res]}


# ---------------------------------------------------------------- schedule and spikes
def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over WARMUP_FRACTION of the steps, then peak, then Table 5's step decay."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    factor = 1.0
    for at, f in DECAY:
        if step >= at * steps:
            factor = f
    return peak * factor


def spike_steps(losses: list, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW) -> list[int]:
    """Steps whose loss is not finite or above factor x the median of the window before it."""
    out = []
    for t in range(len(losses)):
        x = losses[t]
        if x is None or not math.isfinite(x):
            out.append(t)
            continue
        if t < window:
            continue
        before = [v for v in losses[t - window:t] if v is not None and math.isfinite(v)]
        if before and x > factor * statistics.median(before):
            out.append(t)
    return out


def spike_count(steps: list[int]) -> int:
    """Runs of consecutive spike steps: one surge of many steps is one spike."""
    return sum(1 for i, t in enumerate(steps) if i == 0 or t != steps[i - 1] + 1)


def _num(x) -> float | None:
    """A float for the record: 6 significant digits, None where it is not finite (JSON has no NaN)."""
    return float(f"{x:.6g}") if x is not None and math.isfinite(x) else None


# ---------------------------------------------------------------- the training run
class MasterAdamW:
    """AdamW on fp32 copies of the model's low-precision weights (fp32 ones are updated in place),
    with the gradient norm clipped; `step` returns the norm before clipping (a device scalar)."""

    def __init__(self, model: torch.nn.Module, device):
        params = list(model.parameters())
        self.low = [(p, p.detach().float().clone()) for p in params if p.dtype != torch.float32]
        self.full = [p for p in params if p.dtype == torch.float32]
        for _, m in self.low:
            m.grad = torch.zeros_like(m)
        self.masters = [m for _, m in self.low] + self.full
        groups = [{"params": [m for m in self.masters if m.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [m for m in self.masters if m.dim() < 2], "weight_decay": 0.0}]
        fused = {"fused": True} if torch.device(device).type == "cuda" else {}
        self.opt = torch.optim.AdamW(groups, lr=0.0, betas=BETAS, eps=ADAM_EPS, **fused)

    def step(self, lr: float) -> torch.Tensor:
        with torch.no_grad():
            have = [(m.grad, p.grad) for p, m in self.low if p.grad is not None]
            if have:
                torch._foreach_copy_([g for g, _ in have], [g for _, g in have])
        norm = torch.nn.utils.clip_grad_norm_(self.masters, CLIP, foreach=True)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            if self.low:
                torch._foreach_copy_([p for p, _ in self.low], [m for _, m in self.low])
        for p, _ in self.low:
            p.grad = None
        for p in self.full:
            p.grad = None
        return norm


def build(case: Case, device) -> Transformer:
    """The case's model at its init (mHC's b per `init`), seeded by the case's seed."""
    cfg = model_config(case, identity_init=case.init == "identity")
    return Transformer(cfg, seed=case.seed, device=device)


def checkpoints(steps: int) -> tuple[list[int], list[int]]:
    """The steps (counted as steps done) at which validation runs and gains are measured."""
    evals = sorted({round(steps * k / EVAL_POINTS) for k in range(1, EVAL_POINTS + 1)})
    gains = sorted({round(steps * f) for f in GAIN_POINTS})
    return evals, gains


@torch.no_grad()
def validation_loss(model: Transformer, batches: corpus.Batches) -> float:
    total, count = 0.0, 0
    for tokens, targets in batches.validation():
        total += model(tokens, targets).item() * tokens.shape[0]
        count += tokens.shape[0]
    return total / count


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train(case: Case, device) -> dict:
    """Trains the case's model for case.steps steps and returns the record's `stability` part
    plus `step_ms` (wall clock per step, one sample per stretch between checkpoints)."""
    data = corpus.load()
    model = build(case, device)
    batches = corpus.Batches(data, case.seq, case.T // case.seq, case.seed, device)
    opt = MasterAdamW(model, device)
    moe = model.moe_layers()
    steps = case.steps
    evals, gain_at = checkpoints(steps)
    losses = torch.full((steps,), float("nan"), device=device)
    norms = torch.full((steps,), float("nan"), device=device)
    probe = batches.probe()
    gains = []
    if case.method != "residual":
        gains.append({"step": 0, **amax_gains(h_res_per_site(model, probe))})
    val, step_ms, done, diverged = [], [], 0, None
    for stop in sorted((set(evals) | set(gain_at)) - {0}):
        _sync(device)
        t0 = time.perf_counter()
        for step in range(done, stop):
            tokens, targets = batches.next_train()
            loss = model(tokens, targets)
            loss.backward()
            norms[step] = opt.step(lr_at(step, steps, case.lr))
            losses[step] = loss.detach()
            for m in moe:                      # aux-loss-free balancing (suite.workloads.deepseek)
                m.update_router_bias()
        _sync(device)
        step_ms.append(1e3 * (time.perf_counter() - t0) / (stop - done))
        # A gradient norm that is not finite has already spoilt the weights (clipping scales
        # by it), so the run ends there as it does at a loss that is not finite.
        seen = zip(losses[done:stop].tolist(), norms[done:stop].tolist())
        bad = [done + i for i, (x, g) in enumerate(seen) if not (math.isfinite(x) and math.isfinite(g))]
        done = stop
        if bad:
            diverged = bad[0]
            break
        if stop in evals:
            val.append({"step": stop, "loss": _num(validation_loss(model, batches))})
        if stop in gain_at and case.method != "residual":
            gains.append({"step": stop, **amax_gains(h_res_per_site(model, probe))})
    run = losses[:done].tolist()
    if diverged is not None:
        run = run[:diverged + 1]
    spikes = spike_steps(run)
    tail = run[-min(FINAL_WINDOW, max(1, steps // 10)):]
    return {
        "step_ms": step_ms,
        "stability": {
            "corpus": data.describe(),
            "init": init_description(case),
            "optimizer": optimizer_description(case),
            "tokens_per_step": case.T, "steps_run": len(run), "diverged_at": diverged,
            "loss": [_num(x) for x in run],
            "grad_norm": [_num(x) for x in norms[:len(run)].tolist()],
            "val_loss": val,
            "spike_rule": {"factor": SPIKE_FACTOR, "window": SPIKE_WINDOW},
            "spike_steps": spikes, "spikes": spike_count(spikes),
            "gain_order": "P_l = H_res(L) ... H_res(l): from site l to the last site, sites "
                          "counted separately; per-token gain averaged over one sequence",
            "gains": [{k: (v if k == "step" else [_num(x) for x in v]) for k, v in g.items()}
                      for g in gains],
            "max_gain": max_gains(gains),
            "final": {"train_loss": (_num(statistics.fmean(tail)) if tail and diverged is None
                                     else None),
                      "val_loss": val[-1]["loss"] if val and diverged is None else None},
            "paper": {"max_gain": PAPER_MAX_GAIN.get(case.method), "source": PAPER_SOURCE},
        },
    }


def max_gains(gains: list[dict]) -> dict | None:
    """The largest gain over depth at init, at the last measurement and over every measurement."""
    if not gains:
        return None

    def top(g):
        return {"forward": _num(max(g["forward"])), "backward": _num(max(g["backward"]))}

    return {"init": top(gains[0]), "end": top(gains[-1]), "end_step": gains[-1]["step"],
            "peak": {d: _num(max(max(g[d]) for g in gains)) for d in ("forward", "backward")}}


def init_description(case: Case) -> str:
    if case.method == "residual":
        return "residual: no connection parameters"
    if case.method == "hc":
        return "HC paper Eq. 14: b_res = I, b_pre one-hot, b_post = 1, s = 0.01, projections 0"
    diag = identity_diagonal(case.n)
    if case.init == "identity":
        return (f"identity: alpha = 0.01, b_res diagonal {reference.IDENTITY_LOGIT:g} (h_res diagonal "
                f"{diag:.3f} at n = {case.n}), other b 0, phi ~ N(0, 0.02^2)")
    return "paper: alpha = 0.01, b = 0 (h_res near uniform 1/n), phi ~ N(0, 0.02^2)"


def identity_diagonal(n: int) -> float:
    """h_res's diagonal at the identity init when the logits are b_res alone: Sinkhorn leaves a
    matrix with equal row and column sums as it is, so it is e^d / (e^d + n - 1)."""
    e = math.exp(reference.IDENTITY_LOGIT)
    return e / (e + n - 1)


def optimizer_description(case: Case) -> dict:
    return {"name": "AdamW", "betas": list(BETAS), "eps": ADAM_EPS,
            "weight_decay": WEIGHT_DECAY, "decay_on": "tensors of 2 or more dims",
            "master_weights": "fp32", "clip_grad_norm": CLIP, "lr": case.lr,
            "warmup_steps": max(1, round(WARMUP_FRACTION * case.steps)),
            "schedule": "linear warmup, then constant, x0.316 from 80% and x0.1 from 90% of the steps",
            "batch": case.T // case.seq, "seq": case.seq, "seed": case.seed}
