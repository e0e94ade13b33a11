"""The runner end to end on the CPU: records, exit codes, failures, interruption and resume."""
import json
import sqlite3
import textwrap

import pytest
import torch

import kernels
from kernels import Ops, reference as ref
from suite import cli
from suite.store.runs import read_records
from tests.conftest import HAS_CUDA, ROOT


def run_dir_of(out):
    dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture
def fake_backend(monkeypatch):
    """Registers backend `fake` whose ops the test chooses, through the one registry."""
    table = {}
    monkeypatch.setitem(kernels.BACKENDS, "fake", kernels.Backend("fake", "unused"))
    monkeypatch.setitem(kernels._LOADED, "fake", table)
    return table


def scenario(tmp_path, body):
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent(body))
    return str(p)


BASE = """
name: t
defaults: {T: 16, C: 8, n: 2, dtype: fp32, device: cpu, warmup_ms: 1, rep_ms: 1}
"""


def test_default_scenario_full_cpu_run(tmp_path):
    out = tmp_path / "results"
    # On a GPU machine the GPU cases belong to scenario runs, not to this test.
    only = ["--only", "device=cpu"] if HAS_CUDA else []
    code = cli.main(["run", str(ROOT / "scenarios/default.yaml"), "--out", str(out)] + only)
    assert code == 0
    run = run_dir_of(out)
    records = read_records(run)
    by_status = {}
    for r in records:
        by_status.setdefault(r["status"], []).append(r)
    cpu_ok = [r for r in by_status["ok"] if r["case"]["device"] == "cpu"]
    assert len(cpu_ok) == 12 and not by_status.get("failed")
    if not HAS_CUDA:
        assert all(r["reason"] == "no CUDA GPU on this machine" for r in by_status["skipped"])
        assert len(by_status["skipped"]) == 36
    for r in cpu_ok:
        assert r["check"]["passed"] and r["check"]["max_rel_err"] <= r["check"]["tol"]
        assert r["time_ms"]["n"] >= 30 and len(r["time_ms"]["samples"]) == r["time_ms"]["n"]
        assert r["time_ms"]["p10"] <= r["time_ms"]["median"] <= r["time_ms"]["p90"]
        assert r["bytes"]["read"] > 0 and r["gbps"] > 0 and r["pct_of_copy"] > 0
        assert r["schema"] == "hcbench.record/2" and len(r["case_id"]) == 12
    env = json.loads((run / "env.json").read_text())
    assert env["copy_rate"]["cpu"]["gbps"] > 0 and env["versions"]["torch"]
    report = (run / "report.md").read_text()
    assert "| mhc | compile |" in report and "no CUDA GPU on this machine" in report
    con = sqlite3.connect(out / "history.sqlite")
    assert con.execute("SELECT count(*) FROM records").fetchone()[0] == len(records)
    assert cli.main(["report", str(run)]) == 0
    assert cli.main(["compare", str(run), str(run)]) == 0
    # A run timed before the launch pad existed is flagged when compared with a padded one.
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "env.json").write_text((run / "env.json").read_text())
    with open(old / "records.jsonl", "w") as fh:
        for r in records:
            if r.get("time_ms"):
                r["time_ms"].pop("launch_pad_ms")
            fh.write(json.dumps(r) + "\n")
    from rich.console import Console
    from suite.report import tables as report
    console = Console(record=True, width=200)
    assert report.compare(old, run, console).joined == len(cpu_ok)
    assert "run A was timed before the launch pad" in console.export_text()


def test_wrong_answer_is_recorded_failed_not_timed_and_sweep_goes_on(tmp_path, fake_backend):
    wrong = lambda x, f, hp, hr: ref.post(x, f, hp, hr) * 1.01   # noqa: E731
    fake_backend["mhc"] = Ops("mhc", "fake", pre=ref.mhc_pre, post=wrong)
    fake_backend["hc"] = Ops("hc", "fake", pre=ref.hc_pre, post=ref.post)
    path = scenario(tmp_path, BASE + "sweep: {method: [mhc, hc], backend: [fake]}\n")
    out = tmp_path / "out"
    assert cli.main(["run", path, "--out", str(out)]) == 1
    recs = {r["case"]["method"]: r for r in read_records(run_dir_of(out))}
    bad = recs["mhc"]
    assert bad["status"] == "failed" and bad["time_ms"] is None
    assert bad["check"]["worst"] == "x_next" and "check failed: x_next rel err" in bad["reason"]
    assert recs["hc"]["status"] == "ok"


