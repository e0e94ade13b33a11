"""docs/results.md's index of committed run folders is what `harness.py results-doc` makes from
them: the page cannot drift from the records."""
import json
from pathlib import Path

from suite import cli
from suite.report import results_index

ROOT = Path(__file__).resolve().parent.parent


def test_docs_results_index_is_up_to_date(capsys):
    assert cli.main(["results-doc", "--check"]) == 0, capsys.readouterr().err


def test_index_rows_counts_and_reference(tmp_path):
    results = tmp_path / "results"
    for name, scenario, statuses in (("20260101T000000Z-a", "kernels", ["ok", "failed"]),
                                     ("20260102T000000Z-a", "kernels", ["ok", "ok"])):
        run = results / name
        run.mkdir(parents=True)
        (run / "env.json").write_text(json.dumps({"gpus": [{"name": "GPU X"}],
                                                  "copy_rate": {"cuda": {"gbps": 3000.0}}}))
        (run / "records.jsonl").write_text("".join(
            json.dumps({"scenario": scenario, "status": s, "started_utc": name[:8], "case_id": f"c{i}",
                        "case": {}}) + "\n"
            for i, s in enumerate(statuses)))
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nIntro.\n\n## More\n")
    assert cli.main(["results-doc", "--results", str(results), "--doc", str(doc), "--readme", str(tmp_path / "no-readme.md")]) == 0
    text = doc.read_text()
    assert results_index.BEGIN in text and text.index("Intro.") < text.index("## Committed runs")
    rows = [line for line in text.splitlines() if line.startswith("| `results/")]
    assert rows[0].endswith("| 1 / 0 / 1 of 2 | 20260101 |  |")
    assert rows[1].endswith("| 2 / 0 / 0 of 2 | 20260102 | yes |")
    assert cli.main(["results-doc", "--results", str(results), "--doc", str(doc), "--readme", str(tmp_path / "no-readme.md"), "--check"]) == 0
    doc.write_text(text.replace("2 / 0 / 0", "9 / 0 / 0"))
    assert cli.main(["results-doc", "--results", str(results), "--doc", str(doc), "--readme", str(tmp_path / "no-readme.md"), "--check"]) == 1


def _site_record(method, backend, C, median, pct, status="ok"):
    return {"case": {"scope": "site", "method": method, "op": "site", "mode": "fwd", "C": C, "n": 4,
                     "backend": backend}, "status": status, "case_id": f"{method}{backend}{C}",
            "time_ms": {"median": median}, "pct_of_copy": pct}


def test_a_table_block_is_written_from_its_run_and_checked(tmp_path, capsys):
    results = tmp_path / "results"
    run = results / "20260101T000000Z-a"
    run.mkdir(parents=True)
    (run / "env.json").write_text(json.dumps({"gpus": [{"name": "GPU X"}],
                                              "copy_rate": {"cuda": {"gbps": 3000.0}}}))
    recs = [_site_record("mhc", "triton", 4096, 0.9, 70.0), _site_record("mhc", "tilelang", 4096, 0.87, 72.4),
            _site_record("mhc", "torch", 4096, 10.0, 6.0, status="failed")]
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    doc = tmp_path / "results.md"
    block = "<!-- BEGIN table kernels results/20260101T000000Z-a -->\nstale\n<!-- END table -->"
    doc.write_text(f"# Results\n\n## Kernels\n\n{block}\n")
    assert cli.main(["results-doc", "--results", str(results), "--doc", str(doc), "--readme", str(tmp_path / "no-readme.md"), "--check"]) == 1
    assert cli.main(["results-doc", "--results", str(results), "--doc", str(doc), "--readme", str(tmp_path / "no-readme.md")]) == 0
    text = doc.read_text()
    assert "stale" not in text
    assert "| mhc | site | fwd | 4096 | 4 | failed | 0.900 (70%) | 0.870 (72%) | 0.97 |" in text
    assert cli.main(["results-doc", "--results", str(results), "--doc", str(doc), "--readme", str(tmp_path / "no-readme.md"), "--check"]) == 0


