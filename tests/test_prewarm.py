"""suite.prewarm: runs each distinct case once in worker processes, exit codes."""
import textwrap

from suite import prewarm


def test_prewarm_runs_distinct_cases_once(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent("""
        name: t
        defaults: {T: 8, C: 16, n: 2, dtype: fp32, device: cpu, backend: torch}
        sweep: {method: [mhc, hc], mode: [fwd], seed: [1, 2]}
    """))
    assert prewarm.main([str(p), "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 distinct cases" in out                 # seeds are run control: same kernels
    assert "mhc/torch" in out and "hc/torch" in out


def test_prewarm_bad_input_exits_2(tmp_path, capsys):
    assert prewarm.main([str(tmp_path / "missing.yaml")]) == 2
    assert "error:" in capsys.readouterr().err