def test_missing_gradient_fails_the_check(tmp_path, fake_backend):
    detached = lambda x, f, hp, hr: ref.post(x.detach(), f, hp, hr)   # noqa: E731
    fake_backend["mhc"] = Ops("mhc", "fake", pre=ref.mhc_pre, post=detached)
    path = scenario(tmp_path, BASE + "sweep: {method: [mhc], backend: [fake], mode: [fwd+bwd]}\n")
    out = tmp_path / "out"
    assert cli.main(["run", path, "--out", str(out)]) == 1
    (rec,) = read_records(run_dir_of(out))
    assert rec["status"] == "failed" and rec["check"]["worst"] == "d_x"


def test_exception_and_oom_are_recorded_and_sweep_goes_on(tmp_path, fake_backend):
    def boom(*a, **k):
        raise RuntimeError("kernel exploded\nsecond line")

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    fake_backend["mhc"] = Ops("mhc", "fake", pre=boom, post=ref.post)
    fake_backend["hc"] = Ops("hc", "fake", pre=oom, post=ref.post)
    fake_backend["residual"] = Ops("residual", "fake", pre=ref.residual_pre, post=ref.residual_post)
    path = scenario(tmp_path, BASE + "sweep: {method: [mhc, hc, residual], backend: [fake]}\n")
    out = tmp_path / "out"
    assert cli.main(["run", path, "--out", str(out)]) == 1
    recs = {r["case"]["method"]: r for r in read_records(run_dir_of(out))}
    assert recs["mhc"]["reason"] == "RuntimeError: kernel exploded"
    assert "Traceback" in recs["mhc"]["traceback"]
    assert recs["hc"]["reason"].startswith("out of memory: CUDA out of memory")
    assert recs["residual"]["status"] == "ok"


def test_unrunnable_cases_are_skipped_with_reason(tmp_path, fake_backend, monkeypatch):
    fake_backend["mhc"] = Ops("mhc", "fake", pre=ref.mhc_pre, post=ref.post,
                              supports=lambda n, C, dtype: "fake takes no fp32")
    monkeypatch.setitem(kernels.BACKENDS, "triton",
                        kernels.Backend("triton", "kernels.triton", devices=("cuda",)))
    path = scenario(tmp_path, BASE + textwrap.dedent("""
        include:
          - {method: mhc, backend: fake}
          - {method: mhc, backend: triton}
          - {method: mhc, backend: torch, device: cuda, gpus: 64}
    """))
    out = tmp_path / "out"
    assert cli.main(["run", path, "--out", str(out)]) == cli.EXIT_NOTHING_MEASURED
    reasons = sorted(r["reason"] for r in read_records(run_dir_of(out)))
    assert reasons[0] == "backend triton needs a cuda device, case asks for cpu"
    assert reasons[1] == "fake takes no fp32"
    assert reasons[2] in ("no CUDA GPU on this machine", f"needs 64 GPUs, {torch.cuda.device_count()} present")


def test_interrupt_keeps_finished_cases_and_resume_finishes(tmp_path, fake_backend):
    def ctrl_c_at_24(x, f, hp, hr):
        if x.shape[-1] == 24:
            raise KeyboardInterrupt
        return ref.post(x, f, hp, hr)

    fake_backend["mhc"] = Ops("mhc", "fake", pre=ref.mhc_pre, post=ctrl_c_at_24)
    path = scenario(tmp_path, BASE + "sweep: {method: [mhc], backend: [fake], C: [8, 16, 24, 32]}\n")
    out = tmp_path / "out"
    assert cli.main(["run", path, "--out", str(out)]) == cli.EXIT_INTERRUPTED
    run = run_dir_of(out)
    assert sorted(r["case"]["C"] for r in read_records(run)) == [8, 16]
    stamps = {r["case_id"]: r["started_utc"] for r in read_records(run)}
    fake_backend["mhc"] = Ops("mhc", "fake", pre=ref.mhc_pre, post=ref.post)
    assert cli.main(["run", "--resume", str(run), "--out", str(out)]) == 0
    final = read_records(run)
    assert sorted(r["case"]["C"] for r in final) == [8, 16, 24, 32]
    assert all(r["started_utc"] == stamps[r["case_id"]] for r in final if r["case_id"] in stamps)


