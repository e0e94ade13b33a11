"""Scope layer and model: build the timed step, gate it against fp64, time cases interleaved.

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

Interleaving: the overhead of a method is a ratio of times, so its cases must see the same GPU
state. Cases that differ only in method, backend, n and recompute (one comparison group) are
built together and timed in ROUNDS rounds; each round times every case in turn, the order
rotated each round, and every sample keeps its round index for the bootstrap (suite.analysis.overhead).
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from dataclasses import replace

import torch

import kernels
from kernels import reference
from suite.analysis import predict
from suite.core.dtypes import ELEMENT_BYTES
from suite.core.guard import deadline, failure, first_line
from suite.core.scenario import Case
from suite.core.tolerance import rel_err
from suite.measure.timing import Timer, Timing, matmul_rate_tflops
from suite.store.runs import new_record, write_json
from suite.workloads import deepseek, fastest, recompute
from suite.workloads.availability import unavailable
from suite.workloads.model import (Layer, ModelConfig, Transformer, connection_params, init_weights,
                                   model_config, share_weights)

ROUNDS = 8                 # scope layer
MODEL_ROUNDS = 20          # scope model: whole steps, the overhead's bootstrap resamples rounds
MIN_PER_ROUND = 3
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
GROUP_FIELDS = ("device", "scope", "C", "T", "seq", "layers", "heads", "mlp_ratio", "vocab",
                "dtype", "mode", "gpus", "family", "accum", "depth")


def group_key(case: Case) -> str:
    blob = json.dumps({k: getattr(case, k) for k in GROUP_FIELDS}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- the timed step
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


def _activation_peak(step: Step, timer: Timer) -> int | None:
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


def memory_budget(device: str) -> float:
    """Persistent bytes one subgroup may hold: 60% of the GPU, leaving room for one step's
    activations and the gate; unbounded on a CPU (tests use tiny shapes)."""
    if device != "cuda" or not torch.cuda.is_available():
        return math.inf
    return 0.6 * torch.cuda.get_device_properties(0).total_memory


def _baselines_of(case: Case, cases: list[Case]) -> list[Case]:
    """What `case` is compared with: the group's residual and its own method without recompute."""
    out = []
    for c in cases:
        if c is case:
            continue
        same_kind = bool(c.cuda_graph) == bool(case.cuda_graph)
        residual = c.method == "residual" and c.recompute == "none" and same_kind
        own_plain = (case.recompute != "none" and c.recompute == "none" and c.method == case.method
                     and c.backend == case.backend and c.n == case.n and same_kind)
        if residual or own_plain:
            out.append(c)
    return out


def subgroups(cases: list[Case], budget: float) -> list[list[Case]]:
    """Eager cases and CUDA-graph cases apart (a graph holds its own memory pool besides the
    weights), each packed by `pack`."""
    eager = [c for c in cases if not c.cuda_graph]
    graphs = [c for c in cases if c.cuda_graph]
    return [s for part in (eager, graphs) if part for s in pack(part, budget)]


def pack(cases: list[Case], budget: float) -> list[list[Case]]:
    """Packs a comparison group into sets that fit the memory budget together; each set holds
    every member's baselines, so a comparison is always between cases timed together. A
    baseline may be timed in several sets; its record comes from the first."""
    sets: list[list[Case]] = []
    current: list[Case] = []
    for case in cases:
        trial = list(current)
        for c in [case] + _baselines_of(case, cases):
            if all(c is not t for t in trial):
                trial.append(c)
        if current and set_estimate(trial) > budget:
            sets.append(current)
            trial = [case]
            for c in _baselines_of(case, cases):
                trial.append(c)
        current = trial
    if current:
        sets.append(current)
    # Keep the scenario's order inside each set.
    order = {id(c): i for i, c in enumerate(cases)}
    return [sorted(s, key=lambda c: order[id(c)]) for s in sets]


