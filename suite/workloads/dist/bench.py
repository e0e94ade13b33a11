"""What one rank does for a distributed case (`parallel: p2p | pipeline | data`).

Each case runs in two phases on every member rank, with a status exchange between them
(suite.run.distributed): `prepare` builds the model and inputs and passes the correctness gate;
`Bench.run` times. Ranks of the world beyond `gpus` are not members and only take part in the
exchanges. `combine` (rank 0) turns every rank's part into the record's fields.

Timing: every variant of a case is timed in ROUNDS rounds, the order rotated each round; a
barrier over the case's ranks precedes every sample, each sample is taken by the suite's timer
(suite.measure.timing.Timer: CUDA events after an L2 flush, perf_counter on a CPU) and every rank takes
the same number of samples. A case's time for sample k is the maximum over ranks of sample k;
each rank's median is kept (`per_rank_ms`) with the spread between ranks.

- p2p: ranks of the case pair up (0->1, 2->3, ...), each even rank sending [T, n, C] to the next
  odd one; `reps` messages per sample. Bandwidth is nccl-tests' algbw for sendrecv: message
  bytes / time of one message (for sendrecv busbw equals algbw).
- pipeline: suite.workloads.dist.pipeline, P = gpus stages, `microbatches` micro-batches of T / microbatches
  tokens under 1F1B, AdamW on each stage's parameters. Three variants in the same run:
  `step` (compute and messages), `compute` (the same schedule with one-element messages: every
  dependency kept, the bytes gone), `comm` (the messages alone, in schedule order). Exposed
  communication is step - compute, overlap efficiency
  (t_compute + t_comm - t_step) / min(t_compute, t_comm): 1 when the messages are fully hidden,
  0 when they add their whole time, negative when they cost more than their own time.
- data: DDP over the case's ranks, each rank a replica with its own T tokens. `step` is DDP's
  overlapped step, `compute` the same under no_sync() (no all-reduce), `comm` the all-reduce of
  the gradient buckets alone; exposed all-reduce = step - compute. allreduce algbw = bytes / t,
  busbw = algbw * 2 (G-1) / G (nccl-tests' definitions).
- gpus: 1 with p2p or pipeline on a GPU: the single-GPU stand-in. No second device exists, so
  host-device copies on a copy engine (PCIe, pinned memory) stand in for the link: p2p times a
  device-to-host copy of the message; pipeline runs one middle stage (stage 1 of 3) whose
  neighbours are host memory. Every such record has `standin: true` and `link` saying so.
"""
from __future__ import annotations

import gc
import math
import statistics
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from suite.core.scenario import Case
from suite.measure.timing import Timer, Timing
from suite.workloads import steps
from suite.workloads.dist import pipeline as pp
from suite.workloads.model import Transformer, model_config

ROUNDS = 4
MAX_PER_ROUND = 25
P2P_REPS = 4
BUCKET_BYTES = 25 * 2**20          # DDP's default bucket_cap_mb
STANDIN_LINK = ("stand-in: host-device copies on a copy engine (pinned memory, PCIe) stand in for "
                "the link; one device, no NVLink or network")
STANDIN_STAGE, STANDIN_STAGES = 1, 3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def is_standin(case: Case) -> bool:
    return case.gpus == 1 and case.parallel in ("p2p", "pipeline")


@dataclass
class Ctx:
    """This rank's view of one case: the case's ranks and group (None in one process)."""
    rank: int               # rank in the world
    ranks: list             # the world ranks of the case, in stage order
    group: object           # torch.distributed group of `ranks`, or None
    device: str
    timer: Timer

    @property
    def index(self) -> int:
        return self.ranks.index(self.rank)

    def barrier(self):
        if self.group is not None:
            dist.barrier(group=self.group)


def _max_over_ranks(ctx: Ctx, value: float) -> float:
    if ctx.group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)   # a CPU tensor: gloo
    return float(t.item())