def test_resume_retries_failed_only_when_asked(tmp_path, fake_backend):
    fake_backend["mhc"] = Ops("mhc", "fake", pre=ref.mhc_pre,
                              post=lambda x, f, hp, hr: ref.post(x, f, hp, hr) + 1)
    path = scenario(tmp_path, BASE + "sweep: {method: [mhc], backend: [fake]}\n")
    out = tmp_path / "out"
    assert cli.main(["run", path, "--out", str(out)]) == 1
    run = run_dir_of(out)
    fake_backend["mhc"] = Ops("mhc", "fake", pre=ref.mhc_pre, post=ref.post)
    assert cli.main(["run", "--resume", str(run), "--out", str(out)]) == 1   # nothing rerun
    assert cli.main(["run", "--resume", str(run), "--retry-failed", "--out", str(out)]) == 0
    (rec,) = read_records(run)
    assert rec["status"] == "ok"


def test_run_needs_a_scenario_or_a_run_folder(tmp_path, capsys):
    assert cli.main(["run"]) == 2
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_resume_with_another_filter_adds_cases_to_the_same_run(tmp_path):
    path = scenario(tmp_path, BASE + "sweep: {method: [mhc, hc]}\n")
    out = tmp_path / "out"
    assert cli.main(["run", path, "--out", str(out), "--only", "method=mhc"]) == 0
    run = run_dir_of(out)
    assert cli.main(["run", path, "--resume", str(run), "--only", "method=hc"]) == 0
    assert sorted(r["case"]["method"] for r in read_records(run)) == ["hc", "mhc"]
    saved = json.loads((run / "scenarios" / "s.json").read_text())
    assert sorted(c["method"] for c in saved["cases"]) == ["hc", "mhc"]


def test_resume_looks_again_at_skipped_cases(tmp_path, fake_backend):
    fake_backend["mhc"] = Ops("mhc", "fake", pre=ref.mhc_pre, post=ref.post,
                              supports=lambda n, C, dtype: "library missing")
    path = scenario(tmp_path, BASE + "sweep: {method: [mhc], backend: [fake]}\n")
    out = tmp_path / "out"
    assert cli.main(["run", path, "--out", str(out)]) == cli.EXIT_NOTHING_MEASURED
    run = run_dir_of(out)
    assert read_records(run)[0]["status"] == "skipped"
    fake_backend["mhc"] = Ops("mhc", "fake", pre=ref.mhc_pre, post=ref.post)   # now installed
    assert cli.main(["run", "--resume", str(run)]) == 0
    (rec,) = read_records(run)
    assert rec["status"] == "ok"


def test_a_case_past_its_timeout_fails_and_the_sweep_goes_on(tmp_path, fake_backend):
    import time as _time

    def stuck(*a, **k):
        _time.sleep(30)

    fake_backend["mhc"] = Ops("mhc", "fake", pre=stuck, post=ref.post)
    fake_backend["hc"] = Ops("hc", "fake", pre=ref.hc_pre, post=ref.post)
    # 3 s: ample for the tiny hc case on a loaded 2-core CI machine, a tenth of the stuck one.
    path = scenario(tmp_path, BASE.replace("rep_ms: 1}", "rep_ms: 1, timeout_s: 3}")
                    + "sweep: {method: [mhc, hc], backend: [fake]}\n")
    out = tmp_path / "out"
    t0 = _time.time()
    assert cli.main(["run", path, "--out", str(out)]) == 1
    assert _time.time() - t0 < 20
    recs = {r["case"]["method"]: r for r in read_records(run_dir_of(out))}
    assert recs["mhc"]["reason"] == "timed out after 3 s (timeout_s)"
    assert recs["hc"]["status"] == "ok"


def _no_norm_pre(x, phi, b, alpha, sinkhorn_iters=20):
    """mHC without the RMS norm (step 1 of MATH.md skipped): must not pass the gate."""
    T, n, C = x.shape
    m = x.reshape(T, n * C).float() @ phi
    h_pre = torch.sigmoid(alpha[0] * m[:, :n] + b[:n])
    h_post = 2 * torch.sigmoid(alpha[1] * m[:, n:2 * n] + b[n:2 * n])
    h_res = ref.sinkhorn((alpha[2] * m[:, 2 * n:] + b[2 * n:]).view(T, n, n), sinkhorn_iters)
    return ref.apply_pre(x, h_pre), h_post, h_res