def run_group(session, items: list, view=None) -> None:
    """Measures one comparison group (a list of (scenario name, Case)) into session's store."""
    if not items:
        return
    records, passing = {}, []
    for name, case in items:
        if view:
            view.starting(case)
        record = new_group_record(session, case, name)
        records[id(case)] = (case, record)
        t0 = time.perf_counter()
        reason = unavailable(case)
        if reason:
            record.update(status="skipped", reason=reason)
        else:
            try:
                with deadline(case.timeout_s):
                    backends = None
                    if case.backend == kernels.AUTO:
                        choice = fastest.choose(case, session.timer(case.device))
                        record["op_backends"] = choice
                        backends = (choice["pre"], choice["post"])
                    result = check(case, case.device, backends)
                record["check"] = result
                if result["passed"]:
                    passing.append(case)
                else:
                    record.update(status="failed",
                                  reason=f"check failed: {result['worst']} rel err "
                                         f"{result['max_rel_err']:.3g} > tol {result['tol']:.1g}")
            except Exception as exc:  # noqa: BLE001  (one failing case never stops the sweep)
                record.update(failure(exc))
        record["wall_s"] = round(time.perf_counter() - t0, 3)
        gc.collect()
    stored: set = set()

    def store(final: bool) -> None:
        """Writes every record that is final (timed, failed or skipped), so an interrupted group
        keeps its finished sets; a record is filled by the first set that times it only."""
        for key, (case, record) in records.items():
            if key in stored:
                continue
            if record["status"] == "ok" and record["time_ms"] is None:
                if not final:
                    continue
                record.update(status="failed", reason="not timed (its subgroup failed)")
            stored.add(key)
            session.store.add(record)
            if view:
                view.finished(case, record)

    store(final=False)
    if passing:
        device = passing[0].device
        budget = memory_budget(device)
        for index, members in enumerate(subgroups(passing, budget)):
            _time_subgroup(session, members, records, index)
            store(final=False)
    store(final=True)


def _build_steps(members: list[Case], records: dict) -> list:
    """The members' Steps, each sharing its weights with the first model of its kind."""
    built, donors = [], {}
    for case in members:
        choice = records[id(case)][1].get("op_backends")
        backends = (choice["pre"], choice["post"]) if choice else None
        # Eager steps drop their gradients after each step, graphs keep theirs: each kind
        # shares weights, gradients and optimizer state only with its own kind.
        kind = bool(case.cuda_graph)
        donor = donors.get(kind) if case.scope == "model" else None
        step = Step(case, case.device, case.seed, donor=donor, op_backends=backends)
        if case.scope == "model":
            donors.setdefault(kind, step)
        built.append(step)
    return built


def _time_subgroup(session, members: list[Case], records: dict, index: int) -> None:
    """Builds the members, times them interleaved, fills the records not yet timed and gives
    every record the samples of what it was timed with (`interleaved_with`)."""
    built = []
    t0 = time.perf_counter()
    try:
        with deadline(sum(c.timeout_s for c in members)):
            built = _build_steps(members, records)
            timer = session.timer(members[0].device)
            rate = matmul_rate(session, members[0].device)
            model = members[0].scope == "model"
            extra = {}
            if model:
                parts = {}
                for step in built:       # memory and device-only parts before any capture
                    step.eager_call()
                    parts[id(step)] = (measure_memory(step, timer), device_parts(step, timer))
                live = []
                for step in built:
                    if step.case.cuda_graph:
                        try:
                            step.capture()
                        except Exception as exc:  # noqa: BLE001  (recorded as the case's reason)
                            _, record = records[id(step.case)]
                            record.update(status="failed", reason="CUDA graph capture failed: "
                                          + f"{type(exc).__name__}: {first_line(exc)}")
                            continue
                    live.append(step)
                calls = [s.call for s in live]
                head_of = next((s for s in live if s.case.depth and not s.case.cuda_graph
                                and s.case.method == "residual"), None)
                if head_of is not None:
                    calls.append(head_of.head_call)
                timings = timer.interleaved_wall(calls, 1, members[0].rep_ms, MODEL_ROUNDS)
                if head_of is not None:
                    head_t, head_rounds = timings.pop()
                    extra["head:" + head_of.case.case_id] = {
                        "method": "head", "of": head_of.case.case_id,
                        "samples": [round(x, 6) for x in head_t.samples], "rounds": head_rounds}
            else:
                live = built
                timings = timer.interleaved([s.call for s in live], members[0].warmup_ms,
                                            members[0].rep_ms, ROUNDS, MIN_PER_ROUND)
            peers = {c.case_id: {"method": c.method, "backend": c.backend, "n": c.n,
                                 "recompute": c.recompute, "L_r": c.L_r,
                                 "cuda_graph": bool(c.cuda_graph),
                                 "samples": [round(x, 6) for x in t.samples], "rounds": rounds}
                     for c, (t, rounds) in zip([s.case for s in live], timings)}
            peers.update(extra)
            for step, (timing, rounds) in zip(live, timings):
                case, record = records[id(step.case)]
                if record["time_ms"] is None and record["status"] == "ok":
                    if model:
                        _fill_model(session, step, record, timing, rounds, rate,
                                    *parts[id(step)])
                    else:
                        _fill(session, step, record, timing, rounds, timer, rate)
                    record["subgroup"] = index
                    record["interleaved_with"] = {k: v for k, v in peers.items()
                                                  if k != case.case_id}
    except Exception as exc:  # noqa: BLE001  (recorded as failed; the sweep goes on)
        for case in members:
            _, record = records[id(case)]
            if record["time_ms"] is None and record["status"] == "ok":
                record.update(failure(exc))
                record["reason"] = "interleaved timing: " + record["reason"]
    finally:
        spent = time.perf_counter() - t0
        for case in members:
            _, record = records[id(case)]
            record["wall_s"] = round(record.get("wall_s", 0) + spent / len(members), 3)
        built.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def new_group_record(session, case: Case, name: str) -> dict:
    return {**new_record(case, name, session.gpu_uuid, session.env), "group": group_key(case)}


