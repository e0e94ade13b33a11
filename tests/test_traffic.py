"""Measured traffic on the CPU: ncu's CSV parsed from real recorded output (tests/data), the
amplification arithmetic, the paper's figures, the profiler run through a stand-in `ncu`, the probe,
and how every part degrades without a GPU or ncu."""
import json
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from suite import cli
from suite.analysis import cost
from suite.analysis.paper_traffic import paper_figure
from suite.core.scenario import Case
from suite.measure import ncu_csv
from suite.report.sections import traffic_markdown, traffic_rows
from suite.run import traffic, traffic_probe
from suite.store.runs import read_records
from tests.conftest import ROOT

DATA = ROOT / "tests" / "data"
SAMPLE = (DATA / "ncu_sample.txt").read_text()
SAMPLE_BASE = (DATA / "ncu_sample_base.txt").read_text()
# Sums over the 8 kernels of ncu_sample.txt, added up by hand from the file.
SAMPLE_READ, SAMPLE_WRITE, SAMPLE_L2, SAMPLE_NS = 1_879_293_952, 1_213_421_312, 4_971_747_584, 1_233_536
BASE_WRITE = 1_213_266_176


# ------------------------------------------------------------------ parsing recorded output
def test_parses_every_kernel_of_the_recorded_sample_despite_banner_and_program_output():
    kernels = ncu_csv.parse(SAMPLE)
    assert [k.launch_id for k in kernels] == list(range(8))
    add = kernels[0]
    assert "CUDAFunctor_add<c10::BFloat16>" in add.name
    assert add.metrics == {"dram__bytes_read.sum": 268_446_976, "dram__bytes_write.sum": 118_064_384,
                           "gpu__time_duration.sum": 128_064, "lts__t_bytes.sum": 605_849_120}
    assert kernels[7].metrics["lts__t_bytes.sum"] == 421_963_520
    assert sum(k.metrics["dram__bytes_read.sum"] for k in kernels) == SAMPLE_READ
    assert sum(k.metrics["dram__bytes_write.sum"] for k in kernels) == SAMPLE_WRITE
    assert sum(k.metrics["lts__t_bytes.sum"] for k in kernels) == SAMPLE_L2
    assert sum(k.metrics["gpu__time_duration.sum"] for k in kernels) == SAMPLE_NS


def test_parses_the_base_units_sample_with_dram_metrics_only():
    kernels = ncu_csv.parse(SAMPLE_BASE)
    assert len(kernels) == 8
    fields = traffic.summarise(kernels, cost.Cost(1, 1, 0))
    m = fields["bytes_measured"]
    assert (m["read"], m["write"], m["l2"]) == (SAMPLE_READ, BASE_WRITE, None)
    assert m["per_kernel"][3]["time_ns"] is None


def test_scaled_units_give_the_same_bytes():
    """The same table printed in Mbyte / usecond (ncu's --print-units auto) parses to the same values."""
    def rescale(line):
        for unit, new, div in (('"byte"', '"Mbyte"', 1e6), ('"ns"', '"usecond"', 1e3)):
            if f'{unit},"' in line:
                head, value = line.rsplit(f'{unit},"', 1)
                number = int(value.rstrip('"').replace(",", ""))
                return f'{head}{new},"{number / div:,.6f}"'
        return line
    scaled = "\n".join(rescale(ln) for ln in SAMPLE.splitlines())
    assert '"Mbyte","268.446976"' in scaled
    kernels = ncu_csv.parse(scaled)
    assert sum(k.metrics["dram__bytes_read.sum"] for k in kernels) == pytest.approx(SAMPLE_READ, abs=8)
    assert sum(k.metrics["gpu__time_duration.sum"] for k in kernels) == pytest.approx(SAMPLE_NS, abs=1)


def test_units_and_bad_values():
    assert ncu_csv.to_base_unit("421,963,520", "byte") == 421_963_520
    assert ncu_csv.to_base_unit("1.5", "Kbyte") == 1500
    assert ncu_csv.to_base_unit("2", "Gbyte") == 2e9
    assert ncu_csv.to_base_unit("1", "KiByte") == 1024
    assert ncu_csv.to_base_unit("222.02", "usecond") == pytest.approx(222_020)
    assert ncu_csv.to_base_unit("3", "msecond") == 3e6
    with pytest.raises(ncu_csv.NcuParseError, match="unknown unit 'furlong'"):
        ncu_csv.to_base_unit("1", "furlong", "dram__bytes_read.sum")
    with pytest.raises(ncu_csv.NcuParseError, match="not a number"):
        ncu_csv.to_base_unit("lots", "byte")


