"""The overhead model: a step's time from its bytes and FLOPs, and what it says on other GPUs.

A step is split into what tensor cores do (matmul FLOPs, at the bf16 matmul rate measured in the
same run) and what memory does (bytes of everything else, at the copy rate measured in the same
run; suite.analysis.cost's site floors for the connection). Predicted time = matmul FLOPs / matmul rate +
bytes / copy rate. The connection's bytes can be divided by an efficiency (the fraction of the
copy rate its kernels reach, read from the run's site cases when it has them); efficiency 1 is
the floor.

Per token, per layer (C width, r MLP ratio, S sequence, s bytes per state element):
  matmul FLOPs forward: QKV + output 8C^2, causal attention 2*S*C (QK^T and PV, half the square),
  MLP 4rC^2; backward twice the forward; `full` recompute runs the forward again.
  other bytes forward: two RMSNorms 4C, GELU 2rC, attention layout copies 2C (all times s);
  backward twice that. Model scope adds the head (2CV FLOPs forward), the embedding gather
  and AdamW: read p, g, m, v and write p, m, v, 7 s bytes per parameter (fp32 for the
  connection's parameters).
  connection: two sites per layer, suite.analysis.cost.case_cost(site); `mhc` recompute reruns their
  forward.
"""
from __future__ import annotations

from dataclasses import dataclass

from suite.analysis import cost as site_cost
from suite.core import model_shape
from suite.core.dtypes import ELEMENT_BYTES
from suite.core.scenario import Case

# Published figures (dense bf16 tensor-core rate; memory bandwidth), for GPUs not in the run.
# Predictions for them scale this run's measured rates by the published ratio, so each GPU is
# assumed to reach the same fraction of its datasheet as the measured one.
PUBLISHED = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5 80 GB): 3.35 TB/s HBM3; BF16 1,979 TFLOPS
    # "with sparsity", so 989 dense. https://www.nvidia.com/en-us/data-center/h100/
    "H100 SXM": {"bandwidth_gbps": 3350, "bf16_tflops": 989},
    # NVIDIA H200 datasheet (SXM 141 GB): 4.8 TB/s HBM3e; BF16 1,979 TFLOPS with sparsity.
    # https://www.nvidia.com/en-us/data-center/h200/
    "H200": {"bandwidth_gbps": 4800, "bf16_tflops": 989},
    # NVIDIA HGX B200 specifications (per GPU): 8 TB/s HBM3e; FP16/BF16 4.5 PFLOPS with
    # sparsity, so 2,250 dense. https://www.nvidia.com/en-us/data-center/hgx/
    "B200": {"bandwidth_gbps": 8000, "bf16_tflops": 2250},
}
TYPICAL_COPY_FRACTION = 0.9
TYPICAL_MATMUL_FRACTION = 0.7

# Which published row a measured GPU name corresponds to (its datasheet is the scale's base).
NAME_MATCH = {"H100": "H100 SXM", "H200": "H200", "B200": "B200"}
SITES_PER_LAYER = 2


@dataclass(frozen=True)
class StepCost:
    read: int
    write: int
    matmul_flops: int            # tensor-core work
    other_flops: int             # element-wise and the connection (memory-bound)
    conn_bytes: int              # the connection's share of read + write

    @property
    def total(self) -> int:
        return self.read + self.write

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.other_flops


def layer_matmul_flops(case: Case) -> int:
    """Forward matmul FLOPs per token of the case's layers (attention causal: half the square)."""
    if case.family == "deepseek":
        shape = model_shape.shape_for(case.C, case.heads)
        flops = model_shape.matmul_flops_per_token(shape, case.seq, case.layers)
        return int(flops["total"] - flops["head"])
    C, r, S = case.C, case.mlp_ratio, case.seq
    return (8 * C * C + 2 * S * C + 4 * r * C * C) * case.layers


def layer_other_bytes(case: Case) -> int:
    """Forward bytes per token of the layers' element-wise work outside matmuls (a rough count:
    norms, activations, layouts; MoE token gather and scatter)."""
    s = ELEMENT_BYTES[case.dtype]
    C = case.C
    if case.family == "deepseek":
        sh = model_shape.shape_for(C, case.heads)
        per = 6 * C + sh.active * (4 * C + 3 * sh.expert_dim) + 3 * sh.shared * sh.expert_dim
        return per * s * case.layers
    return (4 * C + 2 * case.mlp_ratio * C + 2 * C) * s * case.layers


def weight_count(case: Case) -> int:
    """Parameters of the case's model outside its connections (embedding and head included in
    scope model)."""
    vocab = 2 * (case.vocab or 0) * case.C if case.scope == "model" else 0
    if case.family == "deepseek":
        counts = model_shape.param_counts(model_shape.shape_for(case.C, case.heads), case.layers)
        return counts["body"] + vocab
    C, r = case.C, case.mlp_ratio
    return case.layers * (4 + 2 * r) * C * C + vocab


def model_flops(case: Case) -> int:
    """Model FLOPs of one step (the MFU numerator): 3x the forward matmul FLOPs of layers and
    head per token, times the step's tokens; recompute's extra work is not counted."""
    head = 2 * case.C * (case.vocab or 0) if case.scope == "model" else 0
    return 3 * (layer_matmul_flops(case) + head) * case.T * (case.accum or 1)


