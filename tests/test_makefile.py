"""The Makefile's variables come from the command line only: a batch script's exported OUT, RUN,
A, B or ARGS must not redirect `make bench` or `make report`."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def _dry(target: str, env_over: dict, *args: str) -> str:
    # a fresh make, also under `make test`: the outer make's flags and level stay out
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(env_over)
    out = subprocess.run(["make", "--no-print-directory", "-n", "-o", "env", target, *args],
                         cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_environment_does_not_set_make_variables():
    env = {"OUT": "/tmp/elsewhere", "ARGS": "--only method=hc", "SCENARIO": "x.yaml", "RUN": "r9",
           "GPUS": "8"}
    bench = _dry("bench", env)
    assert "--out results" in bench and "scenarios/default.yaml" in bench
    assert "elsewhere" not in bench and "method=hc" not in bench and "nproc_per_node" not in bench
    assert _dry("report", env).strip().endswith("harness.py report")


def test_the_command_line_still_sets_them():
    bench = _dry("bench", {}, "OUT=/tmp/o", "ARGS=--set T=64")
    assert "--out /tmp/o --set T=64" in bench
