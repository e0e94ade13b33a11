"""A run folder or an output path this version cannot use gives one line and exit 2, writes
nothing, and never a traceback: records lines that are not records, a corrupt env.json, a schema
from a newer version, --out or --to naming a file."""
import json
import shutil
from pathlib import Path

import pytest

from suite import cli

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "results" / "20261207T151356Z-vm-h100-80gb-hbm3"


def _record(**over):
    rec = json.loads((RUN / "records.jsonl").read_text().splitlines()[0])
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not _DROP}


_DROP = object()
BAD_LINES = {
    "a number": "42",
    "null": "null",
    "no status": json.dumps(_record(status=_DROP)),
    "a newer schema": json.dumps(_record(schema="hcbench.record/9")),
    "an unknown status": json.dumps(_record(status="maybe")),
}


def _copy(tmp_path: Path) -> Path:
    run = tmp_path / RUN.name
    shutil.copytree(RUN, run)
    return run


def _files(run: Path) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("what", list(BAD_LINES))
def test_a_records_line_that_is_not_a_record(tmp_path, capsys, what):
    run = _copy(tmp_path)
    with open(run / "records.jsonl", "a") as fh:
        fh.write(BAD_LINES[what] + "\n")
    before = _files(run)
    for argv in (["report", str(run)], ["compare", str(run), str(run)],
                 ["publish", str(run), "--to", str(tmp_path / "site")]):
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "records.jsonl: line" in err[0] and "Traceback" not in err[0], err
    assert _files(run) == before and not (tmp_path / "site").exists()


def test_a_corrupt_env_json(tmp_path, capsys):
    run = _copy(tmp_path)
    (run / "env.json").write_text("{corrupt")
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "env.json: not JSON" in err[0]


def test_out_or_to_naming_a_file(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine\n")
    assert cli.main(["run", str(ROOT / "scenarios/default.yaml"), "--out", str(a_file)]) == 2
    assert cli.main(["publish", str(RUN), "--to", str(a_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("names a file" in line for line in err)
    assert a_file.read_text() == "mine\n" and sorted(tmp_path.iterdir()) == [a_file]
