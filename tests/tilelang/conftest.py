"""TileLang tests: without a GPU, kernels compile for TileLang's "c" target (fp16 only: it has no
bf16) through the cython backend; without tilelang or Cython these tests skip.

HCBENCH_TILELANG_CPU (read when kernels.tilelang checks a tensor's device) is set for these tests
only: set for the whole session it would reach every other test's runs, which record it as a
kernel setting as a user's run would.
"""
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _tilelang_cpu_target(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setenv("HCBENCH_TILELANG_CPU", "1")

MISSING = [m for m in ("tilelang",) + (() if HAS_CUDA else ("Cython",))
           if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config, items):
    if not MISSING:
        return
    skip = pytest.mark.skip(reason=f"needs {' and '.join(MISSING)} (pyproject pins them)")
    for item in items:
        if "tests/tilelang/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
