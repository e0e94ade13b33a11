"""The interpreter that builds .venv: too old a Python stops tools/make_env.py with one line and exit
status 2 (no traceback), and `make bench PYTHON=...` picks the interpreter, from the command line only."""
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE_ENV = ROOT / "tools" / "make_env.py"

# Runs make_env.py as `python3.10 tools/make_env.py VENV` would: an older version_info and no
# tomllib (new in 3.11), so the check is exercised on the interpreter that runs the tests.
OLD_PYTHON = """
import runpy, sys
sys.version_info = (3, 10, 12, "final", 0)
sys.modules["tomllib"] = None
sys.argv = [sys.argv[1], sys.argv[2]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _required() -> str:
    """requires-python as make_env.py reads it; a form it cannot read would switch the check off."""
    make_env = runpy.run_path(str(MAKE_ENV))
    need = make_env["required_python"]((ROOT / "pyproject.toml").read_text())
    assert need is not None, "make_env.py cannot read pyproject's requires-python"
    return f"{need[0]}.{need[1]}"


def test_an_old_python_stops_with_one_line_and_exit_2(tmp_path):
    venv = tmp_path / "venv"
    out = subprocess.run([sys.executable, "-c", OLD_PYTHON, str(MAKE_ENV), str(venv)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f">= {_required()}" in lines[0] and "3.10.12" in lines[0] and "PYTHON=" in lines[0]
    assert not venv.exists() and out.stdout == ""


def test_the_suite_itself_needs_what_requires_python_says():
    """requires-python is the suite's real floor: its code uses 3.11's datetime.UTC."""
    assert _required() == "3.11"
    uses = subprocess.run(["grep", "-rlE", r"dt\.UTC|datetime\.UTC|import tomllib", "suite"],
                          cwd=ROOT, capture_output=True, text=True).stdout
    assert uses.strip(), "nothing in suite/ needs 3.11 any more: lower requires-python and make_env's floor"


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def _dry(env_over: dict, *args: str) -> str:
    # a fresh make, also under `make test`: the outer make's flags and level stay out
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(env_over)
    out = subprocess.run(["make", "--no-print-directory", "-n", "bench", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@needs_make
def test_make_bench_python_picks_the_interpreter_that_builds_the_venv(tmp_path):
    venv = tmp_path / "v"    # no stamp there: make must (dry-)run make_env.py
    lines = _dry({}, f"VENV={venv}", "PYTHON=/x/python").splitlines()
    assert f"/x/python tools/make_env.py {venv}" in lines, lines
    assert f"python3 tools/make_env.py {venv}" in _dry({}, f"VENV={venv}").splitlines()


@needs_make
def test_an_exported_python_does_not_pick_it(tmp_path):
    venv = tmp_path / "v"
    lines = _dry({"PYTHON": "/elsewhere/python"}, f"VENV={venv}").splitlines()
    assert f"python3 tools/make_env.py {venv}" in lines and "elsewhere" not in "\n".join(lines)
