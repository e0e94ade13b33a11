"""The run table that `harness.py run` and `report` print fits the console: from 120 columns on, no
number and no label is cut to `…`; columns are dropped or merged by priority instead, and report.md
keeps them all."""
import io
import json
import random
import re
from pathlib import Path

import pytest
from rich.console import Console

from suite.core.scenario import Case, normalise
from suite.report.tables import markdown, print_run, rows
from suite.store.runs import read_records

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = sorted((ROOT / "tests" / "data" / "publish").glob("run-*"))


def _timing(rng: random.Random, median: float) -> dict:
    return {"median": median, "p10": median * (1 - rng.uniform(0.001, 0.09)),
            "p90": median * (1 + rng.uniform(0.001, 0.09)), "cv": rng.uniform(0.001, 0.2), "n": 40}


def _record(case: Case, rng: random.Random, median: float | None, status: str = "ok", **extra) -> dict:
    case = normalise(case)
    r = {"schema": "hcbench.record/2", "case_id": case.case_id, "case": case.to_dict(),
         "scenario": "long", "status": status, "reason": None if status == "ok" else "stopped here",
         "time_ms": None, "gbps": None, "pct_of_copy": None, "peak_mem_bytes": None}
    if status == "ok":
        r.update(time_ms=_timing(rng, median), gbps=rng.uniform(1, 99999),
                 pct_of_copy=rng.uniform(0.1, 99.9), peak_mem_bytes=rng.uniform(1, 900000) * 2**20)
    r.update(extra)
    return r


def long_label_run(tmp_path: Path) -> Path:
    """Every column varies and the labels are the longest the suite writes: whole-model scope with
    recompute blocks, pipeline and data parallel with every overlap technique, tilelang, numbers of
    every magnitude."""
    rng = random.Random(3)
    recs = []
    for dev, dtype in (("cuda", "bf16"), ("cpu", "fp32")):
        for method, n in (("residual", 1), ("hc", 4), ("mhc", 4)):
            for backend in ("torch", "compile", "triton", "tilelang"):
                recs.append(_record(Case(method=method, backend=backend, n=n, C=16384, T=131072,
                                         dtype=dtype, device=dev, mode="fwd+bwd", sinkhorn_iters=20),
                                    rng, rng.choice([0.000012345, 1234.5678, 98765.4321, 0.3141])))
    model = dict(C=7168, T=65536, scope="model", layers=61, heads=128, seq=4096, mode="fwd+bwd")
    recs.append(_record(Case(method="mhc", n=4, recompute="mhc", L_r=12, **model), rng, 123456.789))
    recs.append(_record(Case(method="hc", n=4, recompute="full", L_r=8, **model), rng, None,
                        status="failed"))
    pipe = dict(C=4096, T=8192, scope="model", layers=48, heads=32, seq=4096, mode="fwd+bwd",
                gpus=8, microbatches=16, overlap="stream+priority+early_recompute")
    dist = {"t_step_ms": 412.3, "t_compute_ms": 400.1, "t_comm_ms": 30.2, "exposed_comm_ms": 12.2,
            "overlap_efficiency": 0.6, "bytes_per_step": 2**30, "algbw_gbps": 80.0,
            "link": "NVLink x18"}
    recs.append(_record(Case(method="mhc", n=4, parallel="pipeline", **pipe), rng, 412.3, **dist))
    recs.append(_record(Case(method="residual", n=1, parallel="data", **pipe), rng, 398.76, **dist))
    run = tmp_path / "20991231T235959Z-a-long-named-gpu-node-with-a-long-label"
    run.mkdir()
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "env.json").write_text(json.dumps({
        "gpus": [{"name": "NVIDIA H100 80GB HBM3 with a long marketing name", "sms": 132}],
        "copy_rate": {"cuda": {"gbps": 3012.0}, "cpu": {"gbps": 41.0}},
        "cpu": {"model": "x"}, "versions": {}}))
    return run


def _main_table(run: Path, width: int) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    print_run(run, console)
    lines = console.export_text().splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("└"))
    return lines[:end + 1]


def _runs(tmp_path: Path) -> list[Path]:
    return FIXTURES + [long_label_run(tmp_path)]


@pytest.mark.parametrize("width", [120, 150, 180])
def test_the_table_fits_the_console_and_no_value_is_cut(tmp_path, width):
    for run in _runs(tmp_path):
        table = _main_table(run, width)
        text = "\n".join(table)
        assert max(len(line) for line in table) <= width, (run.name, width)
        assert "…" not in text, f"{run.name} at {width} columns:\n{text}"
        cells = set(re.findall(r"[^\s│┃]+", text))
        for r in read_records(run):
            if r["status"] == "ok":       # every median, whole, in one cell
                assert f"{r['time_ms']['median']:.4g}" in cells, (run.name, width, r["case_id"])


def test_a_wide_console_and_report_md_keep_every_column(tmp_path):
    for run in _runs(tmp_path):
        header, body = rows(read_records(run))
        table = _main_table(run, 400)
        assert all(h in table[2] for h in header), (run.name, table[:4])
        md = markdown(run)
        assert "| " + " | ".join(header) + " |" in md
        assert all("| " + " | ".join(row) + " |" in md for row in body)


def test_a_narrow_table_says_what_it_left_out(tmp_path):
    run = long_label_run(tmp_path)
    console = Console(width=120, record=True, file=io.StringIO())
    print_run(run, console)
    out = " ".join(console.export_text().split())
    assert "report.md" in out and "cv %" in out and "peak MiB" in out


@pytest.mark.parametrize("width", [120, 150])
def test_the_distributed_tables_fit_the_terminal_without_cutting_a_number(width):
    """The committed one-GPU pipeline run: its overlap table has 20 columns, which rich would
    squeeze into `…` cells at 120 columns."""
    import io
    from suite.report import distributed
    from suite.store.runs import read_records
    records = read_records(Path(__file__).resolve().parent.parent / "results"
                           / "20261123T220800Z-vm-h100-80gb-hbm3")
    console = Console(width=width, file=io.StringIO(), record=True)
    distributed.print_tables(records, console)
    text = console.export_text()
    assert "overlap" in text and "step ms" in text
    assert all(len(line) <= width for line in text.splitlines()), max(map(len, text.splitlines()))
    assert "…" not in text