def test_a_table_block_naming_a_missing_run_or_kind_is_bad_input(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    doc = tmp_path / "results.md"
    for block, want in (("kernels results/nope", "no records.jsonl"), ("bogus results/nope", "bogus")):
        doc.write_text(f"# R\n\n<!-- BEGIN table {block} -->\n<!-- END table -->\n")
        before = doc.read_text()
        assert cli.main(["results-doc", "--results", str(results), "--doc", str(doc), "--readme", str(tmp_path / "no-readme.md")]) == 2
        assert want in capsys.readouterr().err and doc.read_text() == before


def test_baseline_table_pivots_backends_per_width_and_names_missing_cells():
    from suite.report import results_tables
    def rec(method, n, C, backend, median=None, reason=None):
        ok = median is not None
        return {"case": {"method": method, "n": n, "C": C, "backend": backend, "op": "site",
                         "mode": "fwd"}, "status": "ok" if ok else "failed",
                "time_ms": {"median": median} if ok else None, "reason": reason}
    lines = results_tables.baseline_table(
        [rec("mhc", 4, 2560, "torch", 6.84), rec("mhc", 4, 2560, "compile", 3.031),
         rec("mhc", 1, 2560, "torch", 4.1), rec("mhc", 1, 2560, "compile", reason="CaseTimeout: timed out after 60 s"),
         rec("mhc", 1, 4096, "torch", 5.21)], {"gpus": [{"name": "GPU X"}]})
    assert lines[:4] == ["| method | n | C = 2560 | C = 4096 |", "|---|---|---|---|",
                         "| mhc | 1 | 4.10 / timed out | 5.21 / not run |",
                         "| mhc | 4 | 6.84 / 3.03 | not run / not run |"]
    assert lines[-1].endswith("(torch / compile); GPU X.")


def test_chain_table_gives_per_site_time_and_te_over_triton():
    from suite.report import results_tables
    def rec(backend, n, mode, chain_ms, pct, status="ok"):
        return {"case": {"method": "mhc", "op": "chain", "sites": 4, "n": n, "C": 4096, "mode": mode,
                         "backend": backend}, "status": status,
                "time_ms": {"median": chain_ms}, "per_site_ms": chain_ms / 4, "pct_of_copy": pct}
    lines = results_tables.chain_table(
        [rec("triton", 4, "fwd", 2.8, 90.2), rec("te", 4, "fwd", 3.5, 72.0),
         rec("triton", 4, "fwd+bwd", 8.0, 70.0), rec("te", 4, "fwd+bwd", 0, 0, status="failed"),
         rec("triton", 2, "fwd", 1.6, 88.0)], {"gpus": [{"name": "GPU X"}]})
    assert lines[:2] == ["| n | C | mode | triton | te | te / triton |", "|---|---|---|---|---|---|"]
    assert lines[2] == "| 2 | 4096 | fwd | 0.400 (88%) | - | - |"
    assert lines[3] == "| 4 | 4096 | fwd | 0.700 (90%) | 0.875 (72%) | 1.25 |"
    assert lines[4] == "| 4 | 4096 | fwd+bwd | 2.000 (70%) | failed | - |"
    assert "a chain of 4 sites" in lines[-1] and lines[-1].endswith("GPU X.")


def _stability_record(method, init, lr, gain_end, diverged=None):
    return {"scenario": "stability", "status": "ok", "case_id": f"{method}{init}{lr}",
            "case": {"scope": "stability", "method": method, "init": init, "lr": lr, "device": "cuda",
                     "family": "dense", "C": 512, "layers": 30, "T": 8192, "backend": "triton"},
            "stability": {"max_gain": {"init": {"forward": 1.0}, "end": {"forward": gain_end}},
                          "steps_run": 2000, "diverged_at": diverged}}


def _traffic_record(method, C, read, write, backend="unfused"):
    return {"scenario": "traffic", "status": "ok", "case_id": f"{method}{C}{backend}", "bytes_measured": {"read": read, "write": write},
            "case": {"method": method, "backend": backend, "op": "site", "mode": "fwd", "n": 4,
                     "C": C, "T": 1000, "dtype": "bf16"}}


def test_verdict_has_a_row_per_claim_from_the_runs_and_names_what_is_not_measured():
    from suite.analysis import paper_traffic
    from suite.report import verdict
    env = {"gpus": [{"name": "GPU X"}]}
    stab = [_stability_record("hc", "paper", 1e-3, 12.5), _stability_record("hc", "paper", 1e-2, 40.0, diverged=900),
            _stability_record("mhc", "paper", 1e-3, 1.0), _stability_record("mhc", "identity", 1e-3, 1.31),
            _stability_record("residual", "paper", 1e-3, 1.0)]
    fig = paper_traffic.paper_figure("hc", "site", "fwd", 4, 2560, 1000, "bf16")
    traffic = [_traffic_record("hc", 2560, 2 * fig.read, fig.write),
               _traffic_record("hc", 2560, 1, 1, backend="torch")]       # the fp32 reference: no row
    lines = verdict.table([("results/s", stab, env), ("results/t", traffic, env)])
    assert lines[0] == "| claim | paper | ours | setup difference that matters |"
    rows = lines[2:]
    assert rows[0].startswith("| mHC training overhead | 6.7% | not measured yet")
    assert "| HC composite gain" in rows[1] and "12.5 to 40 over lr 0.001, 0.01; 1 run(s) diverged" in rows[1]
    assert "b = 0: 1; identity-leaning b_res: 1.31" in rows[2] and "at most about 1.6" in rows[2]
    assert "| Table 2 memory access, HC site, C = 2560" in rows[3]
    assert f"{(2 * fig.read + fig.write) / fig.total:.2f}x the paper's (read 2.00x, write 1.00x)" in rows[3]
    assert "(`results/t`)" in rows[3] and len(rows) == 4


def test_verdict_block_joins_several_runs_and_refuses_a_run_that_makes_no_row(tmp_path):
    import pytest
    from suite.report import results_tables
    for name, recs in (("s", [_stability_record("hc", "paper", 1e-3, 3.0)]),
                       ("k", [dict(_traffic_record("hc", 2560, 1, 1), scenario="kernels")])):
        run = tmp_path / "results" / name
        run.mkdir(parents=True)
        (run / "env.json").write_text(json.dumps({"gpus": [{"name": "GPU X"}]}))
        (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = results_tables.render("<!-- BEGIN table verdict results/s -->\n<!-- END table -->", tmp_path)
    assert "HC composite gain" in text and "not measured yet" in text
    with pytest.raises(results_tables.TableError, match="kernels"):
        results_tables.render("<!-- BEGIN table verdict results/s,results/k -->\n<!-- END table -->", tmp_path)
