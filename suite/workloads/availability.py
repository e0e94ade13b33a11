"""Whether this machine can run a case: a reason to skip it (not an error), or None."""
from __future__ import annotations

import torch

import kernels
from suite.core.dtypes import TORCH_DTYPES
from suite.core.scenario import Case
from suite.workloads import corpus
from suite.workloads.dist import launch


def unavailable(case: Case) -> str | None:
    """Why this machine cannot run the case (a skip, not an error), or None."""
    if case.parallel:
        return distributed_unavailable(case, launch.from_env().size)
    if case.device == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU on this machine"
        if case.gpus > torch.cuda.device_count():
            return f"needs {case.gpus} GPUs, {torch.cuda.device_count()} present"
    elif case.gpus > 1:
        return "gpus > 1 needs device cuda"
    if case.gpus > 1:
        return "scope site runs on one GPU; multi-GPU scopes come with the distributed scenarios"
    if case.backend == kernels.AUTO:
        if not kernels.candidates(case.method, case.device):
            return f"backend auto: no registered backend can run {case.method} on {case.device}"
        return None
    reason = kernels.unavailable_reason(case.method, case.backend, case.device)
    if reason:
        return reason
    ops = kernels.get(case.method, case.backend)
    if case.op == "coeffs" and ops.coeffs is None:
        return f"backend {case.backend} has no coeffs op for {case.method}"
    if case.op in ("pre", "site") and ops.pre is None:
        return f"backend {case.backend} has no pre op for {case.method} yet"
    if case.scope == "stability":
        reason = corpus.unavailable(case.seq)
        if reason:
            return reason
    return ops.supports(case.n, case.C, TORCH_DTYPES[case.dtype])


def distributed_unavailable(case: Case, world_size: int) -> str | None:
    """Why this world cannot run the case (a skip), or None. The same answer on every rank."""
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if case.parallel == "data" and case.gpus < 2:
        return "data parallel needs gpus >= 2 (an all-reduce over one replica moves nothing)"
    if case.gpus > world_size:
        return (f"needs {case.gpus} ranks, the world has {world_size}: launch with torchrun "
                f"--nproc_per_node={case.gpus} (make bench GPUS={case.gpus}) or more nodes")
    if case.device == "cuda" and case.gpus > 1:
        import os
        # Ranks on this node: torchrun says it; srun with --ntasks-per-node says it too.
        local = int(os.environ.get("LOCAL_WORLD_SIZE")
                    or os.environ.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0)
        if local > torch.cuda.device_count():
            return (f"{local} ranks on this node but {torch.cuda.device_count()} GPUs: one "
                    "rank per GPU")
    reason = kernels.unavailable_reason(case.method, case.backend, case.device)
    if reason:
        return reason
    if case.parallel != "p2p":
        ops = kernels.get(case.method, case.backend)
        if ops.pre is None:
            return f"backend {case.backend} has no pre op for {case.method} yet"
        return ops.supports(case.n, case.C, TORCH_DTYPES[case.dtype])
    return None
