"""The dashboard in a real browser: headless Chromium from Debian's packages.

The set-up installs the `chromium` package with apt-get when it is missing and this is root (about
40 s once, apt-get update included); otherwise the tests skip with the reason. Each page is loaded
with --dump-dom: its inline script marks <body data-js="ok"> once it has run, and a window error
handler sets data-js-error; console errors are read from Chromium's log. A screenshot of the
overview is kept: under the test's tmp dir, copied to $HCBENCH_ARTIFACTS (default: pytest's base
tmp dir) and its path printed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from suite.publish import dashboard
from suite.publish.published import load_runs

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "publish"
NAMES = ("chromium", "chromium-browser", "google-chrome")


def _find() -> str | None:
    return next((shutil.which(n) for n in NAMES if shutil.which(n)), None)


@pytest.fixture(scope="module")
def chromium() -> str:
    found = _find()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and this is not root with apt-get: "
                    "apt-get install -y chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
            if res.returncode != 0:
                tail = (res.stderr.strip().splitlines() or ["?"])[-1]
                pytest.skip(f"could not install chromium ({' '.join(cmd)}: {tail})")
    except subprocess.TimeoutExpired:
        pytest.skip("installing chromium took over 10 minutes")
    found = _find()
    if not found:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return found


def _run(browser: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp / 'profile'}",
           "--virtual-time-budget=3000", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=90)


def load(browser: str, page: Path, tmp: Path) -> tuple[str, list[str]]:
    """(DOM after the scripts ran, console errors)."""
    res = _run(browser, "--dump-dom", page.as_uri(), tmp=tmp)
    errors = [line for line in res.stderr.splitlines()
              if "CONSOLE" in line and ("Uncaught" in line or "error" in line.lower())]
    m = re.search(r'data-js-error="([^"]*)"', res.stdout)
    if m:
        errors.append(f"window error: {m.group(1)}")
    if 'data-js="ok"' not in res.stdout:
        errors.append(f"{page.name}: the page's script did not finish (rc {res.returncode}; "
                      f"{res.stderr.strip()[-300:]})")
    return res.stdout, errors


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    dashboard.build(load_runs([FIXTURE]), out)
    return out


def test_the_error_check_can_fail(chromium, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>"
                    "window.addEventListener('error',function(e){document.body.setAttribute("
                    "'data-js-error',String(e.message));});</script><script>undefinedFunction();"
                    "</script><script>document.body.setAttribute('data-js','ok');</script></body></html>")
    _, errors = load(chromium, page, tmp_path)
    assert errors, "a page that throws must be reported"


SECTIONS = {"index.html": ["gpu"],
            f"scenario-{dashboard.slug('sample')}.html": ["plot-time", "plot-gbps", "plot-copy", "plot-fwdbwd"],
            f"scenario-{dashboard.slug('sample_model')}.html": ["plot-time", "plot-overhead", "plot-recompute"],
            "hardware.html": ["plot-hardware"], "history.html": ["history-index"], "trend": ["plot-trend"]}


def _page(site: Path, name: str) -> Path:
    """A page of the site; "trend": the trend page of the fixture's regressed case."""
    if name != "trend":
        return site / name
    hist = (site / "history.html").read_text()
    return site / re.search(r'<tr class="verdict-regression">.*?href="(trend/[^"]+)"', hist).group(1)


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_page_renders_tables_and_plots(chromium, site, tmp_path, name):
    dom, errors = load(chromium, _page(site, name), tmp_path)
    assert errors == []
    assert "<table" in dom
    for section in SECTIONS[name]:
        blocks = re.findall(rf'<section class="{section}[ "].*?</section>', dom, re.DOTALL)
        assert blocks, f"{name}: no section {section}"
        for block in blocks:
            assert "<svg" in block and re.search(r"<(polyline|circle|rect|polygon)", block), \
                f"{name}: section {section} has an empty plot"


# Sets data-width on <body>: the page's scroll width over the window's width.
WIDTH_PROBE = ("<script>document.body.setAttribute('data-width',document.documentElement.scrollWidth"
               "+'/'+document.documentElement.clientWidth);</script></body>")


@pytest.mark.parametrize("name", sorted(SECTIONS) + ["record", "run"])
def test_nothing_is_wider_than_a_narrow_window(chromium, site, tmp_path, name):
    """Plots shrink to the window and wide tables scroll inside their box: the page itself never
    scrolls sideways, however many columns a table has."""
    if name in ("record", "run"):
        page = sorted((site / ("r" if name == "record" else "runs")).rglob("*.html"))[0]
    else:
        page = _page(site, name)
    probe = page.with_name("probe-" + page.name)       # beside it: its links and styles still resolve
    probe.write_text(page.read_text().replace("</body>", WIDTH_PROBE))
    try:
        res = _run(chromium, "--window-size=600,900", "--dump-dom", probe.as_uri(), tmp=tmp_path)
    finally:
        probe.unlink()
    scroll, client = map(int, re.search(r'data-width="(\d+)/(\d+)"', res.stdout).groups())
    assert client <= 600 and scroll <= client, f"{name}: {scroll} px wide in a {client} px window"


def test_the_width_check_can_fail(chromium, tmp_path):
    page = tmp_path / "wide.html"
    page.write_text('<!DOCTYPE html><html><body><table><tr><td style="white-space:nowrap">'
                    + "wide " * 400 + "</td></tr></table>" + WIDTH_PROBE + "</html>")
    res = _run(chromium, "--window-size=600,900", "--dump-dom", page.as_uri(), tmp=tmp_path)
    scroll, client = map(int, re.search(r'data-width="(\d+)/(\d+)"', res.stdout).groups())
    assert scroll > client


def test_record_link_opens_the_record_and_screenshot(chromium, site, tmp_path, capsys):
    dom, errors = load(chromium, site / f"scenario-{dashboard.slug('sample')}.html", tmp_path)
    assert errors == []
    href = re.search(r'<a href="(r/[^"]+\.html)">[0-9]', dom).group(1)     # a number: an ok record
    record = site / href
    assert record.exists()
    page, errors = load(chromium, record, tmp_path)
    assert errors == []
    case_id = record.stem.split("-")[0]      # the file is named slug(case_id): the id, a hash
    assert case_id in page and "raw samples" in page and "environment" in page
    shot = tmp_path / "overview.png"
    res = _run(chromium, f"--screenshot={shot}", "--window-size=1400,1100", "--hide-scrollbars",
               (site / "index.html").as_uri(), tmp=tmp_path)
    assert shot.exists() and shot.stat().st_size > 10_000, res.stderr[-500:]
    keep = Path(os.environ.get("HCBENCH_ARTIFACTS") or tmp_path.parent.parent / "artifacts")
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / "dashboard-overview.png")
    with capsys.disabled():
        print(f"\ndashboard screenshot: {keep / 'dashboard-overview.png'}")
