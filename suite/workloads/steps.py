"""Scopes layer and model: the timed step, its fp64 gate, its device-only parts and memory.

- `layer`: one transformer layer (two sites), forward and backward with random upstream
  gradients (forward only in mode fwd).
- `model`: one training step of suite.workloads.model.Transformer: forward, cross-entropy, backward and
  AdamW; records tokens/s and peak memory.

Correctness gate (never skipped): the case's model (its backend, dtype, recompute) against the
same model in fp64 with the reference backend, on fresh non-degenerate connection parameters,
same weights, at a gate shape (at most GATE_LAYERS layers, one sequence of at most GATE_SEQ
tokens, C at most GATE_C with the case's head size). F runs in fp32 around a half-precision state
(ModelConfig.f_dtype), so what is gated is the connection and its wiring; loss, output and every
gradient are compared norm-wise against GATE_TOL of the state dtype.

Comparison groups, their interleaved timing and the records they fill are suite.run.groups.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from kernels import reference
from suite.analysis import predict
from suite.core.dtypes import ELEMENT_BYTES
from suite.core.scenario import Case
from suite.core.tolerance import rel_err
from suite.measure.timing import Timer
from suite.workloads import deepseek, recompute
from suite.workloads.model import (Layer, ModelConfig, Transformer, connection_params, init_weights,
                                   model_config, share_weights)

DEVICE_SAMPLES = 5         # padded samples of a micro-batch and of the optimizer step
STEP_PAD_CAP_MS = 1000.0   # a micro-batch enqueues for tens of ms: the pad must outlast it
GATE_LAYERS, GATE_SEQ, GATE_C, GATE_VOCAB = 2, 64, 512, 512
GATE_SEED_OFFSET = 1_000_003
# Norm-wise relative error allowed against fp64. A bf16 state is rounded at every site and its
# gradients at every backward site (about 4e-3 each); two layers make four sites each way, so a
# bf16 model lands near 1e-2 where the single site lands near 3e-3. Wrong wiring or a wrong kernel
# gives errors of order 1 (tests/test_model.py shows one failing).
GATE_TOL = {"bf16": 3e-2, "fp16": 1e-2, "fp32": 1e-4}
# Gradients of the connection's own parameters (phi, b and the scalar gates a / s) are sums over
# every token of products of rounded state gradients and states, with heavy cancellation: on the
# CPU the eager reference backend itself, in bf16, is 0.03 (HC) to 0.09 (mHC) away from fp64 on
# the scalar gates. They get their own bound; a wrong kernel still misses it by far.
GATE_TOL_CONN = {"bf16": 0.2, "fp16": 0.05, "fp32": 1e-4}
class Step:
    """One case's model, optimizer and inputs on its device.

    Scope `model` is what a trainer runs: `accum` micro-batches of T tokens each (forward, loss
    / accum, backward, gradients accumulating), then one AdamW step, then the gradients are
    dropped; `call` is one such step. `microbatch` and `optimizer` are its two parts, timed apart
    for the device-only figures. A model built with a `donor` shares every weight outside its
    connections with the donor's (and the donor's optimizer for them), so the cases of one
    comparison group fit on one GPU together; each step still updates all of its weights.
    Scope `layer`: one layer (two sites), forward and backward with random upstream gradients."""

    def __init__(self, case: Case, device: str, seed: int, donor: "Step | None" = None,
                 op_backends: tuple | None = None):
        self.case = case
        cfg = model_config(case, op_backends=op_backends)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.graph = None
        if case.scope == "model":
            self.module = Transformer(cfg, seed=seed, device=device)
            fused = {"fused": True} if device == "cuda" else {}
            if case.cuda_graph:
                fused["capturable"] = True
            if donor is not None:
                share_weights(self.module, donor.module)
                self.shared_opt = donor.shared_opt
            else:
                rest = [p for n, p in self.module.named_parameters() if ".conn." not in f".{n}"]
                self.shared_opt = torch.optim.AdamW(rest, lr=1e-4, weight_decay=0.1, **fused)
            own = connection_params(self.module)
            self.own_opt = (torch.optim.AdamW(own, lr=1e-4, weight_decay=0.1, **fused)
                            if own else None)
            B, K = case.T // case.seq, case.accum or 1
            self.tokens = torch.randint(0, case.vocab, (K, B, case.seq), generator=gen,
                                        device=device)
            self.targets = torch.roll(self.tokens, -1, dims=2)
            self.moe = self.module.moe_layers()
            self.head_opt = None
        else:
            self.module = Layer(cfg, 0, torch.Generator().manual_seed(seed)).to(device)
            init_weights(self.module, 1, seed, device)
            self.x, self.g = _random_state(case, cfg.streams, gen, device)
        self.params = list(self.module.parameters())

    # -- scope model
    def microbatch(self, k: int = 0):
        loss = self.module(self.tokens[k], self.targets[k])
        (loss / (self.case.accum or 1)).backward()
        return loss

    def optimizer(self):
        self.shared_opt.step()
        if self.own_opt is not None:
            self.own_opt.step()
        with torch.no_grad():
            for moe in self.moe:             # aux-loss-free balancing (suite.workloads.deepseek)
                moe.update_router_bias()

    def zero_grad(self):
        keep = self.graph is not None      # a captured graph owns its gradient buffers
        self.shared_opt.zero_grad(set_to_none=not keep)
        if self.own_opt is not None:
            self.own_opt.zero_grad(set_to_none=not keep)

    def eager_call(self):
        if self.case.scope != "model":
            return self._layer_call()
        for k in range(self.case.accum or 1):
            loss = self.microbatch(k)
        self.optimizer()
        self.zero_grad()
        return loss

    def call(self):
        if self.graph is not None:
            self.graph.replay()
            return None
        return self.eager_call()

    def capture(self) -> None:
        """Captures the whole step (every micro-batch, AdamW, zeroing) as one CUDA graph; raises
        with the reason when capture is not possible."""
        self.graph = torch.cuda.CUDAGraph()     # zero_grad keeps buffers from here on
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.eager_call()
        torch.cuda.current_stream().wait_stream(side)
        try:
            with torch.cuda.graph(self.graph):
                self.eager_call()
        except Exception:
            self.graph = None
            raise

    def head_call(self):
        """Embedding, streams, head, loss, backward and their AdamW: the part of a step that
        does not grow with depth (suite.analysis.overhead extrapolates partial-depth models with it)."""
        if self.head_opt is None:
            m = self.module
            self.head_opt = torch.optim.AdamW([m.embed, m.final_norm, m.head], lr=1e-4,
                                              fused=self.tokens.is_cuda)
        for k in range(self.case.accum or 1):
            loss = self.module.head_loss(self.tokens[k], self.targets[k])
            (loss / (self.case.accum or 1)).backward()
        self.head_opt.step()
        self.head_opt.zero_grad(set_to_none=True)
        self.zero_grad()
        return loss

    def _layer_call(self):
        case = self.case
        for p in self.params:
            p.grad = None
        self.x.grad = None
        with torch.set_grad_enabled(case.mode == "fwd+bwd"):
            out = recompute.run_sites(list(self.module.sites), self.x, case.recompute,
                                      case.L_r or 1)
            if case.mode == "fwd+bwd":
                out.backward(self.g)
        return out

    def state_bytes(self) -> dict:
        """Bytes of this model's parameters, their gradients (one per parameter) and its optimizer
        states (shared ones included)."""
        params = sum(p.numel() * p.element_size() for p in self.params)
        opt = 0
        if self.case.scope == "model":
            for o in (self.shared_opt, self.own_opt):
                if o is None:
                    continue
                for state in o.state.values():
                    opt += sum(v.numel() * v.element_size() for v in state.values()
                               if torch.is_tensor(v) and v.dim() > 0)
        return {"params": params, "grads": params, "optimizer": opt}


def _random_state(case: Case, streams: int, gen, device):
    """x [T, n, C] with per-token-and-stream norms exp(N(0,1)) (never zeros), and its gradient."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "fp64": torch.float64}[case.dtype]
    T, C = case.T, case.C
    scale = torch.exp(torch.randn(T, streams, 1, generator=gen, device=device))
    x = (torch.randn(T, streams, C, generator=gen, device=device) * scale).to(dtype)
    g = torch.randn(T, streams, C, generator=gen, device=device).to(dtype)
    return x.requires_grad_(case.mode == "fwd+bwd"), g