@pytest.mark.parametrize("cheat", ["no_norm", "sinkhorn_5", "bf16_coefficients"])
def test_gate_catches_shortcuts_that_hide_under_bf16_rounding(tmp_path, fake_backend, cheat):
    def short_sinkhorn(x, phi, b, alpha, sinkhorn_iters=20):
        return ref.mhc_pre(x, phi, b, alpha, sinkhorn_iters=5)

    def bf16_coefficients(x, phi, b, alpha, sinkhorn_iters=20):
        li, hp, hr = ref.mhc_pre(x, phi, b, alpha, sinkhorn_iters)
        return li, hp.bfloat16(), hr.bfloat16()

    pre = {"no_norm": _no_norm_pre, "sinkhorn_5": short_sinkhorn,
           "bf16_coefficients": bf16_coefficients}[cheat]
    fake_backend["mhc"] = Ops("mhc", "fake", pre=pre, post=ref.post)
    path = scenario(tmp_path, BASE.replace("dtype: fp32", "dtype: bf16").replace("C: 8", "C: 640").replace("T: 16", "T: 64")
                    .replace("n: 2", "n: 4") + "sweep: {method: [mhc], backend: [fake]}\n")
    out = tmp_path / "out"
    assert cli.main(["run", path, "--out", str(out)]) == 1
    (rec,) = read_records(run_dir_of(out))
    assert rec["status"] == "failed" and rec["time_ms"] is None
    if cheat == "bf16_coefficients":
        assert rec["check"]["wrong_dtype"]
    else:
        assert rec["check"]["worst"] in ("h_post", "h_res", "layer_input", "x_next")


def test_bad_run_folders_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "records.jsonl").write_text('{"case_id": "a", "case": {}, "status": "ok"}\n{broken\n')
    assert cli.main(["report", str(bad)]) == 2
    assert "records.jsonl: line 2" in capsys.readouterr().err


def test_resume_applies_only_to_saved_cases_and_refuses_another_gpu_model(tmp_path):
    path = scenario(tmp_path, BASE + "sweep: {method: [mhc, hc]}\n")
    out = tmp_path / "out"
    assert cli.main(["run", path, "--out", str(out), "--only", "method=mhc"]) == 0
    run = run_dir_of(out)
    assert cli.main(["run", "--resume", str(run), "--only", "method=hc"]) == 2   # not saved yet
    env = json.loads((run / "env.json").read_text())
    env["gpus"] = [{"name": "NVIDIA B200", "uuid": "x"}]
    (run / "env.json").write_text(json.dumps(env))
    assert cli.main(["run", path, "--resume", str(run)]) == 2


def test_a_reason_with_brackets_is_printed_whole(tmp_path, capsys):
    """Exception texts such as '[enforce fail at ...]' are text, not terminal markup."""
    from rich.console import Console
    from suite.report.tables import print_run
    rec = read_records(ROOT / "results" / "20261207T151356Z-vm-h100-80gb-hbm3")[0]
    run = tmp_path / "run"
    run.mkdir()
    rec = dict(rec, status="failed", reason="RuntimeError: [enforce fail at alloc.cpp:9] [bold]x")
    (run / "records.jsonl").write_text(json.dumps(rec) + "\n")
    print_run(run, Console(width=200, force_terminal=False))
    out = capsys.readouterr().out
    assert "[enforce fail at alloc.cpp:9] [bold]x" in out


def test_a_run_that_measured_nothing_exits_3_with_one_line(tmp_path, fake_backend, capsys):
    fake_backend["mhc"] = Ops("mhc", "fake", pre=ref.mhc_pre, post=ref.post,
                              supports=lambda n, C, dtype: "library missing")
    path = scenario(tmp_path, BASE + "sweep: {method: [mhc], backend: [fake]}\n")
    capsys.readouterr()
    assert cli.main(["run", path, "--out", str(tmp_path / "out")]) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == ["error: the run measured nothing: all 1 cases were skipped "
                   "(1 because: library missing)"]