def datasheet_tflops(env: dict) -> dict | None:
    """The dense bf16 datasheet rate of the run's GPU (PUBLISHED), or None."""
    name = ((env.get("gpus") or [{}])[0].get("name") or "")
    for key, row in NAME_MATCH.items():
        if key in name:
            return {"tflops": PUBLISHED[row]["bf16_tflops"], "datasheet": row}
    return None


def step_cost(case: Case) -> StepCost:
    s = ELEMENT_BYTES[case.dtype]
    C, T, L = case.C, case.T, case.layers
    K = case.accum or 1
    bwd = case.mode == "fwd+bwd"
    passes = 1 + (2 if bwd else 0) + (1 if bwd and case.recompute == "full" else 0)
    matmul = layer_matmul_flops(case) * passes * T * K
    layer_bytes = layer_other_bytes(case)
    other = layer_bytes * T * K * (3 if bwd else 1)
    if bwd and case.recompute == "full":
        other += layer_bytes * T * K
    mode = "fwd+bwd" if bwd else "fwd"
    n = 1 if case.method == "residual" else case.n
    site = site_cost.case_cost(case.method, "site", mode, n, C, T, case.dtype, case.sinkhorn_iters)
    conn = SITES_PER_LAYER * L * site.total * K
    conn_flops = SITES_PER_LAYER * L * site.flops * K
    if bwd and case.recompute in ("mhc", "full"):
        again = site_cost.forward_cost(case.method, "site", n, C, T, case.dtype,
                                       case.sinkhorn_iters or 0)
        conn += SITES_PER_LAYER * L * again.total * K
        conn_flops += SITES_PER_LAYER * L * again.flops * K
    if case.scope == "model":
        V = case.vocab
        matmul += 2 * C * V * T * K * (3 if bwd else 1)
        other += (C * s + n * C * s + 4 * V) * T * K        # gather, stream copy, fp32 logits
        conn_params = L * SITES_PER_LAYER * site_cost.param_bytes(case.method, n, C) // 4
        other += 7 * (weight_count(case) * s + conn_params * 4)    # AdamW, once per step
    half = other // 2
    return StepCost(read=half + conn // 2, write=other - half + conn - conn // 2,
                    matmul_flops=matmul, other_flops=conn_flops, conn_bytes=conn)


def predict_ms(case: Case, copy_gbps: float, matmul_tflops: float,
               conn_efficiency: float = 1.0) -> dict:
    """Predicted step time (ms) and its parts for `case` at the given rates."""
    c = step_cost(case)
    mm = c.matmul_flops / (matmul_tflops * 1e12) * 1e3
    other = (c.total - c.conn_bytes) / (copy_gbps * 1e9) * 1e3
    conn = c.conn_bytes / (copy_gbps * 1e9 * conn_efficiency) * 1e3
    return {"total_ms": mm + other + conn, "matmul_ms": mm, "memory_ms": other, "connection_ms": conn}


def predicted_overhead(case: Case, residual: Case, copy_gbps: float, matmul_tflops: float,
                       conn_efficiency: float = 1.0) -> float:
    """(t_method - t_residual) / t_residual in percent, both predicted at the same rates; the
    residual's own connection (x + f) runs at the floor, its kernel is a plain add."""
    t = predict_ms(case, copy_gbps, matmul_tflops, conn_efficiency)["total_ms"]
    t0 = predict_ms(residual, copy_gbps, matmul_tflops, 1.0)["total_ms"]
    return 100.0 * (t - t0) / t0


def datasheet_row(gpu_name: str | None) -> str | None:
    """The PUBLISHED row a measured GPU name matches, or None."""
    return next((row for key, row in NAME_MATCH.items() if gpu_name and key in gpu_name), None)


def memory_bound_ms(ms: float, measured_gpu: str, target_gpu: str) -> float | None:
    """A memory-bound kernel's time on `target_gpu`, predicted from its time on `measured_gpu`
    alone: the same fraction of the datasheet bandwidth on both (the memory term of the model
    above, the only one a connection kernel has). None where either GPU has no datasheet row."""
    base, target = datasheet_row(measured_gpu), datasheet_row(target_gpu)
    if base is None or target is None:
        return None
    return ms * PUBLISHED[base]["bandwidth_gbps"] / PUBLISHED[target]["bandwidth_gbps"]


def rates_for(gpu: str, measured_gpu: str | None, copy_gbps: float, matmul_tflops: float) -> dict:
    """Rates on a published GPU, scaled from this run's measured rates (same fraction of the
    datasheet), or the datasheet's own figures times a typical fraction when no base matches."""
    target = PUBLISHED[gpu]
    base = next((PUBLISHED[v] for k, v in NAME_MATCH.items()
                 if measured_gpu and k in measured_gpu), None)
    if base is None:
        # This run's GPU is not in the table (or it ran on a CPU): its rates say nothing about
        # these GPUs, so use their datasheets at the fractions an H100 reaches in practice
        # (copy 3.0 of 3.35 TB/s, ANCHORS.md; dense bf16 GEMM about 0.7 of peak).
        return {"copy_gbps": TYPICAL_COPY_FRACTION * target["bandwidth_gbps"],
                "matmul_tflops": TYPICAL_MATMUL_FRACTION * target["bf16_tflops"],
                "scaled_from": None}
    return {"copy_gbps": copy_gbps * target["bandwidth_gbps"] / base["bandwidth_gbps"],
            "matmul_tflops": matmul_tflops * target["bf16_tflops"] / base["bf16_tflops"],
            "scaled_from": measured_gpu}