def time_variants(ctx: Ctx, calls: dict, warmup_ms: float, rep_ms: float) -> dict:
    """{name: [samples in ms]} of this rank; the same number of samples on every rank."""
    timer = ctx.timer
    est = {}
    for name, fn in calls.items():
        ctx.barrier()
        timer.sample(fn)                   # first call: allocation, compilation
        ctx.barrier()
        first = _max_over_ranks(ctx, timer.sample(fn)[0])
        # Every rank calls fn the same number of times (its messages must be matched), so the
        # warm-up count comes from the slowest rank's time, the same number everywhere.
        more = int(min(48, max(1, warmup_ms / max(first, 1e-3) - 1)))
        times = [first]
        for _ in range(more):
            ctx.barrier()
            times.append(timer.sample(fn)[0])
        est[name] = statistics.median(times)
    per_round_ms = _max_over_ranks(ctx, sum(est.values()))
    k = int(max(1, min(MAX_PER_ROUND, rep_ms / ROUNDS / max(per_round_ms, 1e-3))))
    names = list(calls)
    samples = {name: [] for name in names}
    for r in range(ROUNDS):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            for _ in range(k):
                ctx.barrier()
                samples[name].append(timer.sample(calls[name])[0])
    return samples


# ---------------------------------------------------------------- p2p
class P2P:
    def __init__(self, case: Case, ctx: Ctx):
        self.case, self.ctx = case, ctx
        n = 1 if case.method == "residual" else case.n
        self.shape = (case.T, n, case.C)
        self.dtype = DTYPES[case.dtype]
        self.bytes = case.T * n * case.C * torch.tensor([], dtype=self.dtype).element_size()
        gen = torch.Generator(device=ctx.device).manual_seed(case.seed + 11)
        self.msg = torch.randn(self.shape, generator=gen, device=ctx.device).to(self.dtype)
        self.buf = torch.empty_like(self.msg)
        cuda = torch.device(ctx.device).type == "cuda"
        self.host = torch.empty(self.shape, dtype=self.dtype, pin_memory=cuda)
        if is_standin(case):
            self.role, self.peer = "standin", None
        else:
            i = ctx.index
            self.role = "send" if i % 2 == 0 else "recv"
            self.peer = ctx.ranks[i + 1] if i % 2 == 0 else ctx.ranks[i - 1]
        self.check = self._check()

    def _one_message(self, src=None):
        if self.role == "standin":
            self.host.copy_(self.msg if src is None else src, non_blocking=True)
        elif self.role == "send":
            dist.isend(self.msg if src is None else src, dst=self.peer, group=self.ctx.group).wait()
        else:
            dist.irecv(self.buf, src=self.peer, group=self.ctx.group).wait()

    def _check(self) -> dict:
        """A fresh random message crosses the link and arrives bit for bit."""
        gen = torch.Generator(device=self.ctx.device).manual_seed(self.case.seed + 12345)
        fresh = torch.randn(self.shape, generator=gen, device=self.ctx.device).to(self.dtype)
        self.buf.zero_()
        self._one_message(fresh)
        if self.role == "standin":
            if torch.device(self.ctx.device).type == "cuda":
                torch.cuda.synchronize()
            got = self.host
        elif self.role == "recv":
            got = self.buf
        else:
            return {"passed": True, "role": "send"}
        same = bool(torch.equal(got.to(fresh.device), fresh))
        return {"passed": same, "role": self.role,
                "max_abs_err": float((got.to(fresh.device).float() - fresh.float()).abs().max())}

    def run(self) -> dict:
        def call():
            for _ in range(P2P_REPS):
                self._one_message()
        samples = time_variants(self.ctx, {"message": call}, self.case.warmup_ms, self.case.rep_ms)
        return {"samples": {"message": [s / P2P_REPS for s in samples["message"]]},
                "check": self.check}


