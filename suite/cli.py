"""The command line: run, list, report, compare, publish, merge, prewarm, site-kernels,
results-doc.
Exit 0 ok, 1 a case failed, 2 bad input, 3 a run measured nothing (no case ok, none failed: e.g. a
GPU scenario on a node without a GPU), 4 a regression under --fail-on-regression, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM, e.g. a SLURM time limit; kept and resumable like Ctrl-C)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from rich.console import Console

from suite.analysis import regression
from suite.core.scenario import (Case, Scenario, ScenarioError, filter_cases, load_all, normalise,
                                 parse_overrides)
from suite.measure import env as environment
from suite.publish.published import PublishError
from suite.publish.publishing import compare_history, publish
from suite.report import results_index, results_tables
from suite.report.tables import compare, print_run, write_markdown
from suite.run import distributed as dist_run, prewarm, runner, site_kernels
from suite.store.runs import (RunFolderError, RunLocked, atomic_write, merge_run_copies,
                              read_records)
from suite.workloads.dist import launch

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NOTHING_MEASURED, EXIT_REGRESSION = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
_TERMINATED = {"flag": False}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is: the run keeps what finished exactly as on Ctrl-C."""


def _on_sigterm(signum, frame):
    _TERMINATED["flag"] = True
    raise Terminated()
ROOT = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness.py", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="check, time and record every case of the scenarios")
    run.add_argument("scenarios", nargs="*", help="scenario YAML files")
    run.add_argument("--out", type=Path, default=ROOT / "results",
                     help="folder that receives the run folder and history.sqlite (default results/)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue a run: finished case ids are skipped")
    run.add_argument("--retry-failed", action="store_true", help="with --resume, rerun failed cases")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a case field in every case, e.g. --set T=1024")
    run.add_argument("--only", action="append", default=[], metavar="KEY=V1[,V2]",
                     help="run only the cases whose field matches, e.g. --only backend=triton,torch")
    run.add_argument("--traffic", action="store_true",
                     help="also measure each GPU case's DRAM traffic in one pass under Nsight Compute "
                          "(same as --set traffic=true)")

    ls = sub.add_parser("list", help="print the expanded cases without running them")
    ls.add_argument("scenarios", nargs="+")
    ls.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ls.add_argument("--only", action="append", default=[], metavar="KEY=V1[,V2]")

    rep = sub.add_parser("report", help="print a run's table again and write its report.md")
    rep.add_argument("run_dir", type=Path)

    cmp_ = sub.add_parser("compare", help="join two runs by case id and print B/A time ratios; "
                          "without runs (or with --gpu/--since/--scenario), compare across the history")
    cmp_.add_argument("run_a", type=Path, nargs="?")
    cmp_.add_argument("run_b", type=Path, nargs="?")
    cmp_.add_argument("--gpu", action="append", default=[], metavar="NAME",
                      help="history: only GPU models whose name contains NAME (repeatable)")
    cmp_.add_argument("--since", metavar="DATE", help="history: only runs started on or after DATE (YYYY-MM-DD)")
    cmp_.add_argument("--scenario", action="append", default=[], metavar="NAME",
                      help="history: only records of scenario NAME (repeatable)")
    cmp_.add_argument("--history", type=Path, default=ROOT / "results",
                      help="history.sqlite, or a folder with one or with run folders (default results/)")
    _gate_option(cmp_)

    pub = sub.add_parser("publish", help="write a static dashboard (or PostgreSQL) from run folders")
    pub.add_argument("run_dirs", nargs="+", type=Path,
                     help="run folders, or folders of run folders (e.g. results/)")
    pub.add_argument("--to", required=True, metavar="DIR|postgresql://USER@HOST/DB",
                     help="site folder to (re)write, or a PostgreSQL database")
    pub.add_argument("--csv", type=Path, metavar="FILE", help="also write the tidy CSV here")
    pub.add_argument("--benchmark-json", type=Path, metavar="FILE",
                     help="also write github-action-benchmark JSON (customSmallerIsBetter) here")
    pub.add_argument("--markdown", type=Path, metavar="FILE", help="also write the Markdown tables here")
    _gate_option(pub)
    mrg = sub.add_parser("merge", help="fold copies of a run folder, resumed in separate calls "
                                        "(e.g. on machines without a shared disk), back into it")
    mrg.add_argument("run_dir", type=Path)
    mrg.add_argument("copies", type=Path, nargs="+", help="folders with records.jsonl")
    pre = sub.add_parser("prewarm", help="compile every distinct shape of a scenario once, in "
                                         "parallel processes, before a run (nothing is timed)",
                         add_help=False)
    pre.add_argument("args", nargs=argparse.REMAINDER,
                     help="SCENARIO [--only K=V,...] [--set K=V] [--jobs N]")
    sub.add_parser("site-kernels", help="one site call's kernels per backend, side by side "
                                        "(torch.profiler; CUDA GPU)", add_help=False)
    idx = sub.add_parser("results-doc", help="rewrite docs/results.md's index of committed run "
                                             "folders, and the table blocks of it and of the "
                                             "README, from the folders (--check: only compare)")
    idx.add_argument("--results", type=Path, default=ROOT / "results")
    idx.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    idx.add_argument("--readme", type=Path, default=ROOT / "README.md",
                     help="a second page whose table blocks are rewritten (no index)")
    idx.add_argument("--check", action="store_true",
                     help="exit 1 with one line when the page is not what the folders give")
    return p


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        value = -1.0
    if not 0 < value < 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: give a percentage above 0, e.g. 5 or 5%")
    return value


