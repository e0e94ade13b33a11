"""What goes into a run folder: one writer at a time (a second run or merge into a folder another
process is writing stops with one line and exit 2 and writes nothing), folders made in the same
second by several processes never collide, and a case listed by two scenario files is one record."""
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import pytest

from suite import cli
from suite.store import runs

ROOT = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time
from suite.store import runs
store = runs.RunStore(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def _hold(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


SMALL = """
name: small
defaults: {device: cpu, dtype: fp32, backend: torch, n: 2, C: 64, T: 32, mode: fwd,
           warmup_ms: 1, rep_ms: 2}
sweep: {method: [residual, mhc]}
"""


def test_a_second_writer_is_refused_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(SMALL)
    assert cli.main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 0
    (run_dir,) = [d for d in (tmp_path / "out").iterdir() if d.is_dir()]
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    holder = _hold(run_dir)
    try:
        capsys.readouterr()
        assert cli.main(["run", "--resume", str(run_dir), "--retry-failed"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another process is writing this run folder" in err[0]
        assert cli.main(["merge", str(run_dir), str(run_dir)]) == 2
        assert "another process is writing" in capsys.readouterr().err
        after = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        assert after == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died (a kill included): the lock went with it
    assert cli.main(["merge", str(run_dir), str(run_dir)]) == 0


def test_the_lock_lives_beside_the_folder_and_is_released_on_close(tmp_path):
    run_dir = tmp_path / "r1"
    store = runs.RunStore(run_dir)
    assert (tmp_path / ".r1.lock").exists() and not any(run_dir.iterdir())
    with pytest.raises(runs.RunLocked):
        runs.RunStore(run_dir)
    store.close()
    runs.RunStore(run_dir).close()


def _make(root: str) -> str:
    return runs.new_run_dir(Path(root), "cpu").name


def test_run_folders_made_at_once_never_collide(tmp_path):
    with mp.get_context("spawn").Pool(6) as pool:
        names = pool.map(_make, [str(tmp_path)] * 24)
    assert len(set(names)) == 24


def test_a_case_in_two_scenario_files_is_timed_once(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text(SMALL)
    (tmp_path / "b.yaml").write_text(SMALL.replace("name: small", "name: again"))
    out = tmp_path / "out"
    assert cli.main(["run", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), "--out", str(out)]) == 0
    assert "2 case(s) appear in more than one scenario file" in capsys.readouterr().out
    (run_dir,) = [d for d in out.iterdir() if d.is_dir()]
    records = runs.read_records(run_dir)
    assert len(records) == 2 and {r["scenario"] for r in records} == {"small"}