# ---------------------------------------------------------------- pipeline
def _tokens(case: Case, count: int, seed: int, device: str):
    gen = torch.Generator(device=device).manual_seed(seed)
    B = case.T // count // case.seq
    toks = [torch.randint(0, case.vocab, (B, case.seq), generator=gen, device=device)
            for _ in range(count)]
    return toks, [torch.roll(t, -1, dims=1) for t in toks]


def _model(case: Case, device: str):
    return Transformer(model_config(case), seed=case.seed, device=device)


def _high_priority_stream():
    _, high = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream,
                                                              "priority_range") else (0, -1)
    return torch.cuda.Stream(priority=high)


class Pipeline:
    def __init__(self, case: Case, ctx: Ctx, groups: dict | None):
        self.case, self.ctx = case, ctx
        self.overlap = pp.parse_overlap(case.overlap)
        M = case.microbatches
        cuda = torch.device(ctx.device).type == "cuda"
        model = _model(case, ctx.device)
        n = 1 if case.method == "residual" else case.n
        dtype = DTYPES[case.dtype]
        T_mb = case.T // M
        shape = (T_mb, n, case.C)
        self.msg_bytes = T_mb * n * case.C * torch.tensor([], dtype=dtype).element_size()
        if is_standin(case):
            self.stage = pp.Stage(model, 0, case.layers, first=False, last=False,
                                  recompute=case.recompute, L_r=case.L_r or 1, microbatches=M)
            self.order = pp.schedule(STANDIN_STAGE, STANDIN_STAGES, M)
            self.link = pp.CopyLink(shape, dtype, ctx.device, M, "stream" in self.overlap,
                                    seed=case.seed)
            self.quiet = pp.NoLink(self.link)
            self.tokens = self.targets = None
            # one receive and one send each way per micro-batch
            self.bytes_per_step = 4 * M * self.msg_bytes
        else:
            P, s = len(ctx.ranks), ctx.index
            lo, hi = pp.split_layers(case.layers, P)[s]
            for i, layer in enumerate(model.layers):
                if not lo <= i < hi:
                    layer.to("meta")        # another stage's: free its memory
            self.stage = pp.Stage(model, lo, hi, first=s == 0, last=s == P - 1,
                                  recompute=case.recompute, L_r=case.L_r or 1, microbatches=M)
            self.order = pp.schedule(s, P, M)
            self.link = pp.DistLink(ctx.ranks, s, groups, shape, dtype, ctx.device, M, True,
                                    seed=case.seed)
            self.quiet = pp.DistLink(ctx.ranks, s, groups, shape, dtype, ctx.device, M, False,
                                     fakes=(self.link.fake_act, self.link.fake_grad))
            self.tokens, self.targets = _tokens(case, M, case.seed + 1, ctx.device)
            # every boundary carries M activations forward and M gradients back
            self.bytes_per_step = 2 * M * (P - 1) * self.msg_bytes
        if "priority" in self.overlap and cuda:
            pp.post_on_stream(model, _high_priority_stream())
        self.opt = torch.optim.AdamW(self.stage.parameters(), lr=1e-4, weight_decay=0.1)
        self.M = M

    def _train(self, link):
        self.opt.zero_grad(set_to_none=True)
        self.stage.losses.clear()
        pp.run_1f1b(self.order, self.stage, link, self.M, self.overlap, self.tokens,
                    self.targets)
        self.opt.step()

    def run(self) -> dict:
        calls = {"step": lambda: self._train(self.link),
                 "compute": lambda: self._train(self.quiet),
                 "comm": lambda: pp.run_1f1b(self.order, None, self.link, self.M, self.overlap)}
        samples = time_variants(self.ctx, calls, self.case.warmup_ms, self.case.rep_ms)
        losses = [float(x) for x in self.stage.losses]
        finite = all(math.isfinite(x) for x in losses)
        return {"samples": samples, "losses_finite": finite}