def test_output_without_a_table_or_with_a_broken_header():
    assert ncu_csv.parse("==PROF== Connected to process 1\nhello\n==PROF== Disconnected\n") == []
    with pytest.raises(ncu_csv.NcuParseError, match="Metric Value"):
        ncu_csv.parse('"ID","Kernel Name","Metric Name","Metric Unit"\n')


def test_short_kernel_names():
    name = ncu_csv.parse(SAMPLE)[0].name
    assert ncu_csv.short_kernel_name(name) == (
        "vectorized_elementwise_kernel<8, CUDAFunctor_add<c10::BFloat16>, std::array<char *, 3>>")
    assert ncu_csv.short_kernel_name("triton_poi_fused_add_0") == "triton_poi_fused_add_0"
    assert len(ncu_csv.short_kernel_name("k" * 500)) == 100


# ------------------------------------------------------------------ amplification and the paper
def test_summary_sums_per_kernel_and_divides_by_the_analytic_bytes():
    fields = traffic.summarise(ncu_csv.parse(SAMPLE), cost.Cost(read=1_000_000_000, write=2_000_000_000,
                                                                flops=0))
    m = fields["bytes_measured"]
    assert (m["read"], m["write"], m["l2"]) == (SAMPLE_READ, SAMPLE_WRITE, SAMPLE_L2)
    assert fields["kernel_count"] == len(m["per_kernel"]) == 8
    assert fields["amplification"] == pytest.approx((SAMPLE_READ + SAMPLE_WRITE) / 3e9)
    assert traffic.amplification(10, 0) is None


def test_recorded_bf16_add_is_within_15_percent_of_the_residual_floor():
    """The sample's first kernel is x + f on bf16 [16384, 4096]: MATH.md's residual site."""
    floor = cost.case_cost("residual", "site", "fwd", 1, 4096, 16384, "bf16")
    assert (floor.read, floor.write) == (2 * 4096 * 2 * 16384, 4096 * 2 * 16384)
    fields = traffic.summarise(ncu_csv.parse(SAMPLE)[:1], floor)
    assert fields["bytes_measured"]["read"] / floor.read == pytest.approx(1.0, abs=0.001)
    # Writes still in L2 at the kernel's end are written back after it: a lower bound.
    assert 0.8 < fields["bytes_measured"]["write"] / floor.write < 1.0
    assert fields["amplification"] == pytest.approx(0.96, abs=0.01)


def test_paper_figures_per_token():
    n, C = 4, 4096
    hc = paper_figure("hc", "site", "fwd", n, C, 1, "bf16")
    assert (hc.read, hc.write) == ((5 * n + 1) * C * 2 + (n * n + 2 * n) * 4,
                                   (3 * n + 1) * C * 2 + (n * n + 2 * n) * 4)
    assert hc.read == 21 * C * 2 + 96
    res = paper_figure("residual", "site", "fwd", 1, C, 10, "bf16")
    assert (res.read, res.write) == (2 * C * 2 * 10, C * 2 * 10)
    post = paper_figure("mhc", "post", "fwd", n, C, 1, "fp32")
    assert (post.read, post.write) == ((n + 1) * C * 4, n * C * 4)
    hc_post = paper_figure("hc", "post", "fwd", n, C, 1, "bf16")
    assert (hc_post.read, hc_post.write) == ((3 * n + 1) * C * 2 + (n + n * n) * 4, 3 * n * C * 2)
    assert paper_figure("mhc", "site", "fwd", n, C, 1, "bf16") is None      # MATH.md floor only
    assert paper_figure("hc", "site", "fwd+bwd", n, C, 1, "bf16") is None   # the paper is forward only
    # The fused post floor of MATH.md is the paper's figure plus the coefficients it reads.
    floor = cost.case_cost("mhc", "post", "fwd", n, C, 1, "bf16")
    assert floor.read - post.read // 2 == (n + n * n) * 4 and floor.write == n * C * 2


# ------------------------------------------------------------------ the profiler process
def _fake_ncu(tmp_path, body: str) -> str:
    path = tmp_path / "ncu"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _case(**kw):
    return Case(**{"method": "residual", "C": 64, "T": 8, "n": 1, "sinkhorn_iters": None,
                   "traffic": True, **kw})


def test_command_carries_the_whole_case_and_the_options_numbers_depend_on():
    case = _case(seed=7, timeout_s=30)
    cmd = traffic.command("/x/ncu", case, python="/venv/python")
    assert cmd[:5] == ["/x/ncu", "--nvtx", "--nvtx-include", "hcbench/", "--metrics"]
    assert cmd[5].split(",") == list(traffic.METRICS)
    joined = " ".join(cmd)
    for opt in ("--csv", "--print-units base", "--clock-control none", "--cache-control all"):
        assert opt in joined
    assert cmd[-4:-1] == ["/venv/python", "-m", "suite.run.traffic_probe"]
    assert Case(**json.loads(cmd[-1])) == case
    assert "/" not in traffic.NVTX_RANGE


