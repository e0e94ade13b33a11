"""Running a scenario through the command line in a test, the way a user does."""
import textwrap
from pathlib import Path

from suite import cli
from suite.store.runs import read_records


def run_model_scenario(tmp_path: Path, yaml_text: str) -> tuple[Path, dict]:
    """Writes the scenario, runs it (exit 0 expected) and returns its run folder and its records
    by (method, recompute)."""
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent(yaml_text))
    out = tmp_path / "out"
    assert cli.main(["run", str(p), "--out", str(out)]) == 0
    (run,) = [d for d in out.iterdir() if d.is_dir()]
    return run, {(r["case"]["method"], r["case"]["recompute"]): r for r in read_records(run)}
