"""DeepSeek-V3-style sublayers: MLA attention, a dense SwiGLU FFN and a fine-grained MoE.

The mHC paper (arXiv 2512.24880v2) trains its 3B / 9B / 27B models on DeepSeek-V3's
architecture (its Table 5). This module gives those sublayers with the same interface as
suite.workloads.model's Attention and MLP: `forward(h [T, C], seq) -> [T, C]`, T = B * seq, each with its
RMSNorm pre-norm inside, so a connection (residual, HC, mHC) can wrap them unchanged.

What follows the paper / DeepSeek-V3 (arXiv 2412.19437, "DeepSeek-V3 Technical Report"):
- MLA (multi-head latent attention): KV compressed to a rank-512 latent c_kv (RMS-normed),
  per-head q/k = 128 "nope" dims + 64 decoupled RoPE dims (the RoPE key is one 64-dim vector
  shared by all heads), V head dim 128, softmax scale 1/sqrt(128 + 64). Table 5 gives no
  q low-rank, so q is projected directly from C (as DeepSeek-V2-Lite does).
- MoE: sigmoid router scores, top-k over scores + a per-expert bias that only steers selection
  (auxiliary-loss-free balancing, arXiv 2408.15664 / DeepSeek-V3 sec. 2.1.2), gate weights =
  the selected *unbiased* scores normalised to sum 1 per token, routed scale 1.0; shared experts
  always on; SwiGLU experts. The first `dense_layers` (= 1) layers use a dense FFN.
- Sizes (suite.core.model_shape.PRESETS: C, layers, heads, experts, active, shared, expert FFN
  dim, vocab, KV rank, head dims, RoPE theta 10000) are Table 5's.

Our choices (not given by the paper), stated so a reader can change them:
- Dense FFN width of the leading dense layer(s), and every other size: suite.core.model_shape.
- RMSNorm eps 1e-6 (Table 5 prints 1e-20, which we take for a typo: it would do nothing to
  guard a zero-norm row; DeepSeek-V3's released config uses 1e-6).
- RoPE is the "half-split" (GPT-NeoX / rotate_half) form: dims i and i + rope/2 form a pair.
  DeepSeek's reference code pairs adjacent dims (interleaved); the two differ by a fixed
  permutation of the rope columns of wq and wkv_a, so they describe the same function class.
- The router weight is an fp32 parameter (E x C, small) and its logits, sigmoid, top-k and gate
  weights are computed in fp32, as DeepSeek-V3 and torchtitan do; experts run in the model dtype.
- Bias update: bias += rate * sign(mean_load - load_e) with rate 1e-3 (DeepSeek-V3's gamma for
  most of its training), from the last forward's token counts; the caller decides when.
- Routed outputs are combined without atomics: each (token, expert) row is moved back to its
  token (a gather by the inverse permutation) and the K rows of a token are summed with their
  gate weights (the sum accumulates in fp32 inside torch's reduction). This equals the
  index_add_ scatter, but it is deterministic.

Expert compute, two paths (expert_path / MoE.path says which runs):
- "grouped_mm": torch._grouped_mm (CUTLASS grouped GEMM), taken on CUDA sm90 / sm100 with bf16
  weights. Pairs are sorted by expert (stable argsort), per-expert counts come from a
  static-size scatter_add, offsets = cumsum(counts) as int32 (the end row of each group), and
  one grouped GEMM per projection runs every expert. No host synchronisation anywhere, so the
  sublayer can be captured in a CUDA graph. Requirements (PyTorch source:
  aten/src/ATen/native/GroupedMMUtils.h, cuda/GroupedBlas.cpp, cuda/GroupMM.cu; the tests
  test_grouped_gemm_2d_3d / _2d_2d in test/test_matmul_cuda.py): a 2D [M, K] x b 3D
  [G, K, N] with offs 1D int32 of length G; each operand row- or column-major with its leading
  stride a multiple of 16 bytes (C and expert_dim multiples of 8 in bf16) and 16-byte aligned
  data; the bf16 CUTLASS kernel only on compute capability 9.x / 10.x (elsewhere, and for
  fp32/fp16, torch falls back to a loop that copies offs to the host: a sync); fewer than
  1024 groups. Rows past offs[-1] are left unwritten; here offs[-1] = T * active always.
  Autograd is built in (its backward uses the 2D x 2D grouped form for weight gradients).
- "gathered_bmm": every (token, expert) pair gathers its expert's weights and runs a batched
  matmul. No Python loop over experts and no host sync either, but it materialises
  T * active copies of expert weights (T * active * 3 * C * expert_dim elements): it is for
  CPU, fp32/fp64 correctness checks and small shapes, not for timing.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from suite.core.model_shape import DeepSeekShape

NORM_EPS = 1e-6          # Table 5 prints 1e-20; see the module docstring
BIAS_UPDATE_RATE = 1e-3  # DeepSeek-V3's bias update speed gamma
GROUPED_MM_AVAILABLE = hasattr(torch, "_grouped_mm")


# --------------------------------------------------------------------------------------------
# RoPE

_ROPE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_tables(seq: int, dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq, dim] for the half-split RoPE, positions 0..seq-1; built once per
    (seq, dim, theta, device, dtype) with device-side ops (no host->device copy), then reused,
    so calls after the first at a shape are safe to capture in a CUDA graph."""
    key = (seq, dim, float(theta), torch.device(device), dtype)
    hit = _ROPE_CACHE.get(key)
    if hit is None:
        with torch.inference_mode(False), torch.no_grad():
            half = dim // 2
            exponent = torch.arange(half, device=device, dtype=torch.float64) * (2.0 / dim)
            inv_freq = torch.pow(torch.full_like(exponent, float(theta)), -exponent)
            pos = torch.arange(seq, device=device, dtype=torch.float64)
            angle = torch.outer(pos, inv_freq)                     # [seq, half]
            angle = torch.cat([angle, angle], dim=-1)              # [seq, dim]
            hit = (angle.cos().to(dtype), angle.sin().to(dtype))
        _ROPE_CACHE[key] = hit
    return hit


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., seq, heads, dim]; cos/sin [seq, dim]. Pairs (i, i + dim/2) rotate by angle_i."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# --------------------------------------------------------------------------------------------
# Sublayers


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3) without the q low-rank path.

    q = norm(h) @ wq.T split per head into nope | rope; kv_a = norm(h) @ wkv_a.T = c_kv | k_rope,
    c_kv RMS-normed with kv_norm, then c_kv @ wkv_b.T = k_nope | v per head; the RoPE key is
    shared by all heads. Causal SDPA with qk head dim nope + rope and v head dim v_dim."""

    def __init__(self, shape: DeepSeekShape, dtype=torch.bfloat16):
        super().__init__()
        s = shape
        self.shape = s
        H = s.heads
        self.norm = nn.Parameter(torch.ones(s.C, dtype=dtype))
        self.wq = nn.Parameter(torch.empty(H * s.qk_dim, s.C, dtype=dtype))
        self.wkv_a = nn.Parameter(torch.empty(s.kv_rank + s.qk_rope, s.C, dtype=dtype))
        self.kv_norm = nn.Parameter(torch.ones(s.kv_rank, dtype=dtype))
        self.wkv_b = nn.Parameter(torch.empty(H * (s.qk_nope + s.v_dim), s.kv_rank, dtype=dtype))
        self.out = nn.Parameter(torch.empty(s.C, H * s.v_dim, dtype=dtype))

    def forward(self, h: torch.Tensor, seq: int) -> torch.Tensor:
        s = self.shape
        T, C = h.shape
        B, H = T // seq, s.heads
        x = F.rms_norm(h, (C,), self.norm, NORM_EPS)
        q = (x @ self.wq.t()).view(B, seq, H, s.qk_dim)
        q_nope, q_rope = q.split([s.qk_nope, s.qk_rope], dim=-1)
        kv_a = x @ self.wkv_a.t()
        c_kv, k_rope = kv_a.split([s.kv_rank, s.qk_rope], dim=-1)
        c_kv = F.rms_norm(c_kv, (s.kv_rank,), self.kv_norm, NORM_EPS)
        kv = (c_kv @ self.wkv_b.t()).view(B, seq, H, s.qk_nope + s.v_dim)
        k_nope, v = kv.split([s.qk_nope, s.v_dim], dim=-1)
        cos, sin = rope_tables(seq, s.qk_rope, s.rope_theta, h.device, h.dtype)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.view(B, seq, 1, s.qk_rope), cos, sin)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)               # [B, H, S, qk]
        k = torch.cat([k_nope, k_rope.expand(B, seq, H, s.qk_rope)], dim=-1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True,
                                           scale=1.0 / math.sqrt(s.qk_dim))   # [B, H, S, v]
        return o.transpose(1, 2).reshape(T, H * s.v_dim) @ self.out.t()


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    g, u = (x @ gate_up.t()).chunk(2, dim=-1)
    return (F.silu(g) * u) @ down.t()


class DenseFFN(nn.Module):
    """RMSNorm -> SwiGLU; gate_up holds the gate rows [0, hidden) then the up rows."""

    def __init__(self, shape: DeepSeekShape, dtype=torch.bfloat16, hidden: int | None = None):
        super().__init__()
        hidden = hidden or shape.dense_hidden
        self.norm = nn.Parameter(torch.ones(shape.C, dtype=dtype))
        self.gate_up = nn.Parameter(torch.empty(2 * hidden, shape.C, dtype=dtype))
        self.down = nn.Parameter(torch.empty(shape.C, hidden, dtype=dtype))

    def forward(self, h: torch.Tensor, seq: int) -> torch.Tensor:
        x = F.rms_norm(h, (h.shape[-1],), self.norm, NORM_EPS)
        return _swiglu(x, self.gate_up, self.down)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def expert_path(device, dtype, C: int | None = None, expert_dim: int | None = None) -> str:
    """"grouped_mm" where torch._grouped_mm runs its sync-free bf16 CUTLASS kernel (CUDA
    compute capability 9.x or 10.x, bf16, C and expert_dim multiples of 8), else
    "gathered_bmm"."""
    device = torch.device(device)
    if not (GROUPED_MM_AVAILABLE and device.type == "cuda" and dtype == torch.bfloat16):
        return "gathered_bmm"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _capability(index)[0] not in (9, 10):
        return "gathered_bmm"
    if any(d is not None and d % 8 for d in (C, expert_dim)):
        return "gathered_bmm"
    return "grouped_mm"


class MoE(nn.Module):
    """RMSNorm -> DeepSeek-V3 MoE: `active` of `experts` routed SwiGLU experts per token
    (sigmoid scores, aux-loss-free bias for selection only, normalised gate weights) plus
    `shared` always-on experts fused into one SwiGLU of width shared * expert_dim.

    Parameters: norm [C]; router [E, C] (fp32, or fp64 when the module is fp64); experts_gate_up [E, 2D, C] (gate rows then up
    rows); experts_down [E, C, D]; shared_gate_up [2SD, C]; shared_down [C, SD].
    Buffers: router_bias [E] fp32 (selection only), tokens_per_expert [E] fp32 (the last
    forward's counts, for update_router_bias)."""

    def __init__(self, shape: DeepSeekShape, dtype=torch.bfloat16):
        super().__init__()
        s = shape
        self.shape = s
        E, D, C = s.experts, s.expert_dim, s.C
        self.norm = nn.Parameter(torch.ones(C, dtype=dtype))
        rdtype = torch.promote_types(dtype, torch.float32)    # fp32 (fp64 in fp64 checks)
        self.router = nn.Parameter(torch.empty(E, C, dtype=rdtype))
        self.experts_gate_up = nn.Parameter(torch.empty(E, 2 * D, C, dtype=dtype))
        self.experts_down = nn.Parameter(torch.empty(E, C, D, dtype=dtype))
        self.shared_gate_up = nn.Parameter(torch.empty(2 * s.shared * D, C, dtype=dtype))
        self.shared_down = nn.Parameter(torch.empty(C, s.shared * D, dtype=dtype))
        self.register_buffer("router_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.float32),
                             persistent=False)
        self.force_path: str | None = None   # "grouped_mm" | "gathered_bmm" | None (automatic)

    @property
    def path(self) -> str:
        if self.force_path is not None:
            return self.force_path
        w = self.experts_gate_up
        return expert_path(w.device, w.dtype, self.shape.C, self.shape.expert_dim)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, C] (normed) -> expert ids [T, K] (int64) and gate weights [T, K] (fp32)."""
        r = self.router
        scores = torch.sigmoid(F.linear(x.to(r.dtype), r))                          # [T, E]
        _, sel = torch.topk(scores + self.router_bias, self.shape.active, dim=-1)   # bias: pick
        w = scores.gather(1, sel)                                                   # unbiased
        w = w / w.sum(dim=-1, keepdim=True)
        if self.shape.route_scale != 1.0:
            w = w * self.shape.route_scale
        return sel, w

    def forward(self, h: torch.Tensor, seq: int) -> torch.Tensor:
        x = F.rms_norm(h, (h.shape[-1],), self.norm, NORM_EPS)
        sel, w = self.route(x)
        flat = sel.reshape(-1)
        counts = torch.zeros(self.shape.experts, dtype=torch.int64, device=h.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        with torch.no_grad():
            self.tokens_per_expert.copy_(counts)
        if self.path == "grouped_mm":
            y = self._experts_grouped(x, flat, counts, w)
        else:
            y = self._experts_gathered(x, flat, w)
        return y + _swiglu(x, self.shared_gate_up, self.shared_down)

    def _experts_grouped(self, x, flat, counts, w):
        T, C = x.shape
        K = self.shape.active
        order = torch.argsort(flat, stable=True)                # pairs sorted by expert
        token = order // K
        offs = torch.cumsum(counts, 0).to(torch.int32)           # end row of each expert
        xs = x.index_select(0, token)                            # [N, C]
        gu = torch._grouped_mm(xs, self.experts_gate_up.transpose(-2, -1), offs=offs)
        g, u = gu.chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(g) * u, self.experts_down.transpose(-2, -1), offs=offs)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(
            order.numel(), device=order.device))
        y = ys.index_select(0, inverse).view(T, K, C)            # back to (token, k) order
        return (y * w.to(y.dtype).unsqueeze(-1)).sum(dim=1)

    def _experts_gathered(self, x, flat, w):
        T, C = x.shape
        K = self.shape.active
        xp = x.repeat_interleave(K, dim=0).unsqueeze(-1)         # [N, C, 1], pair (t, k)
        gu = torch.bmm(self.experts_gate_up.index_select(0, flat), xp).squeeze(-1)
        g, u = gu.chunk(2, dim=-1)
        a = (F.silu(g) * u).unsqueeze(-1)                        # [N, D, 1]
        y = torch.bmm(self.experts_down.index_select(0, flat), a).view(T, K, C)
        return (y * w.to(y.dtype).unsqueeze(-1)).sum(dim=1)

    @torch.no_grad()
    def update_router_bias(self, rate: float = BIAS_UPDATE_RATE) -> None:
        """Aux-loss-free balancing: bias_e += rate * sign(mean load - load_e), from the last
        forward's counts; overloaded experts become less likely to be picked. On the device,
        no host sync."""
        load = self.tokens_per_expert
        self.router_bias.add_(torch.sign(load.mean() - load), alpha=rate)


def build_sublayers(shape: DeepSeekShape, layer_index: int,
                    dtype=torch.bfloat16) -> tuple[nn.Module, nn.Module]:
    """(attention, FFN) of layer `layer_index`: MLA with a dense FFN in the leading
    dense_layers layers, MLA with the MoE after them."""
    ffn = DenseFFN(shape, dtype) if layer_index < shape.dense_layers else MoE(shape, dtype)
    return MLA(shape, dtype), ffn


def init_like_model(module: nn.Module, layers: int, seed: int = 0) -> None:
    """suite.workloads.model.init_weights's rule, for standalone use (tests, cross-checks): N(0, 0.02),
    projections into the residual (names ending in out / down, including experts_down and
    shared_down) N(0, 0.02 / sqrt(2 * layers)), norms kept."""
    p0 = next(module.parameters())
    gen = torch.Generator(device=p0.device).manual_seed(seed)
    out_std = 0.02 / math.sqrt(2 * layers)
    for name, p in module.named_parameters():
        if name.endswith("norm"):
            continue
        std = out_std if name.endswith(("out", "down")) else 0.02
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device) * std)