def test_profiler_output_read_through_a_stand_in_ncu(tmp_path, monkeypatch):
    ncu = _fake_ncu(tmp_path, f"cat '{DATA / 'ncu_sample.txt'}'\n")
    monkeypatch.setattr(traffic.torch.cuda, "is_available", lambda: True)
    fields = traffic.measure(_case(), cost.Cost(1_500_000_000, 1_500_000_000, 0), timeout_s=30, ncu=ncu)
    assert fields["traffic_reason"] is None
    assert fields["bytes_measured"]["read"] == SAMPLE_READ
    assert fields["kernel_count"] == 8
    assert fields["amplification"] == pytest.approx((SAMPLE_READ + SAMPLE_WRITE) / 3e9)
    assert fields["traffic_tool"]["ncu"] == "2025.3.1.0"       # `ncu --version` of the stand-in


@pytest.mark.parametrize("script, reason", [
    (('echo "==PROF== Connected to process 9"\n'
      'echo "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU '
      'Performance Counters on the target device 0."\nexit 1\n'), "ERR_NVGPUCTRPERM"),
    ('echo "==ERROR== Profiling is not supported on this device"\nexit 1\n',
     "ncu: Profiling is not supported on this device"),
    ('echo "hcbench-probe: ok"\necho "==WARNING== No kernels were profiled."\n',
     "profiled no kernel inside the NVTX range"),
    (f'echo "{traffic.PROBE_ERROR} RuntimeError: CUDA out of memory"\nexit 1\n',
     "profiled run failed: RuntimeError: CUDA out of memory"),
    ('echo "segfault"\nexit 139\n', "ncu exited with status 139: segfault"),
    (f"cat '{DATA / 'ncu_sample.txt'}'\necho '==ERROR== Failed to profile \"k\" in process 9'\n",
     'ncu reported an error: Failed to profile "k" in process 9'),
])
def test_profiler_failures_become_one_line_reasons(tmp_path, monkeypatch, script, reason):
    ncu = _fake_ncu(tmp_path, script)
    monkeypatch.setattr(traffic.torch.cuda, "is_available", lambda: True)
    fields = traffic.measure(_case(), cost.Cost(1, 1, 0), timeout_s=30, ncu=ncu)
    assert reason in fields["traffic_reason"]
    assert fields["bytes_measured"] is None and fields["amplification"] is None


def test_a_hung_profiler_is_killed_with_its_children(tmp_path):
    ncu = _fake_ncu(tmp_path, "sleep 30 &\nwait\n")
    t0 = time.perf_counter()
    with pytest.raises(traffic.TrafficUnavailable, match="timed out after 1 s"):
        traffic.run_profiler([ncu], timeout_s=1)
    assert time.perf_counter() - t0 < 10