def _gate_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fail-on-regression", nargs="?", type=_percent, const=regression.REGRESSION_PCT,
                   default=None, metavar="PCT",
                   help="exit 4, with one line per regression, when a case's newest run regressed "
                        f"(the rule of docs/publishing.md; PCT is its ratio threshold, default "
                        f"{regression.REGRESSION_PCT:g})")


def _gate(args, found: list[str]) -> int:
    """The exit status of compare and publish: 4 with one line per regression when gated."""
    if args.fail_on_regression is None or not found:
        return EXIT_OK
    for line in found:
        print(f"regression: {line}", file=sys.stderr)
    return EXIT_REGRESSION


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _TERMINATED["flag"] = False          # a process may call main more than once
    if argv[:1] == ["prewarm"]:          # its own parser (suite.run.prewarm), options and --help
        return prewarm.main(argv[1:])
    if argv[:1] == ["site-kernels"]:     # its own parser (suite.run.site_kernels)
        return site_kernels.main(argv[1:])
    args = _parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:
        # Piped into a log (a cluster job, CI): rich would squeeze the tables into 80 columns.
        console = Console(width=220)
    try:
        if args.command == "list":
            return _list(args, console)
        if args.command == "run":
            return _run(args, console)
        if args.command == "report":
            return _report(args.run_dir, console)
        if args.command == "publish":
            return _publish(args, console)
        if args.command == "results-doc":
            return _results_doc(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "compare" and (args.run_b is None or args.gpu or args.since
                                          or args.scenario):
            return _compare_history(args, console)
        if args.command == "compare":
            for d in (args.run_a, args.run_b):
                _require_run_dir(d)
            pct = args.fail_on_regression or regression.REGRESSION_PCT
            return _gate(args, compare(args.run_a, args.run_b, console, pct).regressions)
    except BadInput as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFolderError as exc:       # a records.jsonl or env.json this version cannot read
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:        # outside the case loop (set-up, copy rate): nothing to keep
        print("\nterminated" if _TERMINATED["flag"] else "\ninterrupted", file=sys.stderr)
        return EXIT_TERMINATED if _TERMINATED["flag"] else EXIT_INTERRUPTED
    return EXIT_OK


def _merge(args) -> int:
    for p in [args.run_dir, *args.copies]:
        if not (p / "records.jsonl").exists():
            raise BadInput([f"{p}: no records.jsonl; merge takes a run folder and copies of it"])
    try:
        added, replaced = merge_run_copies(args.run_dir, args.copies)
    except RunLocked as exc:
        raise BadInput([str(exc)])
    print(f"{args.run_dir}: {added} records added, {replaced} replaced; "
          f"`python harness.py report {args.run_dir}` rebuilds its report.md")
    return EXIT_OK


def _results_doc(args) -> int:
    if not args.doc.is_file():
        raise BadInput([f"{args.doc}: no such page; --doc names the results page to rewrite"])
    if not args.results.is_dir():
        raise BadInput([f"{args.results}: not a folder; --results names the folder of run folders"])
    root = args.results.resolve().parent
    pages = {args.doc: lambda text: results_index.render(text, args.results)}
    if args.readme.is_file():
        pages[args.readme] = lambda text: text
    wanted = {}
    for page, index in pages.items():
        text = page.read_text()
        try:
            wanted[page] = (text, results_tables.render(index(text), root))
        except results_tables.TableError as exc:
            raise BadInput([f"{page}: {exc}"])
    stale = [page for page, (text, want) in wanted.items() if want != text]
    if args.check:
        for page in stale:
            print(f"{page}: its runs index or tables differ from {args.results}; run "
                  "`python harness.py results-doc`", file=sys.stderr)
        return EXIT_FAILED if stale else EXIT_OK
    for page in stale:
        atomic_write(page, wanted[page][1])
    for page, (_, want) in wanted.items():
        print(f"{page}: {len(results_tables.BLOCK.findall(want))} tables from run folders"
              + (f", runs index of {len(results_index.committed_runs(args.results))} folders"
                 if page == args.doc else ""))
    return EXIT_OK


class BadInput(Exception):
    def __init__(self, lines):
        super().__init__("\n".join(lines))
        self.lines = lines


def load_scenarios(paths: list[str], sets: list[str], only: list[str] = ()):
    try:
        scenarios = load_all(paths, sets, only)
    except ScenarioError as exc:
        raise BadInput(exc.problems)
    for sc in scenarios:
        for line in sc.warnings:
            print(f"warning: {line}", file=sys.stderr)
    return scenarios


def _list(args, console: Console) -> int:
    for sc in load_scenarios(args.scenarios, args.set, args.only):
        # soft_wrap: one case per line, whatever the width, so the list can be piped and grepped.
        console.print(f"[bold]{sc.name}[/] ({sc.path}): {len(sc.cases)} cases"
                      + (f" - {sc.description}" if sc.description else ""), soft_wrap=True)
        for i, case in enumerate(sc.cases, 1):
            console.print(f"  {i:4d}  {case.case_id}  {case.label()}", highlight=False, markup=False,
                          soft_wrap=True)
    return EXIT_OK


def _require_run_dir(path: Path) -> None:
    if not (path / "records.jsonl").exists() and not (path / "scenarios").is_dir():
        raise BadInput([f"{path}: not a run folder (no records.jsonl)"])
    try:
        read_records(path)
    except ValueError as exc:
        raise BadInput([str(exc)])


def _saved_scenarios(run_dir: Path, sets: list[str], only: list[str]):
    """The cases a run folder saved, with --set and --only applied as to a scenario file."""
    out = []
    try:
        overrides = parse_overrides(sets)
        for f in sorted((run_dir / "scenarios").glob("*.json")):
            try:
                doc = json.loads(f.read_text())
                cases = [normalise(Case(**{**c, **overrides})) for c in doc["cases"]]
                sc = Scenario(doc["path"], doc["name"], doc.get("description", ""), cases)
            except (ValueError, KeyError, TypeError) as exc:
                raise BadInput([f"{f}: not a saved scenario ({type(exc).__name__}: {exc})"])
            out.append(filter_cases(sc, only) if only else sc)
    except ScenarioError as exc:
        raise BadInput(exc.problems)
    if not out:
        raise BadInput([f"{run_dir}: no saved scenarios under scenarios/; give the scenario file"])
    return out


def _run(args, console: Console) -> int:
    retired = environment.retired_knobs()
    if retired:
        raise BadInput(retired)
    if args.resume:
        _require_run_dir(args.resume)
    if not args.scenarios and not args.resume:
        raise BadInput(["run: give at least one scenario file, or --resume RUN_DIR"])
    if not args.resume:
        _require_writable_folder(args.out, "--out", "receives the run folder")
    if args.traffic:
        args.set.append("traffic=true")
    scenarios = (load_scenarios(args.scenarios, args.set, args.only) if args.scenarios
                 else _saved_scenarios(args.resume, args.set, args.only))
    world = launch.from_env()
    launch.keep_multicast_off()
    if world.rank != 0:          # torchrun / SLURM: rank 0 records, the others take part
        return dist_run.follow(scenarios, world)
    # One process: SIGTERM ends the run as Ctrl-C does (several ranks: suite.run.distributed's own)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if world.size == 1 else None
    try:
        store, interrupted = runner.run(scenarios, args.out, resume=args.resume,
                                        retry_failed=args.retry_failed, console=console)
    except (runner.ResumeMismatch, RunLocked) as exc:
        raise BadInput([str(exc)])
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if store.records:
        print_run(store.dir, console)
        console.print(f"report: {write_markdown(store.dir)}")
    console.print(f"run folder: {store.dir}")
    if interrupted:
        return EXIT_TERMINATED if _TERMINATED["flag"] else EXIT_INTERRUPTED
    if any(r["status"] == "failed" for r in store.records):
        return EXIT_FAILED
    if not any(r["status"] == "ok" for r in store.records):
        print(f"error: {nothing_measured(store.records)}", file=sys.stderr)
        return EXIT_NOTHING_MEASURED
    return EXIT_OK


def nothing_measured(records: list[dict]) -> str:
    """Why a run that finished has no ok case, in one line: its most common skip reason."""
    if not records:
        return "the run measured nothing: no case was run"
    reasons: dict[str, int] = {}
    for r in records:
        why = (r.get("reason") or "no reason recorded").splitlines()[0][:160]
        reasons[why] = reasons.get(why, 0) + 1
    why, count = max(reasons.items(), key=lambda kv: kv[1])
    return (f"the run measured nothing: all {len(records)} cases were skipped "
            f"({count} because: {why})")


def _report(run_dir: Path, console: Console) -> int:
    _require_run_dir(run_dir)
    print_run(run_dir, console)
    console.print(f"report: {write_markdown(run_dir)}")
    return EXIT_OK


def _require_writable_folder(path: Path, option: str, what: str) -> None:
    """One line and exit 2, before anything is written, when `path` cannot be the folder asked."""
    if path.exists() and not path.is_dir():
        raise BadInput([f"{path}: {option} names a file; it must be a folder (it {what})"])
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput([f"{path}: {option}: {probe} cannot be written by this user (it {what})"])


def _publish(args, console: Console) -> int:
    if "://" not in str(args.to):
        _require_writable_folder(Path(args.to), "--to", "receives the site")
    try:
        return _gate(args, publish(args.run_dirs, args.to, console, csv=args.csv,
                                   benchmark_json=args.benchmark_json, markdown=args.markdown,
                                   pct=args.fail_on_regression or regression.REGRESSION_PCT))
    except (PublishError, RunLocked) as exc:
        raise BadInput([str(exc)])


def _compare_history(args, console: Console) -> int:
    if args.run_a is not None and args.run_b is None:
        raise BadInput(["compare: give two run folders, or none to compare across the history"])
    try:
        source = [args.run_a, args.run_b] if args.run_b is not None else args.history
        return _gate(args, compare_history(source, args.gpu, args.since, args.scenario, console,
                                           args.fail_on_regression or regression.REGRESSION_PCT))
    except PublishError as exc:
        raise BadInput([str(exc)])
