"""A script under dev/ or tools/ loaded as a module, for the tests of scripts that are not a
package."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEV, TOOLS = ROOT / "dev", ROOT / "tools"
FOLDERS = (DEV, TOOLS)


def load(name: str):
    """dev/<name>.py or tools/<name>.py as a module (its main() not run)."""
    path = next(p for p in (f / f"{name}.py" for f in FOLDERS) if p.exists())
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
