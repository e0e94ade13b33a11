"""The dashboard's stability pages, built from the CPU cases of scenarios/stability.yaml (run once
through the command line): gains over depth with the paper's figures, loss with spikes and
divergence marked, gradient norm, the report's table; long curves thinned for drawing. And
stand-in records marked wherever the dashboard shows them."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from suite import cli
from suite.publish import dashboard, stability_plots, svgplot
from suite.publish.published import Run, load_run_dir
from suite.report import stability as stability_report
from suite.report.distributed import STANDIN_MARK, STANDIN_NOTE
from tests.conftest import ROOT
from tests.test_dashboard_site import (_broken_links, _case, _check_layout, _gpu_env, _rec,
                                       _sections, _stamp, _text)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("stability")
    assert cli.main(["run", str(ROOT / "scenarios/stability.yaml"), "--only", "device=cpu",
                     "--out", str(out)]) == 0
    (folder,) = [d for d in out.iterdir() if d.is_dir()]
    return load_run_dir(folder)


def _page(site: Path, run: Run) -> str:
    return (site / dashboard.stability_href(run)).read_text()


def _svgs(html: str) -> list[str]:
    return re.findall(r'<svg class="plot".*?</svg>', html, re.DOTALL)


def _end_labels(svg: str) -> list[str]:
    """The full names of a plot's lines (each end label's tooltip)."""
    return re.findall(r'<text class="end"[^>]*>.*?<title>(.*?)</title>', svg, re.DOTALL)


def _with_spike_and_divergence(run: Run) -> Run:
    """The run with HC's record made to spike at step 80 and diverge at step 100."""
    recs = copy.deepcopy(run.records)
    hc = next(r for r in recs if r["case"]["method"] == "hc")
    st = hc["stability"]
    st["loss"] = [3.0] * 80 + [9.0] + [3.0] * 19 + [None]
    st["grad_norm"] = [1.0] * 100 + [None]
    st.update(spike_steps=[80, 100], spikes=2, diverged_at=100, steps_run=101)
    return Run("spiky", run.env, recs)


def test_the_stability_page_draws_gains_loss_and_gradient_norm(cpu_run, tmp_path):
    dashboard.build([cpu_run], tmp_path)
    assert 'href="stability.html">Stability</a>' in (tmp_path / "index.html").read_text()
    index = (tmp_path / "stability.html").read_text()
    assert f'href="{dashboard.stability_href(cpu_run)}"' in index and "CPU smoke run" in index
    run_page = (tmp_path / "runs" / f"{dashboard.slug(cpu_run.run_id)}.html").read_text()
    assert f'href="../{dashboard.stability_href(cpu_run)}"' in run_page
    page = _page(tmp_path, cpu_run)
    # one learning rate of the CPU cases: one set-up, its sections in order
    assert page.count('<section class="plot-gain">') == 1
    assert page.index("plot-gain") < page.index("plot-loss") < page.index("plot-gradnorm")
    (gain,) = _sections(page, "plot-gain")
    forward, backward = _svgs(gain)
    for svg in (forward, backward):
        names = _end_labels(svg)
        for variant in ("hc", "mhc paper init", "mhc identity init"):
            assert f"{variant} · init" in names and f"{variant} · end" in names, names
        assert not any(n.startswith("residual") for n in names)        # residual has no gains
        # the paper's figures, labelled with their source
        refs = re.findall(r'<line class="ref"', svg)
        assert len(refs) == 2
        assert "HC ~ 3000 (mHC paper)" in svg and "mHC &lt;= 1.6 (mHC paper)" in svg
        assert 'stroke-dasharray="2,3"' in svg                        # the init lines dotted
        assert svg.count("<polyline") <= svgplot.MAX_SERIES
    assert "arXiv 2512.24880v2" in gain                                # the caption cites the source
    (loss,) = _sections(page, "plot-loss")
    assert {"residual", "hc", "mhc paper init", "mhc identity init"} == set(_end_labels(loss))
    (curve,) = _svgs(loss)
    assert "spike at step" not in curve and "diverged at step" not in curve
    (grad,) = _sections(page, "plot-gradnorm")
    assert len(_end_labels(grad)) == 4 and "clip 1" in grad
    # the report's table, its rows as the terminal has them
    table = page[page.index("<h2>Table</h2>"):page.index('<section class="plot-gain">')]
    assert re.findall(r"<th[^>]*>([^<]*)</th>", table) == stability_report.HEADER
    body = [_text(tr).split() for tr in re.findall(r"<tr class=\"\">(.*?)</tr>", table, re.DOTALL)]
    assert body == [" ".join(row).split() for row in stability_report.rows(cpu_run.records)]
    assert _check_layout(tmp_path) == [] and _broken_links(tmp_path) == []


