"""The pytest-benchmark commands of docs/contributing.md run as written, in their order, on one tiny
CPU case: every compare finds the saved run it compares with, and each saved benchmark carries the
suite timer's numbers that the page says it does."""
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "contributing.md"
BENCH = ROOT / "tests" / "bench" / "test_bench_ops.py"
ONE_CASE = "torch-residual-site-fwd and not bwd"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None,
                                reason="pytest-benchmark is not installed in this environment")


def _commands(text: str) -> list[list[str]]:
    """The `pytest tests/bench` command lines of the first code block that has them."""
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        lines = [line.strip() for line in block.splitlines()]
        cmds = [shlex.split(line) for line in lines if "pytest tests/bench" in line
                and not line.startswith("#")]
        if cmds:
            return cmds
    raise AssertionError(f"{DOCS.name}: no ```sh block with `pytest tests/bench` commands")


def test_the_documented_commands_work_in_order(tmp_path):
    cmds = _commands(DOCS.read_text())
    assert any("--benchmark-compare-fail=median:5%" in c for c in cmds), cmds
    store = tmp_path / "store"
    for cmd in cmds:
        assert cmd[:4] == [".venv/bin/python", "-m", "pytest", "tests/bench"], cmd
        # written to the temporary folder, never to the checkout: the saved runs and any --benchmark-json
        args = [a if not a.startswith("--benchmark-json=") else f"--benchmark-json={tmp_path}/b.json"
                for a in cmd[4:]]
        out = subprocess.run([sys.executable, "-m", "pytest", "tests/bench", *args, "-k", ONE_CASE,
                              f"--benchmark-storage=file://{store}", "-p", "no:cacheprovider",
                              "--benchmark-max-time=0.05"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        text = out.stdout + out.stderr
        compares = any(a.startswith("--benchmark-compare") and not a.startswith("--benchmark-compare-fail")
                       for a in args)
        if compares:
            assert "Can't compare" not in text, f"{shlex.join(cmd)} found no saved run:\n{text}"
        # The gate judged: on a shared CPU one noisy run trips it, which is the gate working. It
        # raises from pytest's summary, so the summary line is missing then.
        gate_tripped = "Performance has regressed" in text
        assert out.returncode == 0 or gate_tripped, f"{shlex.join(cmd)} -> {out.returncode}\n{text}"
        assert re.search(r"test_bench_ops\.py \.", text) and ("1 passed" in text or gate_tripped), text
    saved = sorted(store.rglob("*.json"))
    assert saved, f"no command saved a run under {store}"
    bench = json.loads(saved[0].read_text())["benchmarks"][0]
    info = bench["extra_info"]
    assert info["case_id"] and info["bytes"] > 0 and info["gbps"] > 0, info
    suite = info["suite_time_ms"]
    assert 0 < suite["p10"] <= suite["median"] <= suite["p90"] and suite["n"] >= 30, suite


def test_the_bench_module_shows_the_same_commands():
    doc = BENCH.read_text().split('"""')[1]
    shown = [shlex.split(line.strip()) for line in doc.splitlines()
             if line.strip().startswith("pytest tests/bench")]
    assert shown == [c[2:] for c in _commands(DOCS.read_text())], shown