# ---------------------------------------------------------------- data parallel
class Data:
    def __init__(self, case: Case, ctx: Ctx):
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.case, self.ctx = case, ctx
        model = _model(case, ctx.device)
        if "priority" in pp.parse_overlap(case.overlap) and torch.device(ctx.device).type == "cuda":
            pp.post_on_stream(model, _high_priority_stream())
        cuda = torch.device(ctx.device).type == "cuda"
        self.ddp = DDP(model, process_group=ctx.group,
                       device_ids=[torch.cuda.current_device()] if cuda else None,
                       bucket_cap_mb=BUCKET_BYTES / 2**20)
        self.opt = torch.optim.AdamW(self.ddp.parameters(), lr=1e-4, weight_decay=0.1)
        toks, targs = _tokens(case, 1, case.seed + 1 + ctx.index, ctx.device)
        self.tokens, self.targets = toks[0], targs[0]
        self.grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        gen = torch.Generator(device=ctx.device).manual_seed(case.seed + 3)
        dtype = DTYPES[case.dtype]
        esize = torch.tensor([], dtype=dtype).element_size()
        left, self.buckets = self.grad_bytes, []
        while left > 0:
            size = min(left, BUCKET_BYTES)
            self.buckets.append(torch.randn(max(1, size // esize), generator=gen,
                                            device=ctx.device).to(dtype))
            left -= size

    def _step(self, sync: bool):
        self.opt.zero_grad(set_to_none=True)
        if sync:
            loss = self.ddp(self.tokens, self.targets)
            loss.backward()
        else:
            with self.ddp.no_sync():
                loss = self.ddp(self.tokens, self.targets)
                loss.backward()
        self.opt.step()

    def _allreduce(self):
        for b in self.buckets:
            dist.all_reduce(b, group=self.ctx.group)

    def run(self) -> dict:
        calls = {"step": lambda: self._step(True), "compute": lambda: self._step(False),
                 "comm": self._allreduce}
        samples = time_variants(self.ctx, calls, self.case.warmup_ms, self.case.rep_ms)
        # The replicas must agree after a synchronised step: from parameters made equal and a
        # fresh optimizer (the no_sync variant trained each replica on its own gradients), one
        # synchronised step, then a checksum per rank.
        with torch.no_grad():
            for p in self.ddp.parameters():
                dist.broadcast(p.data, src=self.ctx.ranks[0], group=self.ctx.group)
        self.opt.state.clear()
        self._step(True)
        checksum = float(sum(p.detach().double().sum() for p in self.ddp.parameters()))
        return {"samples": samples, "checksum": checksum}


# ---------------------------------------------------------------- phases
def prepare(case: Case, ctx: Ctx, groups: dict | None = None):
    """Builds this rank's part of the case; rank 0 of the case also runs the model gate
    (suite.workloads.steps.check, the fp64 model) for pipeline and data. Returns (bench, gate)."""
    gate = None
    if case.parallel in ("pipeline", "data") and ctx.index == 0:
        gate = steps.check(replace(case, scope="model"), ctx.device)
        if not gate["passed"]:
            return None, gate
    if case.parallel == "p2p":
        bench = P2P(case, ctx)
        gate = bench.check
    elif case.parallel == "pipeline":
        bench = Pipeline(case, ctx, groups)
    else:
        bench = Data(case, ctx)
    return bench, gate


def release(bench) -> None:
    del bench
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _summary(series: list[float]) -> dict:
    return Timing(series).summary()


def combine(case: Case, parts: list[dict]) -> dict:
    """Rank 0: every member rank's part -> the record's fields."""
    names = list(parts[0]["samples"])
    fields: dict = {"ranks": len(parts)}
    merged, per_rank = {}, {}
    for name in names:
        series = [max(p["samples"][name][k] for p in parts)
                  for k in range(len(parts[0]["samples"][name]))]
        merged[name] = _summary(series)
        per_rank[name] = [statistics.median(p["samples"][name]) for p in parts]
    fields["per_rank_ms"] = per_rank
    fields["rank_spread_ms"] = {k: max(v) - min(v) for k, v in per_rank.items()}
    main = "message" if case.parallel == "p2p" else "step"
    fields["time_ms"] = merged[main]
    fields["variants_ms"] = {k: v for k, v in merged.items() if k != main}
    if case.parallel == "p2p":
        n = 1 if case.method == "residual" else case.n
        nbytes = case.T * n * case.C * torch.tensor([], dtype=DTYPES[case.dtype]).element_size()
        t = merged["message"]["median"] * 1e-3
        fields.update(message_bytes=nbytes, algbw_gbps=nbytes / t / 1e9,
                      busbw_gbps=nbytes / t / 1e9, gbps=nbytes / t / 1e9,
                      bandwidth_definition="nccl-tests sendrecv: algbw = message bytes / time of "
                                           "one message; busbw = algbw")
        checks = [p["check"] for p in parts if p.get("check")]
        fields["check"] = {"passed": all(c["passed"] for c in checks), "ranks": checks,
                           "reference": "the sent message, bit for bit"}
        return fields
    t_step = merged["step"]["median"]
    t_comp = merged["compute"]["median"]
    t_comm = merged["comm"]["median"]
    fields.update(t_step_ms=t_step, t_compute_ms=t_comp, t_comm_ms=t_comm,
                  exposed_comm_ms=t_step - t_comp,
                  overlap_efficiency=(t_comp + t_comm - t_step) / min(t_comp, t_comm),
                  tokens_per_s=case.T * (case.gpus if case.parallel == "data" else 1)
                  / (t_step * 1e-3))
    if case.parallel == "pipeline":
        fields["bytes_per_step"] = parts[0]["bytes_per_step"]
        fields["gbps"] = fields["bytes_per_step"] / (t_comm * 1e-3) / 1e9
        fields["losses_finite"] = all(p.get("losses_finite", True) for p in parts)
    else:
        nbytes = parts[0]["grad_bytes"]
        G = len(parts)
        algbw = nbytes / (t_comm * 1e-3) / 1e9
        fields.update(allreduce_bytes=nbytes, algbw_gbps=algbw, busbw_gbps=algbw * 2 * (G - 1) / G,
                      gbps=algbw,
                      bandwidth_definition="nccl-tests allreduce: algbw = bytes / time; "
                                           "busbw = algbw * 2 (G-1) / G")
        sums = [p["checksum"] for p in parts]
        fields["replicas_agree"] = max(sums) - min(sums) <= 1e-9 * max(1.0, abs(sums[0]))
    return fields


def run_part(bench) -> dict:
    """This rank's timed part, with what combine needs besides the samples."""
    part = bench.run()
    if isinstance(bench, Pipeline):
        part["bytes_per_step"] = bench.bytes_per_step
    if isinstance(bench, Data):
        part["grad_bytes"] = bench.grad_bytes
    return part


def labels(case: Case) -> dict:
    """Fields every record of a distributed case carries, so no table can lose them."""
    standin = is_standin(case)
    if standin:
        link = STANDIN_LINK
    elif case.device == "cuda":
        link = "nccl"
    else:
        link = "gloo (CPU processes)"
    out = {"standin": standin, "link": link}
    if case.parallel == "pipeline":
        out["stages"] = STANDIN_STAGES if standin else case.gpus
        if standin:
            out["standin_stage"] = (f"stage {STANDIN_STAGE} of {STANDIN_STAGES}: all "
                                    f"{case.layers} layers, neighbours in host memory")
    techniques = pp.parse_overlap(case.overlap)
    if "priority" in techniques:
        out["boundaries"] = "unfused (priority moves each post kernel to its stream)"
    if "priority" in techniques and case.device != "cuda":
        out["overlap_note"] = "priority has no effect on a CPU (no streams)"
    if "stream" in techniques and case.device != "cuda":
        out["overlap_note"] = ("on a CPU, stream means receives posted ahead and sends waited "
                               "for at the end (gloo threads), no CUDA streams")
    return out
