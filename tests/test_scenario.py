"""Scenario loading: expansion rules and every validation error, one line each, exit status 2."""
import subprocess
import sys
import textwrap

import pytest

from suite.core.scenario import ScenarioError, load
from tests.conftest import ROOT


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems(tmp_path, text):
    with pytest.raises(ScenarioError) as info:
        load(write(tmp_path, text))
    return info.value.problems


def test_sweep_is_cartesian_with_exclude_and_include(tmp_path):
    sc = load(write(tmp_path, """
        name: t
        defaults: {T: 64, dtype: fp32, device: cpu}
        sweep:
          method: [hc, mhc]
          C: [8, 16]
          mode: [fwd, fwd+bwd]
        exclude:
          - {method: hc, mode: fwd+bwd}
        include:
          - {method: mhc, C: 24, n: [2, 3]}
    """))
    keys = [(c.method, c.C, c.mode, c.n) for c in sc.cases]
    assert ("hc", 8, "fwd+bwd", 4) not in keys
    assert len(keys) == 2 + 4 + 2
    assert ("mhc", 24, "fwd", 2) in keys and ("mhc", 24, "fwd", 3) in keys
    assert all(c.T == 64 and c.dtype == "fp32" for c in sc.cases)


def test_residual_is_n1_and_deduplicated(tmp_path):
    sc = load(write(tmp_path, """
        name: t
        defaults: {C: 8, T: 4}
        sweep: {method: [residual, mhc], n: [1, 2, 4]}
    """))
    residual = [c for c in sc.cases if c.method == "residual"]
    assert len(residual) == 1 and residual[0].n == 1 and residual[0].sinkhorn_iters is None
    assert len([c for c in sc.cases if c.method == "mhc"]) == 3


def test_case_id_is_stable_and_ignores_run_control(tmp_path):
    a = load(write(tmp_path, "name: t\ndefaults: {method: mhc, C: 8, T: 4, rep_ms: 10, seed: 1}\n"))
    b = load(write(tmp_path, "name: t\ndefaults: {method: mhc, C: 8, T: 4, rep_ms: 99}\n", "b.yaml"))
    c = load(write(tmp_path, "name: t\ndefaults: {method: mhc, C: 16, T: 4}\n", "c.yaml"))
    assert a.cases[0].case_id == b.cases[0].case_id != c.cases[0].case_id
    assert len(a.cases[0].case_id) == 12


def test_overrides_replace_swept_values(tmp_path):
    p = write(tmp_path, "name: t\ndefaults: {method: mhc, T: 4}\nsweep: {C: [8, 16]}\n")
    sc = load(p, {"C": 24})
    assert [c.C for c in sc.cases] == [24]


@pytest.mark.parametrize("text, expected", [
    ("name: t\nbogus: 1\ndefaults: {method: mhc, C: 8, T: 4}\n", "bogus: unknown key; allowed: name"),
    ("name: t\ndefaults: {method: mhc, C: 8, T: 4, colour: red}\n", "defaults.colour: unknown field"),
    ("name: t\ndefaults: {method: dense, C: 8, T: 4}\n",
     "defaults.method: 'dense' is not allowed; allowed: residual | hc | mhc"),
    ("name: t\ndefaults: {method: mhc, backend: cuda9, C: 8, T: 4}\n",
     "defaults.backend: 'cuda9' is not allowed; allowed: torch | compile | triton"),
    ("name: t\ndefaults: {method: mhc, dtype: fp8, C: 8, T: 4}\n", "allowed: bf16 | fp16 | fp32"),
    ("name: t\ndefaults: {method: mhc, mode: bwd, C: 8, T: 4}\n", "allowed: fwd | fwd+bwd"),
    ("name: t\ndefaults: {method: mhc, C: 8, T: 4}\nsweep: {n: [0, 4, 17]}\n",
     "sweep.n[0]: 0 is not allowed; allowed: integers 1..16"),
    ("name: t\ndefaults: {method: mhc, C: 8, T: 4}\nsweep: {n: [0, 4, 17]}\n", "sweep.n[2]: 17"),
    ("name: t\ndefaults: {method: mhc, C: -8, T: 4}\n", "defaults.C: -8 is not allowed; allowed: integers >= 1"),
    ("name: t\ndefaults: {method: mhc, C: 40.5, T: 4}\n", "defaults.C: 40.5 is not allowed"),
    ("name: t\ndefaults: {method: mhc, C: 8, T: 0}\n", "defaults.T: 0 is not allowed"),
    ("name: t\ndefaults: {method: mhc, C: '8', T: 4}\n", "defaults.C: '8' is not allowed"),
    ("name: t\ndefaults: {method: mhc, C: 8, T: true}\n", "defaults.T: True is not allowed"),
    ("name: t\ndefaults: {method: mhc, C: 8, T: 4, rep_ms: fast}\n", "allowed: a positive number"),
    ("name: t\ndefaults: {method: mhc, C: 8, T: 4, timeout_s: .inf}\n", "timeout_s: inf is not allowed"),
    ("name: t\ndefaults: {method: mhc, C: 8, T: 4}\nsweep: {C: 8}\n", "sweep.C: must be a list"),
    ("name: t\ndefaults: {method: mhc, C: 8, T: 4}\nsweep: {C: []}\n", "sweep.C: empty list"),
    ("name: t\ndefaults: [1, 2]\n", "defaults: expected a mapping"),
    ("name: t\ndefaults: {method: mhc, T: 4}\n", "missing C"),
    ("defaults: {method: mhc, C: 8, T: 4}\n", "name: required"),
    ("name: t\ndefaults: {method: mhc, C: 8, T: 4}\nexclude: {method: hc}\n", "exclude: must be a list"),
])
def test_validation_errors_name_file_key_value_and_allowed(tmp_path, text, expected):
    found = problems(tmp_path, text)
    assert any(expected in line for line in found), found
    assert all(line.startswith(str(tmp_path / "s.yaml")) for line in found)
    assert all("\n" not in line for line in found)


