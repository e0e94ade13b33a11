"""Every file or folder of the repository that the README and the docs pages cite exists."""
import glob
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("suite", "kernels", "scenarios", "results", "dev", "tools", "docs", "tests", "dashboards")
# A path: starts at a top-level folder of the repository, then path characters; a glob is allowed.
# Named in the pages but not files of the repository: what a run writes, and examples.
WRITTEN_OR_EXAMPLE = {"results/dashboard", "results/history.sqlite",   # made by publish / run
                      "scenarios/*.json",                               # inside a run folder
                      "scenarios/x.yaml"}                               # an example name
CITED = re.compile(r"(?<![\w./-])((?:%s)/[\w.*/-]*[\w*/])" % "|".join(TOP))


def cited(text: str) -> set[str]:
    return {m.group(1).rstrip("/.") for m in CITED.finditer(text)}


def test_every_cited_path_exists():
    missing = []
    for page in PAGES:
        for path in sorted(cited(page.read_text())):
            if path not in WRITTEN_OR_EXAMPLE and not glob.glob(str(ROOT / path)):
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "\n".join(missing)


def test_every_relative_link_resolves():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and "://" not in path and not path.startswith("mailto:"):
                if not (page.parent / path).exists():
                    missing.append(f"{page.relative_to(ROOT)}: ({target})")
    assert not missing, "\n".join(missing)


def test_the_pattern_finds_paths():
    found = cited("see `suite/run/runner.py`, (results/x-h100/logs/), docs/method.md#pad and kernels/triton/*.py.")
    assert found == {"suite/run/runner.py", "results/x-h100/logs", "docs/method.md", "kernels/triton/*.py"}
