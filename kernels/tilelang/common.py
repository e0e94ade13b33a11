"""What every TileLang kernel here shares: the import check, compilation (and its cache), input checks.

Availability (probe.py's `unavailable`, the registry's probe): tilelang must import
(`import_reason` here), a CUDA GPU must be present, and a tiny kernel must compile and give the
right answer on that GPU; the first failing step is the reason a case is skipped.

Compilation (`compile_kernel`): kernels are built per shape (n, C, dtype, block sizes) by the
`build_*` factories of each module, memoised in-process by functools.lru_cache and on disk by
TileLang's own cache (TILELANG_CACHE_DIR, default ~/.tilelang/cache), so a width compiles once.

CPU target: with HCBENCH_TILELANG_CPU=1 (set by tests/tilelang) CPU tensors are accepted and the
kernels are compiled for TileLang's "c" target through the cython execution backend. That target
has no bf16 type, no vectorised half<->float casts (vectorisation is switched off) and no
fragment fills or cross-thread reducers, so kernels take a `cpu` flag that swaps the reducer
for a per-thread local accumulator; everything else (indexing, tails, math) is the GPU's code.
"""
from __future__ import annotations

import functools
import math
import importlib.util
import json
import os

import torch

from kernels import checks

STATE_DTYPES = (torch.bfloat16, torch.float16)
MAX_N = 8
TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def cpu_enabled() -> bool:
    """CPU tensors allowed (kernels compiled for the "c" target): tests only."""
    return os.environ.get("HCBENCH_TILELANG_CPU", "0") not in ("", "0")


@functools.cache
def import_reason() -> str | None:
    if importlib.util.find_spec("tilelang") is None:
        return "tilelang is not installed (pip install 'tilelang==0.1.15' 'apache-tvm-ffi<0.1.13')"
    try:
        import tilelang  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (a broken install must only skip this backend)
        return f"tilelang failed to import: {type(exc).__name__}: {exc}"
    return None


def compile_kernel(func, cpu: bool):
    """Compiles a T.prim_func for the GPU at hand ("auto") or, cpu=True, for the "c" target."""
    import tilelang
    if cpu:
        from tilelang import tvm
        with tvm.target.Target("c"):
            return tilelang.compile(func, target="c", execution_backend="cython",
                                    pass_configs={"tirx.disable_vectorize": True})
    # HCBENCH_TILELANG_TARGET (a JSON target, e.g. {"kind": "cuda", "arch": "sm_90a"}) compiles
    # for a GPU that is not here: dev/tilelang_compile_check.py uses it on a machine with nvcc.
    spec = os.environ.get("HCBENCH_TILELANG_TARGET")
    return tilelang.compile(func, target=json.loads(spec) if spec else "auto")


def is_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def pow2_at_least(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def block_c(C: int, cap: int = 1024) -> int:
    """Columns per chunk: the largest of cap, cap/2, cap/4 dividing C (no tail), else C rounded up
    to a power of two and capped (the last chunk is then predicated)."""
    for b in (cap, cap // 2, cap // 4):
        if b >= 8 and C % b == 0:
            return b
    return min(cap, max(8, pow2_at_least(C)))


# ---------------------------------------------------------------------------------- input checks
def supports(n: int, C: int, dtype) -> str | None:
    """None if the TileLang kernels handle (n, C, dtype), else the reason (a skipped case)."""
    if dtype not in STATE_DTYPES:
        return f"tilelang kernels take bf16 or fp16 state, not {_NAMES.get(dtype, dtype)}"
    if not 1 <= n <= MAX_N:
        return f"tilelang kernels take n in 1..{MAX_N}, not {n}"
    if C % 8:
        return f"tilelang kernels take C a multiple of 8, not {C}"
    return None


def check_device(op: str, t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and cpu_enabled():
        if t.dtype == torch.bfloat16:
            raise ValueError(f"{op}: {name} is bf16 on the CPU; TileLang's c target has no bf16 "
                             "(use fp16 there)")
        return
    raise ValueError(f"{op}: {name} must be on a CUDA device, got {t.device}")


def check_state(op: str, x: torch.Tensor, name: str = "x") -> tuple[int, int, int]:
    """Validates the residual state [T, n, C] for this backend; returns (T, n, C)."""
    return checks.check_state(op, x, name, supports, check_device)


check_tensor = checks.check_tensor


def on_device(t: torch.Tensor):
    """TileLang launches on the current CUDA device: make it t's."""
    import contextlib
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


TOK_PER_CTA = 128       # per-token kernels: tokens (threads) per CTA
GEMM_BT = 64            # tokens per CTA of the GEMM kernels (wgmma M)
GEMM_BK = 64            # columns of x per chunk


def kp(n: int, hc: bool = False) -> int:
    """The coefficient columns of mHC (n*n + 2n) or HC (n + 2), padded to a multiple of 16."""
    return max(16, -(-((n + 2) if hc else (n * n + 2 * n)) // 16) * 16)


def seg(iters: int) -> int:
    """Sinkhorn iterations per checkpoint segment of the backward (about sqrt(iters))."""
    return max(1, math.isqrt(iters - 1) + 1) if iters > 1 else 1
