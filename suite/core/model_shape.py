"""The sizes of the DeepSeek-V3-style models of the mHC paper (its Table 5) at any width, and
what follows from them alone: parameter counts and matmul FLOPs per token.

suite.workloads.deepseek builds the sublayers from a DeepSeekShape; the overhead model
(suite.analysis.predict) counts with the same shape, so both describe one model.

Our choice (not given by the paper): the dense FFN width of the leading dense layer(s) is
(active + shared) * expert_dim, so its FLOPs equal one MoE layer's active-expert FLOPs. With it,
param_counts reproduces Table 5's totals (2.97B / 9.18B / 27.0B) and active counts
(612M / 1.66B / 4.14B) within 0.5%.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DeepSeekShape:
    C: int
    heads: int
    experts: int          # routed experts
    active: int           # routed experts per token (top-k)
    shared: int           # shared experts (always on)
    expert_dim: int       # one expert's SwiGLU hidden size
    vocab: int = 129280
    layers: int | None = None      # the preset's depth (informational; the model sets its own)
    dense_layers: int = 1          # leading layers with a dense FFN instead of the MoE
    kv_rank: int = 512
    qk_nope: int = 128
    qk_rope: int = 64
    v_dim: int = 128
    rope_theta: float = 10000.0
    route_scale: float = 1.0
    dense_dim: int | None = None   # dense FFN hidden size; None: (active + shared) * expert_dim

    @property
    def qk_dim(self) -> int:
        return self.qk_nope + self.qk_rope

    @property
    def dense_hidden(self) -> int:
        return self.dense_dim or (self.active + self.shared) * self.expert_dim

    def replace(self, **over) -> DeepSeekShape:
        return replace(self, **over)


# mHC paper (arXiv 2512.24880v2) Table 5: DeepSeek-V3-style models. The paper reports
# total 2.97B / 9.18B / 27.0B, active 612M / 1.66B / 4.14B, embedding + head 331M / 496M / 662M.
PRESETS = {
    "3B": DeepSeekShape(C=1280, layers=12, heads=16, experts=64, active=6, shared=2,
                        expert_dim=896, vocab=129280),
    "9B": DeepSeekShape(C=1920, layers=18, heads=24, experts=64, active=6, shared=2,
                        expert_dim=1280, vocab=129280),
    "27B": DeepSeekShape(C=2560, layers=30, heads=32, experts=72, active=6, shared=2,
                         expert_dim=1536, vocab=129280),
}
PAPER_PARAMS = {"3B": {"total": 2.97e9, "active": 612e6, "vocab": 331e6},
                "9B": {"total": 9.18e9, "active": 1.66e9, "vocab": 496e6},
                "27B": {"total": 27.0e9, "active": 4.14e9, "vocab": 662e6}}


def _round(x: float, multiple: int) -> int:
    return max(multiple, multiple * round(x / multiple))


def shape_for(C: int, heads: int | None = None, **over) -> DeepSeekShape:
    """The sublayer shape for width C.

    - A preset's width (1280, 1920, 2560) gives that preset (heads replaced when given and
      different).
    - C >= 512 otherwise: Table 5's per-head dims and KV rank, C / heads = 80 as in every preset
      (heads = max(1, C // 80) unless given), 64 experts, 6 active, 2 shared,
      expert_dim = 2C/3 rounded to a multiple of 64.
    - C < 512 (tests, smoke runs): heads = max(1, C // 16) unless given, nope/rope/v head dims
      16/8/16, kv_rank = C // 2 (at least 8), 8 experts, 2 active, 1 shared,
      expert_dim = C // 2 rounded to a multiple of 8.
    Every size is a multiple of 8 whenever C is, as the grouped GEMM needs. `over` replaces any
    field afterwards.
    """
    for preset in PRESETS.values():
        if preset.C == C:
            shape = preset if heads in (None, preset.heads) else replace(preset, heads=heads)
            return replace(shape, **over)
    if C >= 512:
        shape = DeepSeekShape(C=C, heads=heads or max(1, C // 80), experts=64, active=6,
                              shared=2, expert_dim=_round(2 * C / 3, 64))
    else:
        shape = DeepSeekShape(C=C, heads=heads or max(1, C // 16), experts=8, active=2,
                              shared=1, expert_dim=_round(C / 2, 8),
                              kv_rank=max(8, C // 2), qk_nope=16, qk_rope=8, v_dim=16)
    return replace(shape, **over)


def _layer_params(s: DeepSeekShape) -> dict:
    H = s.heads
    attn = (H * s.qk_dim * s.C + (s.kv_rank + s.qk_rope) * s.C
            + H * (s.qk_nope + s.v_dim) * s.kv_rank + s.C * H * s.v_dim)
    expert = 3 * s.C * s.expert_dim
    return {"attn": attn, "attn_norms": s.C + s.kv_rank,
            "dense": 3 * s.C * s.dense_hidden, "expert": expert,
            "shared": s.shared * expert, "router": s.experts * s.C, "ffn_norm": s.C}


def param_counts(shape: DeepSeekShape, layers: int | None = None) -> dict:
    """Parameter counts of a model of these sublayers with an untied embedding and head and a
    final norm. `active` is what one token touches: everything except the embedding table
    (a lookup) and the routed experts it is not sent to; this is the convention that
    reproduces Table 5's activated counts (it includes the head)."""
    s = shape
    layers = layers if layers is not None else s.layers
    p = _layer_params(s)
    n_dense = min(s.dense_layers, layers)
    n_moe = layers - n_dense
    attn = layers * (p["attn"] + p["attn_norms"])
    dense = n_dense * (p["dense"] + p["ffn_norm"])
    moe_always = n_moe * (p["shared"] + p["router"] + p["ffn_norm"])
    routed_all = n_moe * s.experts * p["expert"]
    routed_active = n_moe * s.active * p["expert"]
    embedding = head = s.vocab * s.C
    body = attn + dense + moe_always + routed_all
    total = body + embedding + head + s.C
    return {"total": total, "active": total - embedding - routed_all + routed_active,
            "embedding": embedding, "head": head, "vocab": embedding + head,
            "body": body, "attention": attn, "dense_ffn": dense,
            "moe_routed": routed_all, "moe_routed_active": routed_active,
            "moe_shared_router": moe_always}


def matmul_flops_per_token(shape: DeepSeekShape, seq: int, layers: int | None = None) -> dict:
    """Forward matmul FLOPs per token (2 per multiply-add), by part and in `total`.

    attn_proj: wq, wkv_a, wkv_b, out. attn_sdpa: causal attention counted as half of the full
    S x S work, i.e. per token and head 2 * (S/2) * (nope + rope) for QK^T plus
    2 * (S/2) * v_dim for PV. dense_ffn: gate, up, down of the dense layers. moe_routed: the
    `active` experts a token visits; moe_shared; router: 2 * C * E. head: 2 * C * vocab.
    Elementwise work (norms, RoPE, softmax, SwiGLU, routing) is not counted.
    MFU = 3 * total * tokens/s / peak (backward = 2 x forward)."""
    s = shape
    layers = layers if layers is not None else s.layers
    p = _layer_params(s)
    n_dense = min(s.dense_layers, layers)
    n_moe = layers - n_dense
    out = {
        "attn_proj": layers * 2 * p["attn"],
        "attn_sdpa": layers * s.heads * (2 * (seq / 2) * s.qk_dim + 2 * (seq / 2) * s.v_dim),
        "dense_ffn": n_dense * 2 * p["dense"],
        "moe_routed": n_moe * 2 * s.active * p["expert"],
        "moe_shared": n_moe * 2 * p["shared"],
        "router": n_moe * 2 * p["router"],
        "head": 2 * s.C * s.vocab,
    }
    out["total"] = sum(out.values())
    return out
