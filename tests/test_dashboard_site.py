"""The static dashboard at the scale of a real history, on synthetic runs: CPU runs kept apart from
GPU runs, distributed cases told apart, pages that fit the page, a history that is an index of
per-case trend pages, and a re-publish that renders only what changed yet writes the same bytes as
a fresh build."""
from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path

import pytest

from suite.publish import dashboard, export as publish_export
from suite.publish.published import Run, history

GPU = "Test GPU S (synthetic)"
CPU_MODEL = "AMD EPYC 7B13 (synthetic)"


def _case(j: int, **over) -> dict:
    c = {"method": ("residual", "hc", "mhc")[j % 3], "backend": "triton", "op": "site",
         "n": 1 if j % 3 == 0 else 4, "C": 512 * (1 + j // 3), "T": 64, "dtype": "bf16",
         "mode": "fwd", "device": "cuda", "scope": "site", "gpus": 1}
    c.update(over)
    return c


def _rec(case_id: str, case: dict, median: float, started: str, scenario: str = "s") -> dict:
    lo, hi = median * 0.99, median * 1.01
    return {"case_id": case_id, "case": case, "scenario": scenario, "status": "ok",
            "started_utc": started, "gbps": 100.0 / median, "pct_of_copy": 5.0 / median,
            "time_ms": {"median": median, "p10": lo, "p90": hi, "cv": 0.005, "n": 3,
                        "samples": [lo, median, hi]}}


def _gpu_env(gpu: str = GPU, driver: str = "550.54") -> dict:
    return {"gpus": [{"name": gpu, "driver": driver, "sms": 132, "memory_bytes": 80 * 2**30,
                      "capability": "9.0"}], "cpu": {"model": "host cpu"},
            "copy_rate": {"cuda": {"gbps": 2000.0}}}


def _cpu_env() -> dict:
    return {"gpus": [], "cpu": {"model": CPU_MODEL, "cores": 2}}


def _stamp(day: int, minute: int = 0) -> str:
    return f"2026-02-{1 + day // 24:02d}T{day % 24:02d}:{minute:02d}:00+00:00"


def _history(n_runs: int, n_cases: int, gpu: str = GPU) -> list[Run]:
    """n_runs runs of the same n_cases cases, one hour apart, with a little drift."""
    runs = []
    for i in range(n_runs):
        recs = [_rec(f"c{j:03d}", _case(j), (1.0 + 0.1 * j) * (1 + 0.002 * ((i * 7 + j) % 5)),
                     _stamp(i, j % 60)) for j in range(n_cases)]
        runs.append(Run(f"run-{i:03d}", _gpu_env(gpu), recs))
    return runs


def _files(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}


def _broken_links(site: Path) -> list[str]:
    bad = []
    for page in site.rglob("*.html"):
        for href in re.findall(r'href="([^"#]+)', page.read_text()):
            if "://" in href or not (page.parent / href).resolve().exists():
                bad.append(f"{page.relative_to(site)}: {href}")
    return bad


def _sections(html: str, cls: str) -> list[str]:
    return re.findall(rf'<section class="{cls}[ "].*?</section>', html, re.DOTALL)


def _text(html: str) -> str:
    return unescape(re.sub(r"<[^>]+>", " ", html))


# ---------------------------------------------------------------- CPU runs apart from GPU runs
def _cpu_and_gpu_runs() -> list[Run]:
    """One GPU run and two CPU runs of the same case ids; the second CPU run is 40% slower, which
    would read as a regression if CPU runs were judged like a GPU model."""
    ids = [f"c{j:03d}" for j in range(4)]
    gpu = Run("gpu-run", _gpu_env(), [_rec(i, _case(j), 0.1 + j, _stamp(0, j)) for j, i in enumerate(ids)])
    cpu1 = Run("cpu-run-1", _cpu_env(), [_rec(i, _case(j), 50.0 + j, _stamp(1, j)) for j, i in enumerate(ids)])
    cpu2 = Run("cpu-run-2", _cpu_env(), [_rec(i, _case(j), 70.0 + j, _stamp(2, j)) for j, i in enumerate(ids)])
    return [gpu, cpu1, cpu2]


def test_cpu_runs_have_their_own_section_and_never_join_gpu_models(tmp_path):
    runs = _cpu_and_gpu_runs()
    # A CPU model is no GPU model: its runs are never judged, so the 40% never reads as a regression.
    assert f"CPU {CPU_MODEL}" not in history(runs) and history(runs)
    site = tmp_path / "site"
    dashboard.build(runs, site)
    index = (site / "index.html").read_text()
    cpu = _sections(index, "cpu")
    assert len(cpu) == 1 and "CPU smoke runs" in cpu[0]
    for rid in ("cpu-run-1", "cpu-run-2"):
        assert f'href="runs/{dashboard.slug(rid)}.html"' in cpu[0]
        assert (site / "runs" / f"{dashboard.slug(rid)}.html").is_file()
    gpu_sections = _sections(index, "gpu")
    assert len(gpu_sections) == 1 and GPU in gpu_sections[0]
    outside_cpu = index.replace(cpu[0], "")
    assert CPU_MODEL not in outside_cpu and "regressed" not in outside_cpu
    for page in ("hardware.html", "history.html", "scenarios.html",
                 f"scenario-{dashboard.slug('s')}.html"):
        assert CPU_MODEL not in (site / page).read_text(), page
    assert 'class="verdict-regression' not in (site / "history.html").read_text()
    assert CPU_MODEL not in (site / "data" / "benchmark.json").read_text()
    assert "| regression |" not in (site / "data" / "tables.md").read_text()
    assert {p.parent.name for p in (site / "trend").rglob("*.html")} == {dashboard.slug(GPU)}
    # The raw data keeps every run.
    assert (site / "data" / "records.csv").read_text().count(CPU_MODEL) == 8
    assert _broken_links(site) == []


# ---------------------------------------------------------------- distributed cases told apart
def _dist_runs() -> list[Run]:
    base = dict(method="mhc", backend="triton", n=4, C=1024, T=2048, scope="model", layers=4,
                seq=512, recompute="none", mode="fwd+bwd", gpus=2, parallel="pipeline",
                microbatches=4)
    recs = [_rec("pp-none", _case(0, **base, overlap="none"), 5.0, _stamp(0, 1), "dist"),
            _rec("pp-stream", _case(0, **base, overlap="stream"), 5.0, _stamp(0, 2), "dist"),
            _rec("dp-none", _case(0, **{**base, "parallel": "data", "microbatches": None},
                                  overlap="none"), 5.0, _stamp(0, 3), "dist")]
    return [Run("dist-run", _gpu_env(), recs)]


def test_cases_that_differ_only_in_distributed_fields_are_told_apart(tmp_path):
    dashboard.build(_dist_runs(), tmp_path)
    page = (tmp_path / f"scenario-{dashboard.slug('dist')}.html").read_text()
    table = page[page.index("<h3>Table</h3>"):]
    header = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert {"gpus", "parallel", "microbatches", "overlap"} <= set(header)
    rows = [_text(r).split() for r in re.findall(r"<tr class=\"[^\"]*\">(.*?)</tr>", table, re.DOTALL)]
    assert len(rows) == 3 and len({tuple(r) for r in rows}) == 3
    # The plots: three series (three end labels), each named after what sets it apart.
    (plot,) = _sections(page, "plot-time")
    names = re.findall(r'<text class="end"[^>]*>(.*?)<title>', plot, re.DOTALL)
    assert len(names) == 3 and len(set(names)) == 3, names
    run = (tmp_path / "runs" / f"{dashboard.slug('dist-run')}.html").read_text()
    assert "<th class=\"l\">overlap</th>" in run


def test_single_process_tables_keep_their_columns(tmp_path):
    dashboard.build(_history(1, 3), tmp_path)
    page = (tmp_path / f"scenario-{dashboard.slug('s')}.html").read_text()
    header = re.findall(r"<th[^>]*>([^<]*)</th>", page[page.index("<h3>Table</h3>"):])
    assert not {"gpus", "parallel", "microbatches", "overlap"} & set(header)


# ---------------------------------------------------------------- verdicts rendered generically
def test_verdicts_and_environment_changes_are_rendered_whatever_their_name(tmp_path, monkeypatch):
    runs = _history(3, 2)
    real = dashboard.history

    def with_env_change(rs):
        h = real(rs)
        for pts in h.get(GPU, {}).values():
            pts[-1].verdict = "environment changed"
            pts[-1].env_change = ("driver 550.54 -> 560.35",)
            pts[-1].z = 4.25
        return h

    monkeypatch.setattr(dashboard, "history", with_env_change)
    dashboard.build(runs, tmp_path)
    hist = (tmp_path / "history.html").read_text()
    assert re.search(r'class="verdict-environment-changed"', hist)
    assert "driver 550.54 -&gt; 560.35" in hist
    trend = next((tmp_path / "trend").rglob("c000*.html")).read_text()
    assert re.search(r'class="verdict-environment-changed"', trend)
    assert "driver 550.54 -&gt; 560.35" in trend and "4.25" in trend
    # regression and improvement keep their colours: the class names the CSS styles
    css = dashboard.CSS
    assert ".verdict-regression{" in css and ".verdict-improvement{" in css


def test_a_regression_is_marked_with_the_class_the_css_styles(tmp_path):
    runs = _history(3, 2)
    runs[-1].records[0]["time_ms"].update(median=2.0, p10=1.98, p90=2.02)
    dashboard.build(runs, tmp_path)
    hist = (tmp_path / "history.html").read_text()
    assert re.search(r'<span class="verdict-regression">regression</span>', hist)
    assert re.search(r'<tr class="verdict-regression">', hist)


# ---------------------------------------------------------------- pages that fit the page
MAIN_WIDTH = 1000       # px: plots wider than this do not fit beside the page's margins on a laptop


def _check_layout(site: Path) -> list[str]:
    bad = []
    for page in sorted(site.rglob("*.html")):
        html = page.read_text()
        name = str(page.relative_to(site))
        for svg in re.findall(r"<svg[^>]*>", html):
            if "viewBox=" not in svg:
                bad.append(f"{name}: svg without viewBox: {svg[:80]}")
            w = re.search(r'\swidth="(\d+)', svg)
            if w and int(w.group(1)) > MAIN_WIDTH:
                bad.append(f"{name}: svg {w.group(1)} px wide")
        for m in re.finditer(r"<table", html):
            if not html[:m.start()].endswith('<div class="scroll">'):
                bad.append(f"{name}: table outside a scroll wrapper at {m.start()}")
    return bad


def test_every_plot_scales_and_every_table_scrolls(tmp_path):
    dashboard.build(_history(17, 9) + _cpu_and_gpu_runs()[1:] + _dist_runs(), tmp_path)
    assert _check_layout(tmp_path) == []
    css = dashboard.CSS.replace(" ", "")
    assert "svg.plot{max-width:100%;height:auto" in css
    assert ".scroll{overflow-x:auto" in css


def test_no_plot_draws_more_lines_than_a_reader_can_follow(tmp_path):
    # 20 backends of three methods at two widths: 60 lines if drawn on one plot
    recs = [_rec(f"{m}-{b}-{C}", _case(0, method=m, n=1 if m == "residual" else 4,
                                       backend=f"backend{b:02d}", C=C), 1.0 + b / 10, _stamp(0, b))
            for m in ("residual", "hc", "mhc") for b in range(20) for C in (512, 1024)]
    runs = [Run("wide", _gpu_env(), recs), Run("wide-b", _gpu_env("Test GPU T (synthetic)"), recs)]
    dashboard.build(runs, tmp_path)
    for page in ("hardware.html", f"scenario-{dashboard.slug('s')}.html"):
        html = (tmp_path / page).read_text()
        svgs = re.findall(r"<svg class=\"plot\".*?</svg>", html, re.DOTALL)
        assert svgs, page
        lines = [svg.count("<polyline") for svg in svgs]
        assert max(lines) <= 12, (page, lines)
        assert sum(lines) >= 60, (page, sum(lines))          # split, not dropped


def test_history_is_an_index_of_per_case_trend_pages(tmp_path):
    runs = _history(17, 9)
    dashboard.build(runs, tmp_path)
    hist = (tmp_path / "history.html").read_text()
    for svg in re.findall(r"<svg.*?</svg>", hist, re.DOTALL):
        assert svg.count("<polyline") <= 1
    links = sorted(set(re.findall(r'href="(trend/[^"]+\.html)"', hist)))
    assert len(links) == 9
    trend = (tmp_path / links[0]).read_text()
    (plot,) = _sections(trend, "plot-trend")
    assert '<polygon class="band"' in plot                       # the p10-p90 band
    assert plot.count('href="../../r/') == 17                    # each run's point opens its record
    rows = re.findall(r"<tr class=\"verdict-[a-z-]+\">", trend)
    assert len(rows) == 17
    assert _broken_links(tmp_path) == []
    # each record opens the trend of its case
    rec = next((tmp_path / "r").rglob("c000*.html")).read_text()
    assert re.search(r'href="\.\./\.\./trend/[^"]+/c000[^"]*\.html"', rec)


def test_copy_rate_chart_of_many_runs_fits(tmp_path):
    dashboard.build(_history(40, 1), tmp_path)
    (gpu,) = _sections((tmp_path / "index.html").read_text(), "gpu")
    (bars,) = re.findall(r"<svg class=\"plot\".*?</svg>", gpu, re.DOTALL)
    width = int(re.search(r'width="(\d+)', bars).group(1))
    assert width <= MAIN_WIDTH
    labels = re.findall(r'<text class="bar-label"[^>]*>([^<]*)</text>', bars)
    assert 0 < len(labels) < 40                                  # thinned, not overprinted


# ---------------------------------------------------------------- incremental publish
def _count_renders(monkeypatch) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in ("record_page", "run_page"):
        real = getattr(dashboard, name)

        def counted(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)
        monkeypatch.setattr(dashboard, name, counted)
    return counts


def test_republish_with_one_more_run_renders_only_what_changed_and_matches_a_fresh_build(
        tmp_path, monkeypatch):
    n_runs, n_cases = 30, 40
    runs = _history(n_runs + 1, n_cases)
    site, fresh = tmp_path / "site", tmp_path / "fresh"
    dashboard.build(runs[:-1], site)
    counts = _count_renders(monkeypatch)
    dashboard.build(runs, site)
    assert counts == {"record_page": n_cases, "run_page": 1}
    dashboard.build(runs, fresh)
    a, b = _files(site), _files(fresh)
    assert sorted(a) == sorted(b)
    assert [f for f in a if a[f] != b[f]] == []
    # the same runs again: nothing to render
    counts.clear()
    dashboard.build(runs, site)
    assert counts == {}
    assert _files(site) == b


def test_republish_never_reuses_a_page_edited_or_replaced_after_it_was_written(tmp_path, monkeypatch):
    runs = _history(3, 2)
    site, fresh = tmp_path / "site", tmp_path / "fresh"
    dashboard.build(runs, site)
    dashboard.build(runs, fresh)
    rec = sorted((site / "r").rglob("*.html"))
    rec[0].write_text("edited by hand\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the site\n")
    rec[1].unlink()
    rec[1].symlink_to(secret)
    counts = _count_renders(monkeypatch)
    dashboard.build(runs, site)
    assert counts == {"record_page": 2}
    assert _files(site) == _files(fresh)
    assert not any(p.is_symlink() for p in site.rglob("*"))
    assert secret.read_text() == "not part of the site\n"


def test_a_change_of_the_dashboard_code_renders_everything_again(tmp_path, monkeypatch):
    runs = _history(2, 3)
    dashboard.build(runs, tmp_path / "site")
    counts = _count_renders(monkeypatch)
    monkeypatch.setattr(dashboard, "_code_version", lambda: "another version")
    dashboard.build(runs, tmp_path / "site")
    assert counts == {"record_page": 6, "run_page": 2}


def test_the_manifest_holds_no_build_time_or_path(tmp_path):
    runs = _history(2, 2)
    dashboard.build(runs, tmp_path / "a")
    dashboard.build(runs, tmp_path / "elsewhere" / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "elsewhere" / "b")
    manifest = json.loads((tmp_path / "a" / dashboard.MANIFEST).read_text())
    assert set(manifest["pages"]) == set(_files(tmp_path / "a")) - {dashboard.MANIFEST}
    assert str(tmp_path) not in (tmp_path / "a" / dashboard.MANIFEST).read_text()


def test_exports_in_the_site_cover_gpu_runs_and_the_csv_every_run(tmp_path):
    runs = _cpu_and_gpu_runs()
    dashboard.build(runs, tmp_path)
    gpu_runs = [r for r in runs if r.env["gpus"]]
    assert (tmp_path / "data" / "benchmark.json").read_text() == publish_export.benchmark_json(gpu_runs)
    assert (tmp_path / "data" / "records.csv").read_text() == publish_export.tidy_csv(runs)


@pytest.mark.parametrize("cpu", [False, True])
def test_run_pages_link_to_plots_that_exist(tmp_path, cpu):
    runs = _cpu_and_gpu_runs()[1:] if cpu else _history(1, 3)
    dashboard.build(runs, tmp_path)
    assert _broken_links(tmp_path) == []
    page = (tmp_path / "runs" / f"{dashboard.slug(runs[0].run_id)}.html").read_text()
    assert ("<svg" in page) == cpu          # a CPU run has no scenario page: its plots are here


def test_an_unreadable_manifest_means_a_full_build(tmp_path, monkeypatch):
    runs = _history(2, 2)
    dashboard.build(runs, tmp_path / "site")
    dashboard.build(runs, tmp_path / "fresh")
    (tmp_path / "site" / dashboard.MANIFEST).write_text('{"pages": {"index.html": 3}}\n')
    counts = _count_renders(monkeypatch)
    dashboard.build(runs, tmp_path / "site")
    assert counts == {"record_page": 4, "run_page": 2}
    assert _files(tmp_path / "site") == _files(tmp_path / "fresh")


# ---------------------------------------------------------------- small things at this scale
def test_a_gpu_environment_with_only_a_name_is_shown(tmp_path):
    dashboard.build([Run("bare", {"gpus": [{"name": GPU}]}, [_rec("c000", _case(0), 1.0, _stamp(0))])],
                    tmp_path)
    assert GPU in (tmp_path / "index.html").read_text()


def test_ticks_of_a_narrow_range_are_told_apart():
    from suite.publish import svgplot
    svg = svgplot.plot([{"name": "s", "colour": "#000", "marker": "circle", "dash": "",
                         "points": [{"x": 0, "y": 20.40}, {"x": 1, "y": 20.43}]}], "x", "y", y_zero=False)
    ticks = re.findall(r'text-anchor="end" font-size="11">([^<]+)<', svg)
    assert len(ticks) > 2 and len(set(ticks)) == len(ticks), ticks


# ---------------------------------------------------------------- hardware: predicted from the reference
def test_hardware_page_predicts_another_gpu_from_the_reference_alone():
    """An H200 kernel time predicted from the H100's by the datasheets' bandwidth ratio (4800 / 3350),
    beside the measurement with its error; a whole-model case is not predicted."""
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    ids = ["k0", "k1", "m0"]
    cases = [_case(1), _case(2), _case(2, scope="model", op="model")]
    ref = Run("h100-a", _gpu_env(h100), [_rec(i, c, 1.0, _stamp(0)) for i, c in zip(ids, cases)]
              + [_rec("only-here", _case(4), 1.0, _stamp(0))])
    other = Run("h200-a", _gpu_env(h200), [_rec(i, c, m, _stamp(1)) for i, c, m in zip(ids, cases, (0.75, 0.70, 0.9))])
    html = dashboard.hardware_page([ref, other])
    text = _text(html)
    assert f"{h200} predicted ms" in text and f"{h200} error" in text
    guess = 3350 / 4800
    assert f"{guess:.4g}" in text
    assert f"{100 * (0.75 / guess - 1):+.1f}%" in text and f"{100 * (0.70 / guess - 1):+.1f}%" in text
    assert "over 2 cases" in text       # the model case is left out