def _fill_common(session, case: Case, record: dict, timing: Timing, rounds: list, rate,
                 kind: str, tokens: int) -> float:
    """What every whole-step record has: its time, rounds, tokens/s, floor bytes and FLOPs, and
    the run's copy and matmul rates. Returns the median in seconds."""
    cost = predict.step_cost(case)
    seconds = timing.median * 1e-3
    record["time_ms"] = timing.summary()
    record["time_kind"] = kind
    record["rounds"] = rounds
    record["tokens_per_s"] = tokens / seconds
    record["bytes"] = {"read": cost.read, "write": cost.write}
    record["flops"] = cost.flops
    record["matmul_flops"] = cost.matmul_flops
    record["gbps"] = cost.total / seconds / 1e9
    record["tflops"] = cost.flops / seconds / 1e12
    copy = session.copy.get(case.device)
    if copy:
        record["copy_gbps"] = copy["gbps"]
    if rate:
        record["matmul_tflops_measured"] = rate["tflops"]
    return seconds


def _fill(session, step: Step, record: dict, timing: Timing, rounds: list, timer, rate) -> None:
    """Scope layer: padded device time per call."""
    _fill_common(session, step.case, record, timing, rounds, rate, "device (padded)",
                 step.case.T)
    act = _activation_peak(step, timer)
    held = step.state_bytes()["params"] + 2 * step.x.numel() * step.x.element_size()
    record["activation_peak_bytes"] = act
    record["peak_mem_bytes"] = None if act is None else act + held     # weights, x and its grad


def _fill_model(session, step: Step, record: dict, timing: Timing, rounds: list, rate,
                memory: dict, device: dict) -> None:
    """Scope model: wall clock per whole step (the headline), with the device-only parts, the
    host's enqueue time, the optimizer's share, memory and model-FLOPs utilisation."""
    case = step.case
    kind = "wall clock per step" + (" (CUDA graph replay)" if case.cuda_graph else "")
    seconds = _fill_common(session, case, record, timing, rounds, rate, kind,
                           case.T * (case.accum or 1))
    wall = timing.median
    record["device"] = device
    record["optimizer_share"] = device["optimizer_ms"] / wall
    host = device.get("host_step_ms")
    record["bound"] = None if host is None else ("host" if host > device["step_ms"] else "device")
    record["wall_over_device"] = wall / device["step_ms"]
    record.update(memory)
    record["peak_mem_bytes"] = memory.get("step_peak_bytes")
    record["model_flops"] = predict.model_flops(case)
    record["tflops"] = record["model_flops"] / seconds / 1e12
    peak = predict.datasheet_tflops(session.env)
    if peak:
        record["mfu"] = record["tflops"] / peak["tflops"]
        record["mfu_peak"] = peak
    if step.moe:
        record["expert_path"] = step.moe[0].path


def matmul_rate(session, device: str) -> dict | None:
    """The bf16 matmul rate of this run, measured once per device and kept in env.json."""
    rates = session.env.setdefault("matmul_rate", {})
    if device not in rates:
        rates[device] = matmul_rate_tflops(session.timer(device))
        write_json(session.store.dir / "env.json", session.env)
    return rates[device]


def groups(items: list) -> list[list]:
    """Splits (name, case) pairs into comparison groups, in first-seen order."""
    out: dict[str, list] = {}
    for name, case in items:
        out.setdefault(group_key(case), []).append((name, case))
    return list(out.values())
