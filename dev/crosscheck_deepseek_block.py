"""Cross-check the speed of our DeepSeek-V3 block against torchtitan's, on one CUDA GPU.

One residual block at the mHC paper's 3B shapes (suite.core.model_shape.PRESETS["3B"]: C 1280, 16 heads,
MLA with KV rank 512 and q/k 128 + 64 / v 128 head dims, 64 routed experts, top-6, 2 shared,
expert dim 896), 1 x 4096 tokens, bf16, forward + backward (gradients of the input and every
parameter), each timed with suite.measure.timing.Timer:
    ours:       x = x + MLA(x); x = x + MoE(x)            (suite.workloads.deepseek)
    torchtitan: DeepSeekV3TransformerBlock with MoE        (torchtitan 0.3.0)
and prints both medians and their ratio.

Set-up: torchtitan 0.3.0 and the small pure-Python wheels it needs at import (tyro,
docstring_parser, typeguard, spmd_types) as wheels under .whl/, which dev/device_env.sh
installs with --no-deps:
    python3 -m pip download --no-deps --only-binary=:all: -d .whl torchtitan==0.3.0 \
        tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 spmd_types==0.2.3 torchtitan 0.3.0 imports torch.distributed.fsdp.DataParallelMeshDims,
which only torch >= 2.12 has; on an older torch a placeholder class is set before the import
(it is only instantiated by torchtitan's FSDP/SPMD set-up, never on this single-GPU path).

Where the two blocks differ, by construction rather than by oversight:
- torchtitan's language-model attention backends are flex / varlen (block-causal masks); this
  script gives its MLA the ScaledDotProductAttention inner attention (causal), so both run
  torch's SDPA with the same shapes and the comparison is of everything around it;
- torchtitan's RoPE is the interleaved complex form; ours is the half-split form (module
  docstring of suite.workloads.deepseek); same FLOPs;
- torchtitan's router runs under fp32 autocast and its expert-bias buffer (load_balance_coeff
  1e-3, DeepSeek-V3's aux-loss-free balancing) steers selection, as ours does;
- torchtitan's experts run three grouped GEMMs (w1, w3, w2); ours fuse gate and up into one.
Usage: python dev/crosscheck_deepseek_block.py [--tokens 4096] [--preset 3B]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn


def _import_torchtitan():
    import dataclasses

    from torch.distributed import fsdp
    if not hasattr(fsdp, "DataParallelMeshDims"):      # torch < 2.12

        @dataclasses.dataclass(frozen=True)
        class DataParallelMeshDims:
            shard: object = None
            replicate: object = None

        fsdp.DataParallelMeshDims = DataParallelMeshDims
    import torchtitan.models.deepseek_v3 as tt
    from torchtitan.models.common import ComplexRoPE
    from torchtitan.models.common.attention import ScaledDotProductAttention
    return tt, ComplexRoPE, ScaledDotProductAttention


def torchtitan_block(shape, device, dtype):
    tt, ComplexRoPE, SDPA = _import_torchtitan()
    layers = tt.build_mla_moe_layers(
        n_layers=2, n_dense_layers=1, dim=shape.C, n_heads=shape.heads, q_lora_rank=0,
        kv_lora_rank=shape.kv_rank, qk_nope_head_dim=shape.qk_nope,
        qk_rope_head_dim=shape.qk_rope, v_head_dim=shape.v_dim, mscale=1.0,
        dense_hidden_dim=shape.dense_hidden, moe_hidden_dim=shape.expert_dim,
        num_experts=shape.experts, num_shared_experts=shape.shared, router_top_k=shape.active,
        router_score_func="sigmoid", router_route_norm=True,
        router_route_scale=shape.route_scale, attn_backend="flex",
        moe_comm_backend="standard", non_blocking_capacity_factor=None,
        linear_init=tt._LINEAR_INIT, norm_init=tt._NORM_INIT, depth_init=tt._depth_init,
        depth_experts_init=tt._depth_experts_init,
        rope=ComplexRoPE.Config(dim=shape.qk_rope, max_seq_len=4096 * 4,
                                theta=shape.rope_theta))
    cfg = layers[1]                                       # an MoE layer
    cfg.attention.inner_attention = SDPA.Config()
    block = cfg.build()
    block.init_states(buffer_device=torch.device("cpu"))
    block.to(device)
    for p in block.parameters():
        p.data = p.data.to(dtype)                        # parameters bf16, buffers as they are
    return block


class OurBlock(nn.Module):
    def __init__(self, shape, dtype):
        super().__init__()
        from suite.workloads import deepseek as ds
        self.attn = ds.MLA(shape, dtype)
        self.moe = ds.MoE(shape, dtype)

    def forward(self, x, seq):
        x = x + self.attn(x, seq)
        return x + self.moe(x, seq)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="3B")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("crosscheck_deepseek_block: no CUDA device, nothing timed")
        return 2
    try:
        _import_torchtitan()
    except Exception as e:  # noqa: BLE001 - any import failure ends the check the same way
        print(f"crosscheck_deepseek_block: torchtitan not importable on torch {torch.__version__}"
              f" ({type(e).__name__}: {e}); install .whl/torchtitan-0.3.0 and its wheels")
        return 2

    from suite.workloads import deepseek as ds
    from suite.core import model_shape
    from suite.measure.timing import Timer

    shape = model_shape.PRESETS[args.preset]
    dev, dtype, seq = torch.device("cuda"), torch.bfloat16, args.tokens
    torch.manual_seed(0)
    ours = OurBlock(shape, dtype).to(dev)
    ds.init_like_model(ours, layers=shape.layers or 1, seed=0)
    theirs = torchtitan_block(shape, dev, dtype)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())

    x = torch.randn(seq, shape.C, device=dev, dtype=dtype, requires_grad=True)
    gy = torch.randn_like(x)
    x3 = x.detach().view(1, seq, shape.C).clone().requires_grad_(True)
    ours_params = [x, *ours.parameters()]
    theirs_params = [x3, *(p for p in theirs.parameters() if p.requires_grad)]

    def step_ours():
        y = ours(x, seq)
        return torch.autograd.grad(y, ours_params, gy)

    def step_theirs():
        y = theirs(x3, None, None)
        return torch.autograd.grad(y, theirs_params, gy.view(1, seq, shape.C),
                                   allow_unused=True)

    timer = Timer("cuda")
    t_ours = timer.time(step_ours, warmup_ms=50, rep_ms=300).median
    t_theirs = timer.time(step_theirs, warmup_ms=50, rep_ms=300).median
    name = torch.cuda.get_device_name(dev)
    print(f"device {name}, torch {torch.__version__}, preset {args.preset}, "
          f"1 x {seq} tokens, bf16 forward+backward")
    print(f"ours       {t_ours:8.3f} ms  ({n_ours / 1e6:.2f}M params, "
          f"expert path {ours.moe.path})")
    print(f"torchtitan {t_theirs:8.3f} ms  ({n_theirs / 1e6:.2f}M params)")
    print(f"ratio ours / torchtitan = {t_ours / t_theirs:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