def test_spikes_and_a_divergence_are_marked(cpu_run, tmp_path):
    run = _with_spike_and_divergence(cpu_run)
    dashboard.build([run], tmp_path)
    page = _page(tmp_path, run)
    (loss,) = _sections(page, "plot-loss")
    assert "hc: spike at step 80, loss 9" in loss
    assert "spike at step 100" not in loss                 # not finite: the divergence marks it
    assert "diverged at step 100</text>" in loss and f'fill="{stability_plots.DIVERGED_FILL}"' in loss
    assert "hc spikes" not in _end_labels(loss)             # markers alone have no end label
    table = page[page.index("<h2>Table</h2>"):page.index('<section class="plot-gain">')]
    assert "<td class=\"\">100</td>" in table               # diverged at


def test_intermediate_measurements_are_drawn_where_they_fit(cpu_run):
    recs = stability_plots.curves(cpu_run.records)
    measured = len(recs[1]["stability"]["gains"])           # 0, 25, 50, 75, 100% of the steps
    three = stability_plots.gain_plots(sorted(recs, key=lambda r: r["case_id"]))
    assert [svg.count("<polyline") for svg in three] == [svgplot.MAX_SERIES] * 2
    two = stability_plots.gain_plots([r for r in recs if r["case"].get("init") != "identity"])
    assert [svg.count("<polyline") for svg in two] == [2 * measured] * 2


def test_long_curves_are_thinned_for_drawing_and_keep_their_spikes():
    values = [1.0 + (t % 7) * 0.01 for t in range(2000)]
    values[1234] = 50.0
    values[10] = None
    drawn = stability_plots.thin(values)
    assert len(drawn) <= stability_plots.MAX_POINTS
    assert (1234, 50.0) in drawn and all(t != 10 for t, _ in drawn)
    assert [t for t, _ in drawn] == sorted({t for t, _ in drawn})
    assert stability_plots.thin(values) == drawn
    assert stability_plots.thin(values[:300]) == [(t, v) for t, v in enumerate(values[:300])
                                                  if v is not None]


def test_a_run_without_stability_records_has_an_index_that_says_so(tmp_path):
    run = Run("plain", _gpu_env(), [_rec("c000", _case(0), 1.0, _stamp(0))])
    dashboard.build([run], tmp_path)
    assert "No published run has records of scope stability" in (tmp_path / "stability.html").read_text()
    assert not (tmp_path / "stability").exists()


# ---------------------------------------------------------------- stand-ins
def _standin_runs() -> list[Run]:
    """Two runs of a pipeline stand-in (one GPU) and of the same pipeline on 4 GPUs."""
    base = dict(method="mhc", backend="triton", n=4, C=2560, T=8192, scope="model", layers=4,
                seq=2048, recompute="mhc", mode="fwd+bwd", parallel="pipeline", microbatches=4,
                overlap="stream")
    runs = []
    for i in range(2):
        standin = _rec("pp-standin", _case(0, **base, gpus=1), 5.0, _stamp(i, 1), "pipeline")
        standin.update(standin=True, link="stand-in: host-device copies on a copy engine")
        real = _rec("pp-4", _case(0, **base, gpus=4), 4.0, _stamp(i, 2), "pipeline")
        real.update(standin=False, link="nccl")
        runs.append(Run(f"dist-{i}", _gpu_env(), [standin, real]))
    return runs


def test_stand_in_records_are_marked_wherever_they_are_shown(tmp_path):
    runs = _standin_runs()
    dashboard.build(runs, tmp_path)
    note = f"{STANDIN_MARK}</b>: {STANDIN_NOTE}"
    page = (tmp_path / f"scenario-{dashboard.slug('pipeline')}.html").read_text()
    table = page[page.index("<h3>Table</h3>"):]
    header = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    rows = re.findall(r"<tr class=\"ok\">(.*?)</tr>", table, re.DOTALL)
    link = header.index("link")
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)[link] for row in rows]
    assert sorted(cells) == ["nccl", STANDIN_MARK]
    assert note in table
    (plot,) = _sections(page, "plot-time")
    names = _end_labels(plot)
    assert sorted(n.startswith(STANDIN_MARK) for n in names) == [False, True], names
    assert note in page[:page.index("<h3>Table</h3>")]
    run_page = (tmp_path / "runs" / f"{dashboard.slug('dist-1')}.html").read_text()
    assert STANDIN_MARK in run_page and note in run_page
    hist = (tmp_path / "history.html").read_text()
    assert note in hist
    labels = [_text(a) for a in re.findall(r'<a href="trend/[^"]+">([^<]*)</a>', hist)]
    assert sorted(lab.startswith(STANDIN_MARK) for lab in labels) == [False, True], labels
    trends = {p.read_text().count(note) for p in (tmp_path / "trend").rglob("*.html")}
    assert trends == {0, 1}                           # the stand-in's trend page says it, once
    assert _broken_links(tmp_path) == [] and _check_layout(tmp_path) == []
