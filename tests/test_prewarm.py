"""suite.run.prewarm: runs each distinct case once in worker processes, exit codes."""
import textwrap

from suite.run import prewarm


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


def _case(**kw):
    from suite.core.scenario import Case
    return Case(**{"method": "mhc", "backend": "torch", "T": 16384, "n": 4, "C": 7168,
                   "dtype": "bf16", "device": "cuda", **kw})


def test_check_tokens_is_the_whole_case_or_a_power_of_two(monkeypatch):
    import torch

    from suite.run.check import BYTES_PER_ELEMENT, check_tokens
    case = _case()
    per_token = case.n * case.C * BYTES_PER_ELEMENT

    def free(tokens):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int((tokens + 0.5) * per_token / 0.6), 0))

    free(20000)
    assert check_tokens(case, "cuda") == 16384                # all of it fits
    for tokens, want in ((10000, 8192), (9000, 8192), (8192, 8192), (8191, 4096), (0, 1)):
        free(tokens)
        assert check_tokens(case, "cuda") == want, tokens
    assert check_tokens(_case(device="cpu"), "cpu") == 16384


def test_prewarm_warms_check_shapes_of_backends_that_compile_per_token_count(monkeypatch):
    import torch

    from suite.run.check import BYTES_PER_ELEMENT
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    big = _case(backend="liger")
    per_token = big.n * big.C * BYTES_PER_ELEMENT
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(10000.5 * per_token / 0.6), 0))
    cases = [_case(C=2560, backend="liger"),           # fits whole: no extra job
             big, _case(backend="liger", mode="fwd+bwd"),
             _case(backend="liger", seed=7),            # run control only: same check shape
             _case(backend="triton"),                   # T is a runtime argument there
             _case(backend="liger", scope="model", layers=2),   # gated by suite.workloads.steps instead
             _case(backend="liger", T=8192),            # its own T is the check shape: warmed anyway
             _case(backend="liger", device="cpu")]
    jobs = prewarm._check_jobs(cases)
    assert [(d["mode"], t) for d, t in jobs] == [("fwd+bwd", 8192)]   # fwd: the T=8192 case
    assert jobs[0][0]["T"] == 16384                     # the case as given; the worker swaps T


def test_prewarm_without_a_usable_gpu_adds_no_check_jobs(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert prewarm._check_jobs([_case(backend="liger")]) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def broken():
        raise RuntimeError("CUDA error: busy or unavailable")
    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    assert prewarm._check_jobs([_case(backend="liger")]) == []
    assert "check shapes not warmed" in capsys.readouterr().out