def test_without_gpu_or_ncu_the_case_keeps_its_analytic_bytes_and_says_why(monkeypatch):
    floor = cost.Cost(1, 1, 0)
    assert "CUDA GPU only" in traffic.measure(_case(device="cpu"), floor)["traffic_reason"]
    monkeypatch.setattr(traffic.torch.cuda, "is_available", lambda: False)
    assert traffic.measure(_case(device="cuda"), floor)["traffic_reason"] == "no CUDA GPU on this machine"
    monkeypatch.setattr(traffic.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(traffic, "find_ncu", lambda explicit=None: None)
    reason = traffic.measure(_case(device="cuda"), floor)["traffic_reason"]
    assert reason.startswith("Nsight Compute (ncu) not found")


def test_find_ncu_prefers_the_environment_variable(tmp_path, monkeypatch):
    ncu = _fake_ncu(tmp_path, "exit 0\n")
    monkeypatch.setenv("HCBENCH_NCU", ncu)
    assert traffic.find_ncu() == ncu
    assert traffic.find_ncu(str(tmp_path / "missing")) == ncu


# ------------------------------------------------------------------ the probe
def test_probe_runs_a_case_and_reports_errors_in_one_line(capsys):
    case = _case(device="cpu", dtype="fp32")
    assert traffic_probe.main([json.dumps(case.to_dict())]) == 0
    assert "hcbench-probe: ok" in capsys.readouterr().out
    assert traffic_probe.main([json.dumps({**case.to_dict(), "backend": "nope"})]) == 1
    assert capsys.readouterr().out.startswith(f"{traffic.PROBE_ERROR} KeyError")


def test_probe_runs_the_backward_on_its_own_thread(monkeypatch, capsys):
    """fwd+bwd: the probe runs forward and backward, every backward node on the thread that
    opened the NVTX range. (A CPU backward uses the calling thread anyway; on a GPU it is the
    probe's multithreading switch that keeps it there.)"""
    import threading
    seen = []
    real_run = traffic_probe.workload.run

    def run(ops, case, inputs):
        hook = lambda grad: seen.append(threading.get_ident())     # noqa: E731
        inputs["x"].register_hook(hook)
        return real_run(ops, case, inputs)

    monkeypatch.setattr(traffic_probe.workload, "run", run)
    case = _case(device="cpu", dtype="fp32", mode="fwd+bwd", method="mhc", n=2, sinkhorn_iters=3)
    assert traffic_probe.main([json.dumps(case.to_dict())]) == 0, capsys.readouterr().out
    assert seen and set(seen) == {threading.get_ident()}


def test_probe_runs_as_a_module_from_the_repository_root():
    case = _case(device="cpu", dtype="fp32", method="mhc", n=2, sinkhorn_iters=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "suite.run.traffic_probe", json.dumps(case.to_dict())],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hcbench-probe: ok, mhc/torch n=2" in proc.stdout


# ------------------------------------------------------------------ runner, CLI and report
def test_traffic_flag_on_a_cpu_run_records_why_and_the_report_has_the_section(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: t\ndefaults: {T: 16, C: 8, n: 2, dtype: fp32, device: cpu, warmup_ms: 1, "
                    "rep_ms: 1}\ninclude:\n  - {method: residual}\n  - {method: mhc, op: post}\n")
    out = tmp_path / "out"
    assert cli.main(["run", str(path), "--out", str(out), "--traffic"]) == 0
    run = next(p for p in out.iterdir() if p.is_dir())
    records = read_records(run)
    assert len(records) == 2
    for r in records:
        assert r["status"] == "ok" and r["case"]["traffic"] is True
        assert r["bytes"]["read"] > 0                        # analytic bytes kept
        assert r["bytes_measured"] is None and "CUDA GPU only" in r["traffic_reason"]
        assert r["telemetry"] is None and isinstance(r["flags"], list)
    report = (run / "report.md").read_text()
    assert "## Memory traffic" in report and "sec. 4.3.1 fused F_post,res" in report
    # traffic is run-control: the case ids equal those of the same run without it
    assert cli.main(["run", str(path), "--out", str(tmp_path / "plain")]) == 0
    plain = read_records(next(p for p in (tmp_path / "plain").iterdir() if p.is_dir()))
    assert {r["case_id"] for r in plain} == {r["case_id"] for r in records}


def test_report_rows_show_measured_analytic_paper_and_ratios():
    case = _case(method="hc", n=4, C=4096, T=16384, sinkhorn_iters=None, backend="torch").to_dict()
    floor = cost.case_cost("hc", "site", "fwd", 4, 4096, 16384, "bf16")
    paper = paper_figure("hc", "site", "fwd", 4, 4096, 16384, "bf16")
    measured_read, measured_write = 3 * paper.read, 2 * paper.write
    ok = {"case_id": "a", "case": case, "status": "ok", "bytes": {"read": floor.read, "write": floor.write},
          "bytes_measured": {"read": measured_read, "write": measured_write, "l2": 10**10,
                             "per_kernel": []},
          "kernel_count": 40, "amplification": (measured_read + measured_write) / floor.total,
          "traffic_reason": None}
    why = {**ok, "case_id": "b", "case": {**case, "backend": "triton"}, "bytes_measured": None,
           "kernel_count": None, "amplification": None, "traffic_reason": "ncu not found"}
    rows = {row[1]: row for row in traffic_rows([why, ok])}
    row = rows["torch"]
    assert row[7] == f"{measured_read / 1e9:.4g} / {measured_write / 1e9:.4g}"
    assert row[9] == "40"
    assert row[10] == f"{ok['amplification']:.2f}"
    assert row[12] == f"{(measured_read + measured_write) / paper.total:.2f}"
    assert row[13].startswith("Table 2 HC total")
    assert rows["triton"][7] == "" and rows["triton"][-1] == "ncu not found"
    assert any("| hc | torch | site |" in ln for ln in traffic_markdown([ok]))
    plain = {k: v for k, v in ok.items() if k not in ("bytes_measured", "traffic_reason")}
    assert traffic_markdown([{**plain, "case": {**case, "traffic": False}}]) == []
