"""The state dtypes a case may name, once: their torch dtype and their size in bytes."""
from __future__ import annotations

import torch

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPES = tuple(TORCH_DTYPES)
ELEMENT_BYTES = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}
