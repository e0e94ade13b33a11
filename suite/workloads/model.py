"""A decoder-only transformer whose every sublayer is wrapped by the case's connection.

Two families of sublayers (ModelConfig.family):
- `dense`: attention (one QKV projection, SDPA) and a GELU MLP; the suite's first model.
- `deepseek`: the mHC paper's DeepSeek-V3-style layers, MLA attention and MoE FFNs with the first
  layer dense (suite.workloads.deepseek), RMSNorm, at the paper's 3B/9B/27B widths.

Each transformer layer has two sites (attention, MLP). A site is MATH.md's block boundary:
    layer_input, h_post, h_res = ops.pre(x, *params)      # residual: layer_input is x itself
    f = F(layer_input)                                     # F's pre-norm lives inside F
    x = ops.post(x, f, h_post, h_res)
with `ops = kernels.get(method, backend)`, so the model runs whichever registered backend the case
names. Streams enter by copying the embedding into all n streams and leave by summing them before
the final norm (HC's Algorithm 1; MATH.md allows it, and says to name the choice).

F: attention is RMSNorm -> one QKV projection -> torch's scaled_dot_product_attention (causal)
-> output projection; the MLP is RMSNorm -> up -> GELU (tanh) -> down. F's weights and the
residual state are in the model dtype (bf16 when timed); the connection parameters are fp32,
as MATH.md requires of coefficients. `f_dtype` lets the correctness gate run F in fp32 around a
bf16 state, so the gate measures the connection and its wiring, not bf16 matmul rounding.

Recompute (suite.workloads.recompute): `none`; `mhc` keeps x at the start of each block of L_r sites and
every sublayer output, and reruns the connection ops in backward; `full` checkpoints whole
blocks of L_r sites.

Backend `auto` (ModelConfig.op_backends = (pre backend, post backend[, boundary])) composes the
ops that suite.workloads.fastest measured fastest at the case's shapes, the boundary between
adjacent sites fused only where that measured faster.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import reference
from suite.core import model_shape
from suite.workloads import deepseek, recompute

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp64": torch.float64}
NORM_EPS = 1e-6


@dataclass(frozen=True)
class ModelConfig:
    method: str
    C: int
    layers: int
    heads: int
    seq: int
    vocab: int
    n: int = 4
    backend: str = "torch"
    mlp_ratio: int = 4
    dtype: str = "bf16"           # residual state and F's weights
    f_dtype: str | None = None    # F's compute dtype when it differs from the state (the gate)
    sinkhorn_iters: int = 20
    recompute: str = "none"       # none | mhc | full
    L_r: int = 1
    identity_init: bool = False
    family: str = "dense"
    op_backends: tuple | None = None  # backend auto: (pre's backend, post's backend, boundary: kernels.compose's)
    # Adjacent sites run post(l) fused with the coefficients of l+1 (kernels/chain.py's boundary)
    # where the connection's backend has that kernel.
    boundary_fusion: bool = True

    @property
    def streams(self) -> int:
        return 1 if self.method == "residual" else self.n


class Attention(nn.Module):
    def __init__(self, C: int, heads: int, dtype):
        super().__init__()
        if C % heads:
            raise ValueError(f"C={C} is not divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.Parameter(torch.ones(C, dtype=dtype))
        self.qkv = nn.Parameter(torch.empty(3 * C, C, dtype=dtype))
        self.out = nn.Parameter(torch.empty(C, C, dtype=dtype))

    def forward(self, h: torch.Tensor, seq: int) -> torch.Tensor:
        T, C = h.shape
        B, H = T // seq, self.heads
        h = F.rms_norm(h, (C,), self.norm, NORM_EPS)
        qkv = (h @ self.qkv.t()).view(B, seq, 3, H, C // H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return o.transpose(1, 2).reshape(T, C) @ self.out.t()


class MLP(nn.Module):
    def __init__(self, C: int, ratio: int, dtype):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(C, dtype=dtype))
        self.up = nn.Parameter(torch.empty(ratio * C, C, dtype=dtype))
        self.down = nn.Parameter(torch.empty(C, ratio * C, dtype=dtype))

    def forward(self, h: torch.Tensor, seq: int) -> torch.Tensor:
        h = F.rms_norm(h, (h.shape[-1],), self.norm, NORM_EPS)
        return F.gelu(h @ self.up.t(), approximate="tanh") @ self.down.t()


class Site(nn.Module):
    """One connection around one sublayer F."""

    def __init__(self, cfg: ModelConfig, sublayer: nn.Module, index: int, generator):
        super().__init__()
        self.ops = connection_ops(cfg)
        self.sublayer = sublayer
        self.seq = cfg.seq
        self.opts = {"sinkhorn_iters": cfg.sinkhorn_iters} if cfg.method == "mhc" else {}
        init = reference.init_params(cfg.method, cfg.n, cfg.C, site_index=index,
                                     identity_init=cfg.identity_init, generator=generator)
        self.conn = nn.ParameterList([nn.Parameter(p.float()) for p in init])
        self.f_dtype = DTYPES[cfg.f_dtype] if cfg.f_dtype else None
        self.boundary_fusion = cfg.boundary_fusion

    def pre(self, x):
        return self.ops.pre(x, *self.conn, **self.opts)

    def F(self, layer_input):
        if self.f_dtype is None:
            return self.sublayer(layer_input, self.seq)
        return self.sublayer(layer_input.to(self.f_dtype), self.seq).to(layer_input.dtype)

    def post(self, x, f, h_post, h_res):
        return self.ops.post(x, f, h_post, h_res)

    def forward(self, x):
        layer_input, h_post, h_res = self.pre(x)
        return self.post(x, self.F(layer_input), h_post, h_res)


def connection_ops(cfg: ModelConfig) -> kernels.Ops:
    if cfg.backend == kernels.AUTO:
        if cfg.op_backends is None:
            raise ValueError("backend auto needs op_backends (suite.workloads.fastest.choose)")
        return kernels.compose(cfg.method, *cfg.op_backends)
    return kernels.get(cfg.method, cfg.backend)


def sublayers(cfg: ModelConfig, index: int, dtype) -> tuple[nn.Module, nn.Module]:
    if cfg.family == "deepseek":
        return deepseek.build_sublayers(model_shape.shape_for(cfg.C, cfg.heads), index, dtype)
    return Attention(cfg.C, cfg.heads, dtype), MLP(cfg.C, cfg.mlp_ratio, dtype)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, generator):
        super().__init__()
        attn, ffn = sublayers(cfg, index, DTYPES[cfg.f_dtype or cfg.dtype])
        self.attn = Site(cfg, attn, 2 * index, generator)
        self.mlp = Site(cfg, ffn, 2 * index + 1, generator)

    @property
    def sites(self):
        return (self.attn, self.mlp)

    def forward(self, x):
        return self.mlp(self.attn(x))


class Transformer(nn.Module):
    """tokens [B, seq] -> mean next-token cross-entropy (fp32)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, device="cpu"):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        dtype = DTYPES[cfg.dtype]
        self.embed = nn.Parameter(torch.empty(cfg.vocab, cfg.C, dtype=dtype))
        self.layers = nn.ModuleList([Layer(cfg, i, gen) for i in range(cfg.layers)])
        self.final_norm = nn.Parameter(torch.ones(cfg.C, dtype=dtype))
        self.head = nn.Parameter(torch.empty(cfg.vocab, cfg.C, dtype=dtype))
        self.to(device)
        init_weights(self, cfg.layers, seed, device)

    def randomise_connections(self, seed: int) -> None:
        """Non-degenerate connection parameters (kernels.reference.random_params) for the gate:
        at the papers' init HC's projections are zero and a wrong kernel could hide."""
        gen = torch.Generator().manual_seed(seed)
        for layer in self.layers:
            for site in layer.sites:
                new = reference.random_params(self.cfg.method, self.cfg.n, self.cfg.C, gen)
                with torch.no_grad():
                    for p, v in zip(site.conn, new):
                        p.copy_(v)

    def sites(self):
        return [s for layer in self.layers for s in layer.sites]

    def streams_in(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed[tokens.reshape(-1)]
        return e.unsqueeze(1).expand(-1, self.cfg.streams, -1).contiguous()

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return recompute.run_sites(self.sites(), x, self.cfg.recompute, self.cfg.L_r)

    def head_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The step without any layer: embedding, streams in and out, head and loss (what a
        partial-depth model's extrapolation subtracts; suite.analysis.overhead)."""
        logits = self.logits(self.streams_in(tokens))
        return F.cross_entropy(logits.float(), targets.reshape(-1))

    def moe_layers(self) -> list:
        return [m for m in self.modules() if isinstance(m, deepseek.MoE)]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.sum(dim=1), (self.cfg.C,), self.final_norm, NORM_EPS)
        return h @ self.head.t()

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(self.body(self.streams_in(tokens)))
        return F.cross_entropy(logits.float(), targets.reshape(-1))


def init_weights(module: nn.Module, layers: int, seed: int, device="cpu") -> None:
    """GPT-2 style N(0, 0.02), output projections shrunk by sqrt(2 * layers); drawn on the
    device (large widths would take seconds on a CPU); norms and connections keep their init."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out_std = 0.02 / math.sqrt(2 * layers)
    for name, p in module.named_parameters():
        if ".conn." in name or name.startswith("conn.") or name.endswith("norm"):
            continue
        std = out_std if name.endswith((".out", ".down", "_down")) else 0.02
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std)


def share_weights(model: nn.Module, donor: nn.Module) -> None:
    """Makes every parameter of `model` outside its connections the same tensor as `donor`'s
    (models of one comparison group differ only in their connections, so they can share the
    rest and fit on one GPU together)."""
    for mod_name, mod in model.named_modules():
        for pname in list(mod._parameters):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if ".conn." in f".{full}":
                continue
            mod._parameters[pname] = donor.get_parameter(full)


def connection_params(model: nn.Module) -> list:
    return [p for name, p in model.named_parameters() if ".conn." in f".{name}"]


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_config(case, **over) -> ModelConfig:
    """The model a scope layer/model case (suite.core.scenario.Case) describes; `over` replaces fields."""
    cfg = ModelConfig(method=case.method, C=case.C, layers=case.layers, heads=case.heads,
                      seq=case.seq, vocab=case.vocab or 1, n=case.n, backend=case.backend,
                      mlp_ratio=case.mlp_ratio or 4, dtype=case.dtype,
                      sinkhorn_iters=case.sinkhorn_iters or 20, recompute=case.recompute,
                      L_r=case.L_r or 1, family=case.family or "dense",
                      boundary_fusion=case.boundary_fusion is not False)
    return replace(cfg, **over)
