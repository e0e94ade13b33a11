"""Scope layer and model: build the timed step, gate it against fp64, time cases interleaved.

- `layer`: one transformer layer (two sites), forward and backward with random upstream
  gradients (forward only in mode fwd).
- `model`: one training step of suite.model.Transformer: forward, cross-entropy, backward and
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
rotated each round, and every sample keeps its round index for the bootstrap (suite.overhead).
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import time
import traceback
from dataclasses import replace

import torch

from suite import predict
from suite.availability import unavailable
from suite.guard import deadline, first_line
from suite.model import Layer, ModelConfig, Transformer, init_weights, model_config
from suite.scenario import Case
from suite.timing import Timer, Timing
from suite.tolerance import rel_err

ROUNDS = 8
MIN_PER_ROUND = 3
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
                "dtype", "mode", "gpus")


def group_key(case: Case) -> str:
    blob = json.dumps({k: getattr(case, k) for k in GROUP_FIELDS}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- the timed step
class Step:
    """One case's model, optimizer and inputs on its device; `call` is one timed step."""

    def __init__(self, case: Case, device: str, seed: int):
        self.case = case
        cfg = model_config(case)
        gen = torch.Generator(device=device).manual_seed(seed)
        if case.scope == "model":
            self.module = Transformer(cfg, seed=seed, device=device)
            self.opt = torch.optim.AdamW(self.module.parameters(), lr=1e-4, weight_decay=0.1)
            B = case.T // case.seq
            self.tokens = torch.randint(0, case.vocab, (B, case.seq), generator=gen, device=device)
            self.targets = torch.roll(self.tokens, -1, dims=1)
        else:
            self.module = Layer(cfg, 0, torch.Generator().manual_seed(seed)).to(device)
            init_weights(self.module, 1, seed, device)
            self.x, self.g = _random_state(case, cfg.streams, gen, device)
        self.params = list(self.module.parameters())

    def call(self):
        case = self.case
        if case.scope == "model":
            self.opt.zero_grad(set_to_none=True)
            loss = self.module(self.tokens, self.targets)
            loss.backward()
            self.opt.step()
            return loss
        from suite import recompute
        for p in self.params:
            p.grad = None
        self.x.grad = None
        with torch.set_grad_enabled(case.mode == "fwd+bwd"):
            out = recompute.run_layers([self.module], self.x, case.recompute, case.L_r or 1)
            if case.mode == "fwd+bwd":
                out.backward(self.g)
        return out

    def persistent_bytes(self) -> int:
        """Weights, optimizer state and inputs this case holds between steps."""
        total = sum(p.numel() * p.element_size() for p in self.params)
        if self.case.scope == "model":
            for state in self.opt.state.values():
                total += sum(v.numel() * v.element_size() for v in state.values()
                             if torch.is_tensor(v))
            total += 2 * self.tokens.numel() * self.tokens.element_size()
        else:
            total += 2 * self.x.numel() * self.x.element_size()
        return total


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
    L_r = None if case.L_r is None else min(case.L_r, layers)
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
        from suite import recompute
        gcase = replace(case, dtype=cfg.dtype) if cfg.dtype != "fp64" else case
        x, g = _random_state(gcase, cfg.streams, gen, device)
        x = x.to(torch.float64 if cfg.dtype == "fp64" else x.dtype).detach()
        x.requires_grad_(case.mode == "fwd+bwd")
        out = recompute.run_layers([module], x, cfg.recompute, cfg.L_r)
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
        return m
    m = Layer(cfg, 0, torch.Generator().manual_seed(seed)).to(device)
    init_weights(m, 1, seed, device)
    from kernels import reference
    gen = torch.Generator().manual_seed(seed)
    for site in m.sites:
        with torch.no_grad():
            for p, v in zip(site.conn, reference.random_params(cfg.method, cfg.n, cfg.C, gen)):
                p.copy_(v)
    return m


def check(case: Case, device: str) -> dict:
    """The case's model against the fp64 reference model; a dict like suite.check's."""
    g = gate_case(case)
    seed = case.seed + GATE_SEED_OFFSET
    half = case.dtype in ("bf16", "fp16")
    cfg = model_config(g, f_dtype="fp32" if half else None)
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
            "reference": "fp64 model, backend torch, recompute none"}


# ---------------------------------------------------------------- interleaved timing
def time_interleaved(timer: Timer, calls: list, warmup_ms: float, rep_ms: float,
                     rounds: int = ROUNDS) -> list[tuple[Timing, list[int]]]:
    """Times each call in `rounds` rounds, the order rotated every round; per call, its Timing
    and the round of each sample. Each round discards its first call of each case (the switch
    between models), through Timer.time."""
    for fn in calls:
        timer.time(fn, warmup_ms=warmup_ms, rep_ms=0.0, min_samples=1, max_samples=1)
    samples = [[] for _ in calls]
    round_of = [[] for _ in calls]
    per_round = rep_ms / rounds
    for r in range(rounds):
        k = len(calls)
        for j in range(k):
            i = (r + j) % k
            t = timer.time(calls[i], warmup_ms=0.0, rep_ms=per_round,
                           min_samples=MIN_PER_ROUND, max_samples=1000)
            samples[i] += t.samples
            round_of[i] += [r] * len(t.samples)
    return [(Timing(s), ro) for s, ro in zip(samples, round_of)]


