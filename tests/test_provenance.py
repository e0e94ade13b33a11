"""Every run and record says which code and which kernel settings made it; runs with other kernel
settings are never joined with default ones (compare) nor resumed into them."""
import json
import textwrap

from rich.console import Console

from suite import cli
from suite.measure import env
from suite.report import tables as report
from suite.store.runs import read_records


def test_kernel_settings_are_the_knobs_set_and_nothing_else():
    got = env.kernel_settings({"HCBENCH_MHC_PRE_BT": "8", "HCBENCH_HC_PRE": "a=1", "HCBENCH_TL_DX": "x",
                               "HCBENCH_POST_FWD": "b=2", "HCBENCH_NCU": "/bin/ncu", "PATH": "/x"})
    assert got == {"HCBENCH_HC_PRE": "a=1", "HCBENCH_MHC_PRE_BT": "8", "HCBENCH_POST_FWD": "b=2",
                   "HCBENCH_TL_DX": "x"}
    assert env.kernel_settings({}) == {}


def test_code_provenance_names_this_checkout():
    code = env.code_provenance()
    assert code["commit"] is None or len(code["commit"]) == 40
    assert code["dirty"] in (True, False, None)


def _run(tmp_path, out, monkeypatch, knobs=None, resume=None):
    for k, v in (knobs or {}).items():
        monkeypatch.setenv(k, v)
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent("""
        name: t
        defaults: {T: 8, C: 16, n: 2, dtype: fp32, device: cpu, warmup_ms: 1, rep_ms: 1,
                   mode: fwd, method: mhc}
    """))
    args = ["run", str(p)] + (["--resume", str(resume)] if resume else ["--out", str(out)])
    rc = cli.main(args)
    for k in knobs or {}:
        monkeypatch.delenv(k)
    return rc


def test_records_carry_code_and_kernel_settings_and_tuned_runs_never_join(tmp_path, monkeypatch,
                                                                        capsys):
    for k in env.kernel_settings():
        monkeypatch.delenv(k)
    assert _run(tmp_path, tmp_path / "a", monkeypatch) == 0
    assert _run(tmp_path, tmp_path / "b", monkeypatch, {"HCBENCH_MHC_PRE_BT": "8"}) == 0
    (run_a,) = [d for d in (tmp_path / "a").iterdir() if d.is_dir()]
    (run_b,) = [d for d in (tmp_path / "b").iterdir() if d.is_dir()]
    ra, rb = read_records(run_a)[0], read_records(run_b)[0]
    assert ra["kernel_settings"] == {} and rb["kernel_settings"] == {"HCBENCH_MHC_PRE_BT": "8"}
    assert "commit" in ra["code"] and "dirty" in ra["code"]
    assert json.loads((run_b / "env.json").read_text())["kernel_settings"] == rb["kernel_settings"]
    console = Console(width=200, record=True)
    assert report.compare(run_a, run_a, console).joined == 1
    assert report.compare(run_a, run_b, console).joined == 0
    assert "not joined: their kernel settings differ" in console.export_text()
    # resuming the default run under a tuned setting is refused with one line, exit 2
    capsys.readouterr()
    assert _run(tmp_path, None, monkeypatch, {"HCBENCH_MHC_PRE_BT": "8"}, resume=run_a) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kernel settings" in err[0]


def test_a_retired_knob_name_stops_a_run_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MHC_PRE_BT", "32")
    assert _run(tmp_path, tmp_path / "c", monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HCBENCH_MHC_PRE_" in err[0]
    assert not (tmp_path / "c").exists()
