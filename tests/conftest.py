"""Test set-up: Triton kernels run in the interpreter on machines without a CUDA GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before test modules import kernels.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The device Triton kernels are tested on: the GPU when there is one, else the CPU interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """A plain test run executes the benchmarks of tests/bench once, untimed, as smoke tests;
    asking for benchmark output (--benchmark-only, -json, -compare, -autosave) times them."""
    opt = config.option
    wants_timing = any(getattr(opt, name, None) for name in (
        "benchmark_only", "benchmark_enable", "benchmark_json", "benchmark_compare",
        "benchmark_autosave", "benchmark_save"))
    if hasattr(opt, "benchmark_disable") and not wants_timing:
        opt.benchmark_disable = True


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE

