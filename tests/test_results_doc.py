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
            json.dumps({"scenario": scenario, "status": s, "started_utc": name[:8]}) + "\n"
            for s in statuses))
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nIntro.\n\n## More\n")
    assert cli.main(["results-doc", "--results", str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert results_index.BEGIN in text and text.index("Intro.") < text.index("## Committed runs")
    rows = [line for line in text.splitlines() if line.startswith("| `results/")]
    assert rows[0].endswith("| 1 / 0 / 1 of 2 | 20260101 |  |")
    assert rows[1].endswith("| 2 / 0 / 0 of 2 | 20260102 | yes |")
    assert cli.main(["results-doc", "--results", str(results), "--doc", str(doc), "--check"]) == 0
    doc.write_text(text.replace("2 / 0 / 0", "9 / 0 / 0"))
    assert cli.main(["results-doc", "--results", str(results), "--doc", str(doc), "--check"]) == 1