# ---------------------------------------------------------------- the correctness gate
def gate_case(case: Case) -> Case:
    head = case.C // case.heads
    heads = max(1, min(case.heads, GATE_C // head))
    seq = min(case.seq, GATE_SEQ)
    layers = min(case.layers, GATE_LAYERS)
    L_r = None if case.L_r is None else min(case.L_r, 2 * layers)
    return replace(case, C=heads * head, heads=heads, seq=seq, T=seq, layers=layers, L_r=L_r,
                   vocab=None if case.vocab is None else min(case.vocab, GATE_VOCAB))


def _outputs(module, case: Case, cfg: ModelConfig, seed: int, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    if case.scope == "model":
        tokens = torch.randint(0, case.vocab, (case.T // case.seq, case.seq), generator=gen,
                               device=device)
        loss = module(tokens, torch.roll(tokens, -1, dims=1))
        loss.backward()
        outs = {"loss": loss.detach()}
    else:
        gcase = replace(case, dtype=cfg.dtype) if cfg.dtype != "fp64" else case
        x, g = _random_state(gcase, cfg.streams, gen, device)
        x = x.to(torch.float64 if cfg.dtype == "fp64" else x.dtype).detach()
        x.requires_grad_(case.mode == "fwd+bwd")
        out = recompute.run_sites(list(module.sites), x, cfg.recompute, cfg.L_r)
        outs = {"x_next": out.detach()}
        if case.mode == "fwd+bwd":
            out.backward(g.to(out.dtype))
            outs["d_x"] = x.grad
    for name, p in module.named_parameters():
        if p.grad is not None:
            outs["d_" + name] = p.grad
        elif case.mode == "fwd+bwd":
            outs["d_" + name] = None
    return outs


def _build(case: Case, cfg: ModelConfig, seed: int, device: str):
    if case.scope == "model":
        m = Transformer(cfg, seed=seed, device=device)
        m.randomise_connections(seed)
    else:
        m = Layer(cfg, 0, torch.Generator().manual_seed(seed)).to(device)
        init_weights(m, 1, seed, device)
        gen = torch.Generator().manual_seed(seed)
        for site in m.sites:
            with torch.no_grad():
                for p, v in zip(site.conn, reference.random_params(cfg.method, cfg.n, cfg.C,
                                                                   gen)):
                    p.copy_(v)
    for moe in (mod for mod in m.modules() if isinstance(mod, deepseek.MoE)):
        # Fixed routing: a bf16 state and its fp64 copy could otherwise pick different experts
        # for a token near a tie, an error of F's, not of the connection under test.
        with torch.no_grad():
            moe.router.zero_()
            moe.router_bias.copy_(torch.arange(moe.router_bias.numel(), dtype=torch.float32))
    return m


def check(case: Case, device: str, op_backends: tuple | None = None) -> dict:
    """The case's model against the fp64 reference model; a dict like suite.run.check's."""
    g = gate_case(case)
    seed = case.seed + GATE_SEED_OFFSET
    half = case.dtype in ("bf16", "fp16")
    cfg = model_config(g, f_dtype="fp32" if half else None, op_backends=op_backends)
    ref_cfg = model_config(g, backend="torch", dtype="fp64", recompute="none")
    got_model = _build(g, cfg, seed, device)
    ref_model = _build(g, ref_cfg, seed, device)
    ref_model.load_state_dict(got_model.state_dict())     # same values, upcast exactly
    got = _outputs(got_model, g, cfg, seed, device)
    ref = _outputs(ref_model, g, ref_cfg, seed, device)
    errors, tols = {}, {}
    for name, want in ref.items():
        have = got.get(name)
        errors[name] = math.inf if have is None or want is None else rel_err(have, want)
        tols[name] = (GATE_TOL_CONN if ".conn." in name else GATE_TOL)[case.dtype]
    worst = max(errors, key=lambda k: errors[k] / tols[k])
    del got_model, ref_model, got, ref
    return {"max_rel_err": errors[worst], "tol": tols[worst],
            "passed": all(errors[k] <= tols[k] for k in errors),
            "worst": worst, "T": g.T, "errors": errors, "tols": tols,
            "gate_shape": {"C": g.C, "heads": g.heads, "layers": g.layers, "seq": g.seq,
                           "vocab": g.vocab, "f_dtype": cfg.f_dtype or case.dtype},
            "reference": "fp64 model, backend torch, recompute none"
                         + ("; MoE routing fixed (router zero, distinct biases)"
                            if case.family == "deepseek" else "")}


# ---------------------------------------------------------------- device parts and memory
def device_parts(step: Step, timer: Timer) -> dict:
    """Padded device time and host enqueue time of one micro-batch and of the optimizer step
    (suite.measure.timing: the pad removes the host's time while it stays ahead); a step's device time
    is accum * micro-batch + optimizer."""
    K = step.case.accum or 1
    mb = timer.time(step.microbatch, warmup_ms=0.0, rep_ms=0.0, min_samples=DEVICE_SAMPLES,
                    pad_cap_ms=STEP_PAD_CAP_MS, b2b_calls=0)
    opt = timer.time(step.optimizer, warmup_ms=0.0, rep_ms=0.0, min_samples=DEVICE_SAMPLES,
                     pad_cap_ms=STEP_PAD_CAP_MS, b2b_calls=0)
    step.zero_grad()
    out = {"microbatch_ms": mb.median, "optimizer_ms": opt.median,
           "step_ms": K * mb.median + opt.median, "pad_ms": max(mb.pad_ms, opt.pad_ms),
           "microbatch_samples": [round(x, 4) for x in mb.samples],
           "optimizer_samples": [round(x, 4) for x in opt.samples]}
    if mb.host_ms is not None:
        out.update(host_microbatch_ms=mb.host_ms, host_optimizer_ms=opt.host_ms,
                   host_step_ms=K * mb.host_ms + opt.host_ms)
        out["pad_covered"] = bool(mb.pad_ms >= mb.host_ms and opt.pad_ms >= opt.host_ms)
    return out


def measure_memory(step: Step, timer: Timer) -> dict:
    """Device memory of one eager step of scope model (None values on a CPU):
    - retained_bytes: allocated after one micro-batch's forward (loss computed) less before it:
      what the forward keeps for the backward;
    - activation_peak_bytes: the step's peak less what was allocated before it and less the
      gradients it ends with: the step's peak less parameters, gradients and optimizer state;
    - step_peak_bytes: the step's peak, everything included."""
    if not timer.cuda:
        return {"retained_bytes": None, "activation_peak_bytes": None, "step_peak_bytes": None}
    torch.cuda.synchronize()
    step.zero_grad()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step.module(step.tokens[0], step.targets[0])
    torch.cuda.synchronize()
    retained = torch.cuda.memory_allocated() - before
    (loss / (step.case.accum or 1)).backward()
    del loss
    for k in range(1, step.case.accum or 1):
        step.microbatch(k)
    step.optimizer()
    torch.cuda.synchronize()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in step.params if p.grad is not None)
    peak = torch.cuda.max_memory_allocated()
    step.zero_grad()
    return {"retained_bytes": retained, "activation_peak_bytes": peak - before - grads,
            "step_peak_bytes": peak, "state_bytes": step.state_bytes()}


def activation_peak(step: Step, timer: Timer) -> int | None:
    """Scope layer: device memory a call needs above what was allocated before it."""
    if not timer.cuda:
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step.call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def persistent_estimate(case: Case) -> int:
    """Bytes a built case holds between steps: weights, gradients and AdamW's two moments in the
    state dtype (connection parameters ignored: they are small)."""
    s = ELEMENT_BYTES[case.dtype]
    return predict.weight_count(case) * s * (4 if case.scope == "model" else 2)


def set_estimate(cases: list[Case]) -> int:
    """Bytes a set of cases holds together: models of scope model share their weights (Step's
    donor), eager ones with each other and CUDA-graph ones with each other."""
    total = sum(persistent_estimate(c) for c in cases if c.scope != "model")
    for kind in (False, True):
        shared = [c for c in cases if c.scope == "model" and bool(c.cuda_graph) == kind]
        total += max(map(persistent_estimate, shared)) if shared else 0
    return total
