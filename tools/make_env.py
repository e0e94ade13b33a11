"""Creates the project's virtual environment, reusing a torch that is already installed.

Usage: python3 tools/make_env.py VENV_DIR (`make bench PYTHON=python3.12` picks the interpreter)
- The interpreter must meet pyproject's requires-python; an older one stops here with one line
  (exit status 2) before anything is created.
- If the interpreter running this script can import torch (a GPU node, often offline), the venv
  is made with --system-site-packages so that torch, triton and friends are reused, not downloaded.
- Otherwise TORCH_SPEC (default torch==2.13.0) is installed first, then the rest of pyproject's
  dependencies. Requirements already satisfied cost no download, so this works offline when the
  node has them.
A stamp file records the pyproject hash so a second call is instant.
"""
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Libraries only one backend needs: when they cannot be installed the venv is made without them.
OPTIONAL_BACKEND_DEPS = ("tilelang", "apache-tvm-ffi", "cython")


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower()


def link_parent_env(py: Path) -> None:
    """This interpreter is itself a venv (e.g. /opt/torch/.venv on a GPU node): --system-site-packages
    would only reach the base Python, so its site-packages are added to the new venv by a .pth file."""
    import site
    target = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    Path(target, "_hcbench_parent_env.pth").write_text(
        "".join(p + "\n" for p in site.getsitepackages()))


def required_python(pyproject: str):
    """(major, minor) of pyproject's requires-python = ">=X.Y", read without tomllib: the check
    must run on the old interpreters it turns away."""
    m = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)', pyproject, re.M)
    return (int(m.group(1)), int(m.group(2))) if m else None


def python_too_old(pyproject: str, version=None):
    """The one line that turns this interpreter away, or None when it is recent enough."""
    version = tuple(sys.version_info if version is None else version)
    need = required_python(pyproject)
    if need is None or version[:2] >= need:
        return None
    return (f"make_env: hcbench needs Python >= {need[0]}.{need[1]} (pyproject.toml requires-python), "
            f"but {sys.executable} is {'.'.join(str(v) for v in version[:3])}; "
            f"choose another with make bench PYTHON=python{need[0]}.{need[1]}")


def main() -> int:
    venv = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv")
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    too_old = python_too_old(pyproject.decode())
    if too_old:
        print(too_old, file=sys.stderr)
        return 2
    import tomllib   # here, not at the top: on 3.10 the line above is the whole message
    stamp = venv / ".hcbench-ready"
    digest = hashlib.sha256(pyproject + os.environ.get("TORCH_SPEC", "").encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return 0
    have_torch = importlib.util.find_spec("torch") is not None
    py = venv / "bin" / "python"
    if not py.exists():
        args = [sys.executable, "-m", "venv", str(venv)]
        if have_torch:
            args.insert(3, "--system-site-packages")
        print(f"make_env: creating {venv}"
              + (" (reusing this interpreter's torch)" if have_torch else ""), flush=True)
        subprocess.run(args, check=True)
        if have_torch and sys.prefix != sys.base_prefix:
            link_parent_env(py)
    deps = tomllib.loads(pyproject.decode())["project"]["dependencies"]
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0:
        spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")
        print(f"make_env: no torch found, installing {spec}", flush=True)
        subprocess.run(pip + [spec], check=True)
    print("make_env: checking dependencies", flush=True)
    res = subprocess.run(pip + deps)
    core = [d for d in deps if _dist_name(d) not in OPTIONAL_BACKEND_DEPS]
    if res.returncode != 0 and len(core) < len(deps):
        # An offline node without a backend's own libraries (tilelang's wheels travel separately,
        # see docs/offline-gpu.md) still gets a working venv; that backend's cases skip.
        print("make_env: retrying without the optional backend libraries "
              f"({', '.join(OPTIONAL_BACKEND_DEPS)}); their backend's cases will be skipped", flush=True)
        res = subprocess.run(pip + core)
    if res.returncode != 0:
        print("make_env: pip could not install the dependencies above; on an offline node install "
              "them into the base interpreter first (pyproject.toml lists them)", file=sys.stderr)
        return res.returncode
    stamp.write_text(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