def _activation_peak(step: Step, timer: Timer) -> int | None:
    """Device memory a step needs above what was allocated before it (activations, gradients,
    temporaries); None on a CPU."""
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
    s = predict.ELEMENT_BYTES[case.dtype]
    C, r = case.C, case.mlp_ratio
    params = case.layers * (4 + 2 * r) * C * C + 2 * (case.vocab or 0) * C
    return params * s * (4 if case.scope == "model" else 2)


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
        residual = c.method == "residual" and c.recompute == "none"
        own_plain = (case.recompute != "none" and c.recompute == "none" and c.method == case.method
                     and c.backend == case.backend and c.n == case.n)
        if residual or own_plain:
            out.append(c)
    return out


def subgroups(cases: list[Case], budget: float) -> list[list[Case]]:
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
        if current and sum(map(persistent_estimate, trial)) > budget:
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
        record = _new_record(session, case, name)
        records[id(case)] = (case, record)
        t0 = time.perf_counter()
        reason = unavailable(case)
        if reason:
            record.update(status="skipped", reason=reason)
        else:
            try:
                with deadline(case.timeout_s):
                    result = check(case, case.device)
                record["check"] = result
                if result["passed"]:
                    passing.append(case)
                else:
                    record.update(status="failed",
                                  reason=f"check failed: {result['worst']} rel err "
                                         f"{result['max_rel_err']:.3g} > tol {result['tol']:.1g}")
            except Exception as exc:  # noqa: BLE001  (one failing case never stops the sweep)
                _fail(record, exc)
        record["wall_s"] = round(time.perf_counter() - t0, 3)
        gc.collect()
    if passing:
        device = passing[0].device
        budget = memory_budget(device)
        for index, members in enumerate(subgroups(passing, budget)):
            _time_subgroup(session, members, records, index)
    for case, record in records.values():
        if record["status"] == "ok" and record["time_ms"] is None:
            record.update(status="failed", reason="not timed (its subgroup failed)")
        session.store.add(record)
        if view:
            view.finished(case, record)


def _fail(record: dict, exc: BaseException) -> None:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        record.update(status="failed", reason=f"out of memory: {first_line(exc)}")
    else:
        record.update(status="failed", reason=f"{type(exc).__name__}: {first_line(exc)}",
                      traceback=traceback.format_exc(limit=8))


def _time_subgroup(session, members: list[Case], records: dict, index: int) -> None:
    """Builds the members, times them interleaved, fills the records not yet timed and gives
    every record the samples of what it was timed with (`interleaved_with`)."""
    built = []
    t0 = time.perf_counter()
    try:
        with deadline(sum(c.timeout_s for c in members)):
            for case in members:
                built.append(Step(case, case.device, case.seed))
            timer = session.timer(members[0].device)
            rate = matmul_rate(session, members[0].device)
            timings = time_interleaved(timer, [s.call for s in built], members[0].warmup_ms,
                                       members[0].rep_ms)
            peers = {c.case_id: {"method": c.method, "backend": c.backend, "n": c.n,
                                 "recompute": c.recompute, "L_r": c.L_r,
                                 "samples": [round(x, 6) for x in t.samples], "rounds": rounds}
                     for c, (t, rounds) in zip(members, timings)}
            for step, (timing, rounds) in zip(built, timings):
                case, record = records[id(step.case)]
                if record["time_ms"] is None:
                    _fill(session, step, record, timing, rounds, timer, rate)
                    record["subgroup"] = index
                    record["interleaved_with"] = {k: v for k, v in peers.items()
                                                  if k != case.case_id}
    except Exception as exc:  # noqa: BLE001  (recorded as failed; the sweep goes on)
        for case in members:
            _, record = records[id(case)]
            if record["time_ms"] is None and record["status"] == "ok":
                _fail(record, exc)
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


def _new_record(session, case: Case, name: str) -> dict:
    from suite.store import new_record
    return {**new_record(case, name, session.gpu_uuid), "group": group_key(case)}


def _fill(session, step: Step, record: dict, timing: Timing, rounds: list, timer, rate) -> None:
    case = step.case
    act = _activation_peak(step, timer)
    cost = predict.step_cost(case)
    seconds = timing.median * 1e-3
    record["time_ms"] = timing.summary()
    record["rounds"] = rounds
    record["tokens_per_s"] = case.T / seconds
    record["activation_peak_bytes"] = act
    record["peak_mem_bytes"] = None if act is None else act + step.persistent_bytes()
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


def matmul_rate(session, device: str) -> dict | None:
    """The bf16 matmul rate of this run, measured once per device and kept in env.json."""
    from suite.store import write_json
    rates = session.env.setdefault("matmul_rate", {})
    if device not in rates:
        rates[device] = predict.matmul_rate_tflops(session.timer(device))
        write_json(session.store.dir / "env.json", session.env)
    return rates[device]


def groups(items: list) -> list[list]:
    """Splits (name, case) pairs into comparison groups, in first-seen order."""
    out: dict[str, list] = {}
    for name, case in items:
        out.setdefault(group_key(case), []).append((name, case))
    return list(out.values())
