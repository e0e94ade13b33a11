"""Distributed cases on CPU: gloo process groups started by torchrun on 127.0.0.1, plus the
launch, validation and schedule logic in one process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from suite.core.scenario import ScenarioError, parse
from suite.workloads.dist import launch, pipeline as pp

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"device": "cpu", "dtype": "fp32", "n": 4, "C": 32, "T": 64, "warmup_ms": 1,
         "rep_ms": 2, "backend": "torch"}
MODEL = {"scope": "model", "mode": "fwd+bwd", "heads": 2, "seq": 8, "vocab": 64}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list, tmp_path: Path, env_extra=None, timeout=240):
    env = {**os.environ, "HCBENCH_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "--max_restarts=0"] + args
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _scenario(tmp_path: Path, include: list, name="dist-ci") -> Path:
    import yaml
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "defaults": SMALL, "include": include}))
    return path


def _records(out: Path) -> list:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, f"one run folder expected (rank 0 only), got {runs}"
    lines = (runs[0] / "records.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


# ---------------------------------------------------------------- in one process
def test_world_from_torchrun_slurm_and_single():
    w = launch.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                         "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (w.rank, w.size, w.local_rank, w.master_addr, w.source) == (3, 8, 1, "n1", "torchrun")
    w = launch.from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                         "SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_JOB_ID": "4242"})
    assert (w.rank, w.size, w.local_rank, w.master_addr) == (5, 16, 5, "gpu07")
    assert w.master_port == 20000 + 4242 and w.source == "slurm"
    assert launch.first_host("a1,b2") == "a1"
    assert launch.from_env({}).size == 1


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[07-09,12],cpu1", "gpu07"), ("sn[10-11]-ib", "sn10-ib"), ("r[1-2]-n[3-4]", "r1-n3"),
    ("a1,b2", "a1"), ("node5", "node5"), ("x[3],y[1-2]", "x3")])
def test_slurm_node_lists_parse_to_their_first_host(nodelist, first):
    assert launch.parse_first_host(nodelist) == first


@pytest.mark.parametrize("bad", ["", "[", "a[1-2", ",x", "a[[1]]"])
def test_a_broken_node_list_is_one_line(bad):
    with pytest.raises(ValueError, match="is not a node list"):
        launch.parse_first_host(bad)


def test_multicast_stays_off():
    env = {"NCCL_NVLS_ENABLE": "1"}
    launch.keep_multicast_off(env)
    assert env == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                   "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.parametrize("case, words", [
    ({"parallel": "ring"}, "parallel: 'ring' is not allowed; allowed: p2p | pipeline | data"),
    ({"parallel": "pipeline", **MODEL, "overlap": "stream+fast"}, "overlap: 'stream+fast'"),
    ({"parallel": "p2p", "gpus": 3}, "gpus: 3 is not allowed with parallel p2p"),
    ({"parallel": "pipeline", **MODEL, "layers": 2, "gpus": 4}, "gpus: 4 stages need"),
    ({"parallel": "pipeline", "scope": "site"}, "allowed: model"),
    ({"parallel": "data", **MODEL, "overlap": "stream"}, "allowed: none | priority"),
    ({"microbatches": 2}, "need parallel"),
])
def test_bad_parallel_fields_are_one_line(case, words):
    doc = {"name": "x", "defaults": {**SMALL, "method": "mhc"}, "include": [case]}
    with pytest.raises(ScenarioError) as err:
        parse(doc, "f.yaml")
    assert len(err.value.problems) == 1 and words in err.value.problems[0]
    assert err.value.problems[0].startswith("f.yaml:")


def test_overlap_normalised_and_ids_of_old_cases_unchanged():
    doc = {"name": "x", "defaults": {**SMALL, **MODEL, "parallel": "pipeline", "layers": 2},
           "include": [{"method": "residual", "overlap": "early_recompute+stream"},
                       {"method": "mhc", "recompute": "mhc", "overlap": "early_recompute+stream"}]}
    a, b = parse(doc, "f.yaml").cases
    assert a.overlap == "stream" and b.overlap == "stream+early_recompute"
    assert a.microbatches == 4
    plain = parse({"name": "y", "defaults": {**SMALL, "method": "mhc"}}, "g.yaml").cases[0]
    assert plain.parallel is None and "parallel" not in plain.label()
    # The id of a single-process case is the one it had before the distributed fields existed.
    import hashlib
    from dataclasses import asdict
    old = {k: v for k, v in asdict(plain).items() if k not in plain.RUN_CONTROL
           and k not in plain.PARALLEL_FIELDS + plain.CHAIN_FIELDS and not (k in plain.MODEL_FIELDS and v is None)}
    blob = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert plain.case_id == hashlib.sha1(blob.encode()).hexdigest()[:12]


def test_1f1b_schedule_and_layer_split():
    for P in (1, 2, 4):
        for s in range(P):
            order = pp.schedule(s, P, 6)
            assert sorted(order) == sorted([("F", i) for i in range(6)] +
                                           [("B", i) for i in range(6)])
            for kind, i in order:     # a backward only after its forward
                if kind == "B":
                    assert order.index(("F", i)) < order.index(("B", i))
            warm = next(k for k, (kind, _) in enumerate(order) if kind == "B")
            assert warm == min(P - s - 1, 6) + 1
    assert pp.split_layers(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]


# ---------------------------------------------------------------- across processes
def test_pipeline_loss_and_gradients_equal_one_process(tmp_path):
    out = tmp_path / "pc.json"
    res = _torchrun(4, ["tests/dist_pipeline_check.py", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {r["P"] for r in results} == {2, 4}
    for r in results:
        assert r["owned_once"], r
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), r
        errs = r["grad_errors"]
        assert all(e is not None and e < 1e-4 for e in errs.values()), r


def _check_ok_records(records, world):
    ok = [r for r in records if r["status"] == "ok"]
    assert not [r for r in records if r["status"] == "failed"], records
    for r in ok:
        assert r["world_size"] == world
        assert r["time_ms"]["median"] > 0 and r["gbps"] > 0
        if r["case"]["gpus"] == 1:
            assert r["standin"] and "stand-in" in r["link"]
        else:
            assert not r["standin"] and r["link"].startswith("gloo")
        if r["case"]["parallel"] != "p2p":
            assert r["t_compute_ms"] > 0 and r["t_comm_ms"] > 0
            assert "overlap_efficiency" in r and "exposed_comm_ms" in r
            assert len(r["per_rank_ms"]["step"]) == r["case"]["gpus"]
    return ok


def test_two_processes_end_to_end(tmp_path):
    scen = _scenario(tmp_path, [
        {"parallel": "p2p", "method": ["residual", "mhc"], "gpus": [1, 2, 4], "warmup_ms": 5},
        {"parallel": "pipeline", **MODEL, "method": "mhc", "layers": 2, "gpus": 1,
         "recompute": "mhc", "overlap": "stream+priority+early_recompute"},
        {"parallel": "pipeline", **MODEL, "method": "mhc", "layers": 2, "gpus": 2,
         "recompute": "mhc", "overlap": ["none", "stream+priority+early_recompute"]},
        {"parallel": "data", **MODEL, "method": "hc", "layers": 2, "gpus": 2},
    ])
    out = tmp_path / "runs"
    res = _torchrun(2, ["harness.py", "run", str(scen), "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = _records(out)
    ids = [r["case_id"] for r in records]
    assert len(ids) == len(set(ids)) == 10           # each case written once, by rank 0
    skipped = [r for r in records if r["status"] == "skipped"]
    assert len(skipped) == 2 and all("the world has 2" in r["reason"] for r in skipped)
    ok = _check_ok_records(records, 2)
    p2p = {(r["case"]["method"], r["case"]["gpus"]): r for r in ok if r["case"]["parallel"] == "p2p"}
    assert p2p[("mhc", 2)]["message_bytes"] == 4 * p2p[("residual", 2)]["message_bytes"]
    assert p2p[("mhc", 2)]["check"]["passed"]
    report = next(p for p in out.iterdir() if p.is_dir()) / "report.md"
    text = report.read_text()
    assert "## Many GPUs" in text and "| stand-in (H2D/D2H copies) |" in text
    assert text.count("| stand-in (H2D/D2H copies) |") == 3   # 2 p2p rows + 1 pipeline row


def test_four_processes_end_to_end_with_subgroups(tmp_path):
    scen = _scenario(tmp_path, [
        {"parallel": "p2p", "method": "mhc", "gpus": [2, 4]},
        {"parallel": "pipeline", **MODEL, "method": "mhc", "layers": 4, "gpus": [2, 4],
         "recompute": "mhc", "overlap": "stream+early_recompute"},
        {"parallel": "data", **MODEL, "method": "mhc", "layers": 2, "gpus": 4},
    ])
    out = tmp_path / "runs"
    res = _torchrun(4, ["harness.py", "run", str(scen), "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = _records(out)
    assert len(records) == 5
    ok = _check_ok_records(records, 4)
    assert len(ok) == 5
    data = next(r for r in ok if r["case"]["parallel"] == "data")
    assert data["replicas_agree"] and data["busbw_gbps"] == pytest.approx(
        data["algbw_gbps"] * 2 * 3 / 4)


def test_a_rank_that_dies_fails_the_case_and_keeps_finished_records(tmp_path):
    scen = _scenario(tmp_path, [{"parallel": "p2p", "method": "mhc", "gpus": 2,
                                 "C": [32, 48, 64]}])
    out = tmp_path / "runs"
    res = _torchrun(2, ["harness.py", "run", str(scen), "--out", str(out)], tmp_path,
                    env_extra={"HCBENCH_FAULT_EXIT": "1:1", "HCBENCH_DIST_TIMEOUT_S": "30"})
    assert res.returncode != 0
    records = {r["case"]["C"]: r for r in _records(out)}
    assert records[32]["status"] == "ok"
    assert records[48]["status"] == "failed"
    assert "rank" in records[48]["reason"] or "collective" in records[48]["reason"]
    assert records[64]["status"] == "failed" and records[64]["reason"].startswith("not run")


def test_a_hung_collective_ends_as_a_failed_case(tmp_path):
    scen = _scenario(tmp_path, [{"parallel": "p2p", "method": "mhc", "gpus": 2, "C": [32, 48]}])
    out = tmp_path / "runs"
    res = _torchrun(2, ["harness.py", "run", str(scen), "--out", str(out)], tmp_path,
                    env_extra={"HCBENCH_FAULT_EXIT": "1:0:hang", "HCBENCH_DIST_TIMEOUT_S": "8"},
                    timeout=120)
    assert res.returncode != 0
    records = {r["case"]["C"]: r for r in _records(out)}
    assert records[32]["status"] == "failed"
    assert "timed out" in records[32]["reason"] or "Timed out" in records[32]["reason"] \
        or "collective" in records[32]["reason"], records[32]["reason"]
    assert records[48]["reason"].startswith("not run")


def test_one_process_standins_and_a_case_past_its_timeout(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    from suite import cli
    scen = _scenario(tmp_path, [
        {"parallel": "p2p", "method": "mhc", "gpus": [1, 2]},
        {"parallel": "pipeline", **MODEL, "method": "hc", "layers": 2, "gpus": 1,
         "timeout_s": 0.001},
        {"parallel": "pipeline", **MODEL, "method": "hc", "layers": 2, "gpus": 1, "C": 48},
    ])
    out = tmp_path / "runs"
    assert cli.main(["run", str(scen), "--out", str(out)]) == cli.EXIT_FAILED
    records = {(r["case"]["parallel"], r["case"]["C"], r["case"]["gpus"]): r
               for r in _records(out)}
    assert records[("p2p", 32, 1)]["status"] == "ok" and records[("p2p", 32, 1)]["standin"]
    assert "the world has 1" in records[("p2p", 32, 2)]["reason"]
    assert "timed out" in records[("pipeline", 32, 1)]["reason"]
    assert records[("pipeline", 48, 1)]["status"] == "ok"
