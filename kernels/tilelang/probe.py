"""Whether the TileLang backend can run here (the registry's probe, `kernels.get`'s skip reason).

Apart from common.py because it runs a real kernel (residual.py's add), which itself builds on
common.py's compilation and checks.
"""
from __future__ import annotations

import functools

import torch

from kernels.tilelang.common import cpu_enabled, import_reason
from kernels.tilelang.residual import add_forward


def unavailable(device: str = "cuda") -> str | None:
    """Why the TileLang kernels cannot run on `device` here, or None (the registry's probe)."""
    reason = import_reason()
    if reason:
        return reason
    if device == "cpu":
        return None if cpu_enabled() else "tilelang kernels run on CUDA (CPU only in tests)"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return _gpu_reason(torch.cuda.current_device())


@functools.cache
def _gpu_reason(index: int) -> str | None:
    """Compiles and runs the residual add on a few elements: a toolchain that cannot build for this
    GPU (nvcc / arch mismatch) shows here, once, instead of in every case."""
    try:
        dev = torch.device("cuda", index)
        x = torch.arange(64, device=dev, dtype=torch.float32).to(torch.bfloat16).view(8, 1, 8)
        f = torch.ones(8, 8, device=dev, dtype=torch.bfloat16)
        out = add_forward(x, f)
        torch.cuda.synchronize(dev)
        if not torch.equal(out, (x.float() + 1).to(torch.bfloat16)):
            return "tilelang probe kernel gave a wrong answer on this GPU"
    except Exception as exc:  # noqa: BLE001 (any failure is the reason to skip)
        name = torch.cuda.get_device_name(index)
        msg = str(exc).strip().splitlines()
        return f"tilelang cannot compile or run for {name}: {type(exc).__name__}: {msg[-1] if msg else ''}"
    return None