def test_every_problem_is_reported_at_once(tmp_path):
    found = problems(tmp_path, "name: t\ndefaults: {method: x, C: 0, T: -1, n: 99}\n")
    assert len(found) == 4


@pytest.mark.parametrize("text, expected", [
    (None, "file not found"),
    ("", "file is empty"),
    ("   \n# only a comment\n", "file has no content"),
    ("name: [unclosed\n", "not valid YAML at line"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("name: a\nname: b\n", "key 'name' is given twice"),
    ("name: a\ndefaults: {method: mhc, C: 8, C: 16, T: 4}\n", "key 'C' is given twice"),
    ("just a string\n", "top level must be a mapping"),
])
def test_file_level_errors(tmp_path, text, expected):
    path = tmp_path / "s.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load(path)
    assert expected in info.value.problems[0]
    assert str(path) in info.value.problems[0]


def test_cli_bad_input_exits_2_with_one_line_each_and_no_traceback(tmp_path):
    bad = write(tmp_path, "name: t\ndefaults: {method: x, C: 0, T: 4}\n")
    res = subprocess.run([sys.executable, "harness.py", "list", str(bad)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith(f"error: {bad}") for l in lines)
    assert "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "harness.py", "run", str(tmp_path / "missing.yaml"),
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "file not found" in res.stderr and "Traceback" not in res.stderr


def test_list_prints_expanded_cases_without_running(tmp_path):
    p = write(tmp_path, "name: t\ndefaults: {method: mhc, T: 4, device: cpu}\nsweep: {C: [8, 16]}\n")
    res = subprocess.run([sys.executable, "harness.py", "list", str(p)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0
    assert "2 cases" in res.stdout and "C=8" in res.stdout and "C=16" in res.stdout
    assert not (tmp_path / "results").exists()


def test_shipped_scenarios_are_valid():
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        assert load(path).cases, path


def test_only_filters_cases_and_rejects_unknown_keys(tmp_path):
    from suite.core.scenario import filter_cases
    sc = load(write(tmp_path, "name: t\ndefaults: {method: mhc, T: 4}\nsweep: {C: [8, 16, 24]}\n"))
    assert [c.C for c in filter_cases(sc, ["C=8,24"]).cases] == [8, 24]
    with pytest.raises(ScenarioError, match="KEY one of"):
        filter_cases(sc, ["colour=red"])
    with pytest.raises(ScenarioError, match="no case matches"):
        filter_cases(sc, ["C=99"])


def test_non_utf8_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"\xff\xfename: t\n")
    with pytest.raises(ScenarioError, match="not UTF-8"):
        load(path)


def test_a_model_field_given_to_a_site_case_is_an_error_but_inherited_is_dropped(tmp_path):
    from suite.core.scenario import ScenarioError, parse
    base = {"name": "s", "defaults": {"device": "cpu", "dtype": "fp32", "backend": "torch", "n": 2,
                                      "C": 64, "T": 32, "seq": 32}}
    with pytest.raises(ScenarioError) as err:
        parse({**base, "include": [{"method": "mhc", "layers": 12}]}, "s.yaml")
    assert "layers: means nothing for scope site" in err.value.problems[0]
    sc = parse({**base, "include": [{"method": "mhc"}, {"method": "mhc", "scope": "model",
                                                           "layers": 2, "mode": "fwd+bwd"}]}, "s.yaml")
    assert [c.scope for c in sc.cases] == ["site", "model"] and sc.cases[0].seq is None


def test_an_exclude_that_matches_nothing_warns(tmp_path, capsys):
    from suite import cli
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndefaults: {device: cpu, dtype: fp32, backend: torch, n: 2, C: 64, T: 32}\n"
                    "sweep: {method: [hc, mhc]}\nexclude: [{method: residual}]\n")
    assert cli.main(["list", str(path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "exclude[0]" in err[0]


def test_labels_name_the_sinkhorn_iterations_where_they_differ_from_20():
    from suite.core.scenario import Case, normalise
    a = normalise(Case(method="mhc", C=64, T=32, sinkhorn_iters=7))
    b = normalise(Case(method="mhc", C=64, T=32))
    assert a.label() != b.label() and "iters=7" in a.label() and "iters" not in b.label()


BOMB = "name: bomb\nl0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9))


@pytest.mark.parametrize("text,want", [
    (BOMB, "more than 100000 values once its aliases are expanded"),
    ("name: deep\ndefaults: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32 levels"),
    ("name: deeper\ndefaults: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper than 32 levels"),
    ("name: huge\ndefaults: {device: cpu, method: mhc, backend: torch}\n"
     "sweep: {C: [" + ", ".join(str(8 * i) for i in range(1, 1001)) + "], T: ["
     + ", ".join(str(i) for i in range(1, 1001)) + "]}\n", "make 1000000 cases; a scenario has at most 100000"),
    ("name: big\ndescription: '" + "x" * (1 << 20) + "'\n", "a scenario file is at most 1048576 bytes"),
], ids=["alias-bomb", "nested", "very-nested", "million-cases", "two-megabytes"])
def test_oversized_scenarios_are_one_line_and_quick(tmp_path, capsys, text, want):
    import time
    from suite import cli
    path = tmp_path / "s.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    assert cli.main(["list", str(path)]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0] and len(err[0]) < 400, err
