"""TileLang tests: without a GPU, kernels compile for TileLang's "c" target (fp16 only: it has no
bf16) through the cython backend; without tilelang or Cython these tests skip.

HCBENCH_TILELANG_CPU must be set before kernels.tilelang checks a tensor's device, so it is set
at collection, before the test modules run.
"""
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("HCBENCH_TILELANG_CPU", "1")

MISSING = [m for m in ("tilelang",) + (() if HAS_CUDA else ("Cython",))
           if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config, items):
    if not MISSING:
        return
    skip = pytest.mark.skip(reason=f"needs {' and '.join(MISSING)} (pyproject pins them)")
    for item in items:
        if "tests/tilelang/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
