"""What the Triton kernels share: input checks (wrong input fails loudly, never silently wrong) and
small @triton.jit helpers that several kernels inline."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import checks

STATE_DTYPES = (torch.bfloat16, torch.float16)
MAX_N = 8


def np2(v: int) -> int:
    """The smallest power of two >= v (1 for v <= 1)."""
    return 1 << max(0, (int(v) - 1).bit_length())


def coef_shapes(n: int) -> tuple[int, int, int]:
    """K coefficients, NP (n padded to a power of two >= 2), KP (K padded to a power of two >= 16)."""
    K = n * n + 2 * n
    return K, max(2, np2(n)), max(16, np2(K))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(n: int, C: int, dtype) -> str | None:
    """None if the Triton kernels handle (n, C, dtype), else the reason (used to skip a case)."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    if dtype not in STATE_DTYPES:
        return f"triton kernels take bf16 or fp16 state, not {name}"
    if not 1 <= n <= MAX_N:
        return f"triton kernels take n in 1..{MAX_N}, not {n}"
    if C % 8:
        return f"triton kernels take C a multiple of 8, not {C}"
    return None


def check_state(op: str, x: torch.Tensor, name: str = "x") -> tuple[int, int, int]:
    """Validates the residual state [T, n, C] for this backend; returns (T, n, C)."""
    return checks.check_state(op, x, name, supports, check_device)


def check_device(op: str, t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda" and not (interpreting() and t.device.type == "cpu"):
        raise ValueError(f"{op}: {name} must be on a CUDA device (or CPU under TRITON_INTERPRET=1), "
                         f"got {t.device}")


check_tensor = checks.check_tensor


_SM_COUNT: dict = {}


def num_sms(device: torch.device, interpreter_sms: int) -> int:
    """Multiprocessors of a CUDA device (cached); on the CPU interpreter, the caller's stand-in
    count, chosen so its tests exercise the multi-program paths."""
    if device.type != "cuda":
        return interpreter_sms
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


@triton.jit
def dot_xT_hilo(xt, u, acc, DOT_F32: tl.constexpr):
    """acc + xt^T @ u for a weight gradient over tokens: xt [BT, BR] bf16 as loaded (exact), u
    [BT, K] fp32 split into two bf16 halves, fp32 accumulation (u to ~16 bits). DOT_F32: the same
    split products in fp32 (the interpreter multiplies 16-bit tiles as bit patterns)."""
    uh = u.to(tl.bfloat16)
    ul = (u - uh.to(tl.float32)).to(tl.bfloat16)
    if DOT_F32:
        xT = tl.trans(xt.to(tl.float32))
        acc = tl.dot(xT, uh.to(tl.float32), acc, input_precision="ieee")
        acc = tl.dot(xT, ul.to(tl.float32), acc, input_precision="ieee")
    else:
        xT = tl.trans(xt)
        acc = tl.dot(xT, uh, acc)
        acc = tl.dot(xT, ul, acc)
    return acc


@triton.jit
def store_grad(optr, d, mask, EVEN: tl.constexpr, ACC: tl.constexpr):
    """Stores a gradient tile d (fp32) in optr's dtype; ACC: adds it to what optr already holds
    (a site link's accumulator: read then write by the same thread, so no atomics). EVEN: no
    mask needed."""
    if EVEN:
        if ACC:
            d += tl.load(optr).to(tl.float32)
        tl.store(optr, d.to(optr.dtype.element_ty))
    else:
        if ACC:
            d += tl.load(optr, mask=mask, other=0.0).to(tl.float32)
        tl.store(optr, d.to(optr.dtype.element_ty), mask=mask)


RESIDENT_CTAS: dict = {}
RESIDENT_FALLBACKS: dict = {}      # why resident_ctas fell back (diagnostics)


SMEM_PER_SM = 233472      # bytes of shared memory an SM offers its CTAs (H100 and H200)


def ctas_per_sm(regs: int, warps: int, shared: int, smem_sm: int = SMEM_PER_SM) -> int:
    """CTAs of a kernel that fit on one SM of compute capability 9.0 by its registers a thread
    (allocated per warp in 256s of 64K), warps (64 a SM) and shared memory (1 KB reserved per
    CTA); at most 32. 0 when not even one fits."""
    warp_regs = triton.cdiv(regs * 32, 256) * 256
    return min(65536 // (warp_regs * warps), smem_sm // (shared + 1024), 64 // warps, 32)


def resident_ctas(kernel, args, kwargs, fallback: int) -> int:
    """How many CTAs of `kernel`, compiled for these arguments (kernel.warmup: compiled, not
    launched), fit on one SM: registers (allocated per warp in 256s of 64K), shared memory (228
    KB per SM, 1 KB reserved per CTA) and 64 warps. `fallback` on the interpreter or when triton
    does not say. Cached per constexpr set, argument dtypes and device."""
    if interpreting():
        return fallback
    key = (kernel.fn.__name__, tuple(sorted(kwargs.items())),
           tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args),
           args[0].device.index)
    if key not in RESIDENT_CTAS:
        try:
            k = kernel.warmup(*args, grid=(1,), **kwargs)
            k._init_handles()
            props = torch.cuda.get_device_properties(args[0].device)
            smem_sm = getattr(props, "shared_memory_per_multiprocessor", SMEM_PER_SM)
            RESIDENT_CTAS[key] = max(1, ctas_per_sm(k.n_regs, k.metadata.num_warps,
                                                    k.metadata.shared, smem_sm))
        except Exception as exc:     # (an older or newer triton without these attributes)
            RESIDENT_CTAS[key] = fallback
            RESIDENT_FALLBACKS[key] = f"{type(exc).__name__}: {exc}"
    return RESIDENT_CTAS[key]
