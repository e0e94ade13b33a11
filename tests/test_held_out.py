"""The command line's promises, checked end to end the way a fault injector attacks them.

A. Bad input of every kind is one `error:` line (a few where several problems are listed), exit 2,
   no traceback, and nothing written: no run folder, no history.sqlite created or changed, no site.
B. Runs that race each other, are killed at random moments or terminated lose no record, and the
   history under --out ends up holding what the run folders hold.
C. Publishing deletes nothing it did not create, and no record field writes outside --to.

The limits tested are the documented ones (docs/scenarios.md, docs/records.md, docs/publishing.md).
Subprocesses run `harness.py` as a user does; the rest call `suite.cli.main` in this process, which
is the same code without the interpreter's start-up (about 3 s of importing torch each).
"""
from __future__ import annotations

import contextlib
import hashlib
import html.parser
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from suite import cli
from suite.core.scenario import load_all

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "harness.py"
DEFAULT = ROOT / "scenarios" / "default.yaml"
# default.yaml's CPU cases with the eager backend, at small shapes and timed briefly: six cases,
# about two seconds.
CPU_ONLY = ["--only", "device=cpu", "--only", "backend=torch"]
CPU_SETS = ["--set", "C=64", "--set", "T=32", "--set", "rep_ms=2", "--set", "warmup_ms=1"]
CPU_RUN = [str(DEFAULT), *CPU_ONLY, *CPU_SETS]
FAST_S = 3.0            # "fails fast": a few seconds at most, on a slow CI core


def _cpu_case_ids(*only: str) -> set[str]:
    sets = [CPU_SETS[i + 1] for i in range(0, len(CPU_SETS), 2)]
    filters = [CPU_ONLY[i + 1] for i in range(0, len(CPU_ONLY), 2)] + list(only)
    (sc,) = load_all([str(DEFAULT)], sets, filters)
    return {c.case_id for c in sc.cases}


# ---------------------------------------------------------------- helpers
def _env() -> dict:
    """This environment without kernel knobs (a knob set on the CI machine would change what is
    tested), with unbuffered output so a child's progress lines can be waited for, and one
    OpenMP thread: children that run at once on two cores would otherwise spend their time
    spinning in each other's way."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HCBENCH_", "MHC_PRE_", "HC_PRE_"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def _harness(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HARNESS), *map(str, args)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _start(log: Path, *args) -> subprocess.Popen:
    """`harness.py ARGS` in the background; stdout and stderr go to LOG.out and LOG.err (files,
    so a chatty child never blocks on a full pipe)."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen([sys.executable, str(HARNESS), *map(str, args)], cwd=ROOT,
                                env=_env(), stdout=out, stderr=err)


# One interpreter imports the suite (about 3 s of torch), then forks a process per command line:
# the fork is the starting gun, so commands meant to run at the same moment do, and a process
# that has only imported torch has no threads yet, so forking it is safe. Each step's command line
# runs in its own child; its stdout and stderr go to LOG.out and LOG.err. In "steps" mode the
# children run one after the other, each sent `signal` `after` seconds after it started, or after
# a file matching the glob `wait` exists, or after the file `wait_lines[0]` has `wait_lines[1]`
# lines; a copy of the records.jsonl (`records`, else the run's under `out`) as the signal left it
# is kept in LOG.records. "{run}" in a command line stands for the one run folder under `out`.
FORKS = r"""
import glob, json, os, shutil, sys, time, traceback
sys.path.insert(0, os.getcwd())
from suite import cli
plan = json.load(open(sys.argv[1]))

def child(argv, log):
    for fd, name in ((1, log + ".out"), (2, log + ".err")):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)

def fork(argv, log):
    pid = os.fork()
    if pid == 0:
        child(argv, log)
    return pid

def the_run():
    found = [d for d in glob.glob(os.path.join(plan.get("out", ""), "*")) if os.path.isdir(d)]
    return found[0] if len(found) == 1 else None

codes = []
if plan["mode"] == "at_once":
    if plan.get("on_second"):       # early in a second, so that "the same second" is what happens
        time.sleep(1.02 - time.time() % 1.0)
    pids = [fork(argv, log) for argv, log in zip(plan["argvs"], plan["logs"])]
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
else:
    for step in plan["steps"]:
        run = the_run()
        pid = fork([a.replace("{run}", run or "") for a in step["argv"]], step["log"])

        def ready():
            if step.get("wait"):
                return bool(glob.glob(step["wait"]))
            if step.get("wait_lines"):
                path, n = step["wait_lines"]
                return os.path.exists(path) and open(path).read().count("\n") >= n
            return True
        status, deadline = None, time.monotonic() + 120
        while not ready() and time.monotonic() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            time.sleep(0.002)
        if status is None:
            time.sleep(step["after"])
            os.kill(pid, step["signal"])
            status = os.waitpid(pid, 0)[1]
        codes.append(os.waitstatus_to_exitcode(status))
        records = step.get("records") or os.path.join(the_run() or "", "records.jsonl")
        if os.path.exists(records):
            shutil.copy(records, step["log"] + ".records")
print(json.dumps(codes))
"""


def _forks(tmp: Path, plan: dict) -> list[int]:
    """Runs FORKS with `plan`; the exit status of each child (minus the signal that ended it)."""
    (tmp / "plan.json").write_text(json.dumps(plan))
    res = subprocess.run([sys.executable, "-c", FORKS, str(tmp / "plan.json")], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def _at_once(tmp: Path, argvs: list[list], on_second: bool = False) -> list[tuple[int, str, str]]:
    """Each command line in its own process, all started at the same moment: (rc, out, err) each."""
    logs = [tmp / f"at-once-{i}" for i in range(len(argvs))]
    codes = _forks(tmp, {"mode": "at_once", "argvs": [[str(a) for a in argv] for argv in argvs],
                         "logs": [str(x) for x in logs], "on_second": on_second})
    out = [(rc, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text())
           for rc, log in zip(codes, logs)]
    for log in logs:
        for ext in (".out", ".err"):
            Path(f"{log}{ext}").unlink()
    (tmp / "plan.json").unlink()
    return out


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content hash ('dir' for folders) and mode bits."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = "dir"
        else:
            with open(p, "rb") as fh:       # in chunks: a test's huge file costs no memory here
                digest = hashlib.file_digest(fh, "sha1").hexdigest()
            out[rel] = digest + oct(p.stat().st_mode)
    return out


def _changes(before: dict, after: dict) -> list[str]:
    return sorted(f"{'+' if k not in before else '-' if k not in after else '~'} {k}"
                  for k in set(before) | set(after) if before.get(k) != after.get(k))


def _error_lines(err: str, most: int = 1) -> list[str]:
    """stderr of a refused command: `most` lines at most, each `error: ...`, no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= most, f"want 1..{most} lines, got {len(lines)}:\n{err[:2000]}"
    assert all(line.startswith("error: ") for line in lines), err
    return lines


def _refused(argv: list[str], capsys, tree: Path, most: int = 1) -> list[str]:
    """Runs the command line here; asserts exit 2, `error:` lines only, and no change under tree."""
    before = _snapshot(tree)
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc}, stderr:\n{err}"
    lines = _error_lines(err, most)
    changed = _changes(before, _snapshot(tree))
    assert not changed, f"a refused command wrote: {changed}"
    return lines


class TookTooLong(BaseException):
    """Raised by `_deadline`; a BaseException so no `except Exception` in the code swallows it."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Stops the code inside after `seconds` (a runaway expansion would otherwise take minutes)."""
    def fire(signum, frame):
        raise TookTooLong(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _records_file(run: Path) -> list[dict]:
    """records.jsonl read strictly: every line whole JSON, the file ending in a newline."""
    text = (run / "records.jsonl").read_text()
    assert text.endswith("\n"), f"torn last line: {text[-200:]!r}"
    return [json.loads(line) for line in text.splitlines()]


def _history(out: Path, run_id: str) -> dict[str, dict]:
    con = sqlite3.connect(f"file:{out / 'history.sqlite'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT case_id, record FROM records WHERE run_id = ?", (run_id,)).fetchall()
        assert con.execute("SELECT COUNT(*) FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0] == 1
    finally:
        con.close()
    return {cid: json.loads(rec) for cid, rec in rows}


def _json_norm(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _assert_history_matches_folder(out: Path, run: Path) -> None:
    folder = {r["case_id"]: _json_norm(r) for r in _records_file(run)}
    assert _history(out, run.name) == folder


def _run_dirs(out: Path) -> list[Path]:
    return sorted(d for d in out.iterdir() if d.is_dir() and not d.name.startswith("."))


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cpu_out(tmp_path_factory) -> Path:
    """An --out folder holding one finished CPU run of two cases (default.yaml's residual ones)
    and its history.sqlite. Tests copy it; nobody writes into it."""
    out = tmp_path_factory.mktemp("cpu") / "out"
    assert cli.main(["run", *CPU_RUN, "--only", "method=residual", "--out", str(out)]) == 0
    (run,) = _run_dirs(out)
    assert len(_records_file(run)) == 2 and (run / "env.json").is_file()
    return out


def _copy_out(cpu_out: Path, dest: Path, history: bool = True) -> Path:
    """A copy of the fixture's --out under dest; its run folder is returned."""
    shutil.copytree(cpu_out, dest / "out",
                    ignore=None if history else shutil.ignore_patterns("history.sqlite"))
    (run,) = _run_dirs(dest / "out")
    return run


def _committed_run() -> Path | None:
    found = sorted(p.parent for p in (ROOT / "results").glob("*/records.jsonl"))
    return found[-1] if found else None


# ================================================================= A. malformed inputs
def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "name: bomb\n" + "\n".join(lines) + "\n"


def _nested(levels: int, inner: str = "1") -> str:
    """`levels` lists inside the top-level mapping (so levels + 1 mappings and lists in all)."""
    return "name: deep\ndescription: " + "[" * levels + inner + "]" * levels + "\n"


def _sweep(n_c: int, n_t: int) -> str:
    return ("name: huge\ndefaults: {method: residual, device: cpu}\nsweep:\n"
            f"  C: [{', '.join(str(i) for i in range(1, n_c + 1))}]\n"
            f"  T: [{', '.join(str(i) for i in range(1, n_t + 1))}]\n")


GOOD = "name: ok\ndefaults: {method: residual, C: 64, T: 64, device: cpu}\n"
# name -> (file text, words the error line must hold, seconds it may take)
MALFORMED = {
    "not YAML": ("name: x\n  - : [\n", ["not valid YAML"], FAST_S),
    "a tab-indented mapping": ("name: x\ndefaults:\n\tC: 1\n", ["not valid YAML"], FAST_S),
    "not UTF-8": (b"name: \xff\xfe\n", ["UTF-8"], FAST_S),
    "a key given twice": ("name: a\nname: b\n" + GOOD.split("\n", 1)[1], ["twice"], FAST_S),
    "an alias bomb (9 levels of 9)": (_bomb(), ["100000", "aliases"], FAST_S),
    "nested 33 deep": (_nested(32), ["nested deeper than 32"], FAST_S),
    "nested 5000 deep": (_nested(5000, ""), ["nested deeper than 32"], FAST_S),
    "one byte over 1 MiB": (GOOD + "#" + "x" * ((1 << 20) - len(GOOD) - 1) + "\n",
                            ["1048576 bytes"], FAST_S),
    "1000 C values x 1000 T values": (_sweep(1000, 1000), ["1000000 cases", "100000"], 1.0),
    "100,000 sweep cases and one include": (_sweep(100, 1000) + "include: [{C: 7, T: 7}]\n",
                                           ["100001 cases"], 1.0),
    "a list as the top level": ("- name: x\n", ["top level must be a mapping"], FAST_S),
    "an unknown top-level key": (GOOD + "sweeps: {C: [1]}\n", ["sweeps: unknown key", "allowed:"], FAST_S),
    "an unknown case field": (GOOD + "sweep: {colour: [red]}\n", ["sweep.colour: unknown field"], FAST_S),
    "a bad dtype": (GOOD + "sweep: {dtype: [fp32, fp8]}\n",
                    ["sweep.dtype[1]", "'fp8'", "bf16", "fp16", "fp32"], FAST_S),
    "a bad method": ("name: m\ndefaults: {method: resnet, C: 64, T: 64}\n",
                     ["defaults.method", "'resnet'", "residual", "hc", "mhc"], FAST_S),
    "n out of range": (GOOD + "sweep: {n: [1, 2, 17]}\n", ["sweep.n[2]", "17", "1..16"], FAST_S),
    "a sweep value that is not a list": (GOOD + "sweep: {C: 64}\n", ["sweep.C", "list"], FAST_S),
    "layers on a site case (include)": (GOOD + "include: [{method: mhc, layers: 2}]\n",
                                        ["layers", "scope site"], FAST_S),
    "heads on a site case (sweep)": (GOOD + "sweep: {heads: [2]}\n", ["heads", "scope site"], FAST_S),
    "no case after exclude": (GOOD + "sweep: {C: [64]}\nexclude: [{C: 64}]\n", ["no cases"], FAST_S),
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_a_malformed_scenario_is_one_error_line_exit_2_and_writes_nothing(what, tmp_path, capsys):
    text, words, budget = MALFORMED[what]
    path = tmp_path / "s.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    start = time.perf_counter()
    with _deadline(budget + 5):
        (line,) = _refused(["run", path, "--out", tmp_path / "out"], capsys, tmp_path)
    took = time.perf_counter() - start
    assert str(path) in line, line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert len(line) < 400 or "allowed:" in line, f"not a short message: {len(line)} chars"
    assert took < budget, f"refused after {took:.2f} s; it may take {budget} s"


def test_every_problem_of_a_file_is_listed_at_once(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\ndefaults: {method: resnet, C: 0, T: 64, dtype: fp8}\n")
    lines = _refused(["run", path, "--out", tmp_path / "out"], capsys, tmp_path, most=3)
    for key in ("defaults.method", "defaults.C", "defaults.dtype"):
        assert sum(f"{key}:" in line for line in lines) == 1, (key, lines)


def test_a_deeply_nested_empty_list_is_as_deep_as_a_full_one(tmp_path, capsys):
    """Nesting counts mappings and lists; whether the innermost holds a value does not change
    how deep the document is. 33 levels with a value inside are refused, so are 33 without."""
    path = tmp_path / "s.yaml"
    path.write_text(_nested(32, ""))
    (line,) = _refused(["run", path, "--out", tmp_path / "out"], capsys, tmp_path)
    assert "nested deeper than 32" in line, line


def test_the_limits_let_through_what_they_allow(tmp_path, capsys):
    """The other side of each limit: a file of exactly 1 MiB, 32 levels of nesting, about half the
    values allowed (through aliases) pass the limits (the last two fail later, on their content)."""
    exact = tmp_path / "exact.yaml"
    exact.write_text(GOOD + "#" + "x" * ((1 << 20) - len(GOOD) - 2) + "\n")
    assert exact.stat().st_size == 1 << 20
    assert cli.main(["list", str(exact)]) == 0
    deep = tmp_path / "deep.yaml"
    deep.write_text(_nested(31))
    half = tmp_path / "half.yaml"
    # 5 levels of 8 aliases: 42,798 values expanded, about 43% of the limit
    half.write_text("name: half\ndescription:\n  - &a0 [" + ", ".join(["v"] * 8) + "]\n" + "".join(
        f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]\n" for i in range(1, 5)))
    for path in (deep, half):
        capsys.readouterr()
        assert cli.main(["list", str(path)]) == 2
        (line,) = _error_lines(capsys.readouterr().err)
        assert "description: must be a string" in line, line


def test_a_site_case_drops_model_fields_that_come_from_defaults(tmp_path, capsys):
    """Documented: from `defaults` a whole-model field is dropped for site cases, so scopes mix."""
    path = tmp_path / "s.yaml"
    path.write_text("name: mix\ndefaults: {method: mhc, C: 256, T: 256, layers: 2, device: cpu}\n"
                    "sweep: {scope: [site, layer]}\n")
    capsys.readouterr()
    assert cli.main(["list", str(path)]) == 0
    assert "2 cases" in capsys.readouterr().out


def test_a_full_size_file_of_plain_values_is_refused_fast(tmp_path, capsys):
    """Within 1 MiB, plain YAML holds about 500,000 values, five times the limit: refusing it
    must not first build all of them (the limits are checked before anything is built)."""
    path = tmp_path / "s.yaml"
    path.write_text("name: flat\ndescription: [" + ",".join(["1"] * 500_000) + "]\n")
    assert path.stat().st_size <= 1 << 20
    start = time.perf_counter()
    with _deadline(FAST_S + 0.5):
        (line,) = _refused(["run", path, "--out", tmp_path / "out"], capsys, tmp_path)
    assert "100000" in line and time.perf_counter() - start < FAST_S


def test_a_scenario_file_far_over_1_mib_is_refused_without_reading_it(tmp_path, capsys):
    """A file of 64 MiB (sparse: it costs no disk) is refused on its size, reading no more of it
    than the limit: a file of gigabytes would otherwise exhaust memory before the one line."""
    path = tmp_path / "s.yaml"
    with open(path, "wb") as fh:
        fh.truncate(64 << 20)
    tracemalloc.start()
    try:
        (line,) = _refused(["run", path, "--out", tmp_path / "out"], capsys, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in line and "1048576" in line, line
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated to refuse it"


# ---------------------------------------------------------------- run folders that cannot be read
BAD_LINES = {
    "a number": ("42", "a number"),
    "null": ("null", "null"),
    "a string": ('"a record"', "a string"),
    "an array": ("[1, 2]", "an array"),
    "broken JSON": ('{"case_id": ', "not a JSON record"),
    "a record without status": (None, "'status'"),
    "an unknown schema": (None, "hcbench.record/99"),
}


def _bad_line(run: Path, what: str) -> str:
    line, _ = BAD_LINES[what]
    if line is not None:
        return line
    rec = json.loads((run / "records.jsonl").read_text().splitlines()[0])
    if what == "a record without status":
        del rec["status"]
    else:
        rec["schema"] = "hcbench.record/99"
    return json.dumps(rec)


def _commands(run: Path, tmp: Path) -> dict[str, list]:
    return {"run --resume": ["run", "--resume", run],
            "run SCENARIO --resume": ["run", *CPU_RUN, "--resume", run],
            "report": ["report", run],
            "compare": ["compare", run, run],
            "publish": ["publish", run, "--to", tmp / "site"]}


@pytest.mark.parametrize("command", ["run --resume", "run SCENARIO --resume", "report", "compare",
                                     "publish"])
@pytest.mark.parametrize("what", list(BAD_LINES))
def test_a_records_line_that_is_not_a_record_is_refused(what, command, cpu_out, tmp_path, capsys):
    """The bad line sits in the middle (a line a writer finished), followed by a good one."""
    run = _copy_out(cpu_out, tmp_path)
    good = (run / "records.jsonl").read_text().splitlines()
    (run / "records.jsonl").write_text("\n".join([good[0], _bad_line(run, what), *good[1:]]) + "\n")
    (line,) = _refused(_commands(run, tmp_path)[command], capsys, tmp_path)
    assert "records.jsonl: line 2" in line and BAD_LINES[what][1] in line, line


ENV_BAD = {"corrupt": "{corrupt", "an array": "[1, 2]", "a string": '"env"', "empty": ""}
@pytest.mark.parametrize("command", ["run --resume", "report",
                                     "compare", "publish"])
@pytest.mark.parametrize("what", list(ENV_BAD))
def test_a_corrupt_env_json_is_refused_before_anything_is_written(what, command, cpu_out, tmp_path,
                                                                  capsys):
    """The folder is a copy from elsewhere: this --out has no history yet, and a refusal must not
    start one."""
    run = _copy_out(cpu_out, tmp_path, history=False)
    (run / "env.json").write_text(ENV_BAD[what])
    (line,) = _refused(_commands(run, tmp_path)[command], capsys, tmp_path)
    assert "env.json" in line, line


def test_resuming_a_folder_without_env_json_is_refused_and_writes_nothing(cpu_out, tmp_path, capsys):
    run = _copy_out(cpu_out, tmp_path, history=False)
    (run / "env.json").unlink()
    (line,) = _refused(["run", "--resume", run], capsys, tmp_path)
    assert "env.json" in line and "cannot be established" in line, line


def test_resuming_a_folder_without_env_json_is_refused(cpu_out, tmp_path, capsys):
    """The refusal itself (its writes are checked above): exit 2, one line, no record added."""
    run = _copy_out(cpu_out, tmp_path)
    (run / "env.json").unlink()
    before = (run / "records.jsonl").read_bytes()
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(run)]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "env.json" in line and "cannot be established" in line, line
    assert (run / "records.jsonl").read_bytes() == before and not (run / "env.json").exists()


def _tear(run: Path) -> tuple[str, bytes]:
    """Replaces the last record by the first half of it, without its newline, as a kill leaves
    it; returns the torn case id and the file as torn."""
    lines = (run / "records.jsonl").read_text().splitlines()
    last = lines.pop()
    torn = ("\n".join(lines) + "\n" + last[:len(last) // 2]).encode()
    (run / "records.jsonl").write_bytes(torn)
    return json.loads(last)["case_id"], torn


@pytest.mark.parametrize("command", ["report", "compare", "publish"])
def test_a_torn_last_line_is_skipped_by_readers(command, cpu_out, tmp_path, capsys):
    run = _copy_out(cpu_out, tmp_path)
    cid, torn = _tear(run)
    capsys.readouterr()
    assert cli.main([str(a) for a in _commands(run, tmp_path)[command]]) == 0
    assert "error" not in capsys.readouterr().err.lower()
    assert (run / "records.jsonl").read_bytes() == torn       # readers skip; only a writer cuts
    if command == "publish":
        published = (tmp_path / "site").rglob("records.jsonl")
        ids = {json.loads(x)["case_id"] for p in published for x in p.read_text().splitlines()}
        assert cid not in ids and len(ids) == 1


def test_a_torn_last_line_is_cut_and_its_case_run_again_on_resume(cpu_out, tmp_path, capsys):
    run = _copy_out(cpu_out, tmp_path)
    want = {r["case_id"] for r in _records_file(run)}
    cid, _ = _tear(run)
    assert cli.main(["run", "--resume", str(run)]) == 0
    got = [r["case_id"] for r in _records_file(run)]
    assert sorted(got) == sorted(want) and cid in got
    _assert_history_matches_folder(run.parent, run)


# name -> (extra command-line options, words the error line must hold)
BAD_OPTIONS = {
    "--set of an unknown field": (["--set", "colour=red"], ["--set.colour: unknown field"]),
    "--set of a bad value": (["--set", "dtype=fp8"], ["--set.dtype", "'fp8'", "bf16", "fp16", "fp32"]),
    "--set without =": (["--set", "T"], ["--set T", "KEY=VALUE"]),
    "--only of an unknown field": (["--only", "colour=red"], ["--only colour=red", "KEY"]),
    "--only that matches nothing": (["--only", "method=nosuch"], ["no case matches"]),
}


@pytest.mark.parametrize("what", list(BAD_OPTIONS))
def test_a_bad_set_or_only_is_one_error_line_and_writes_nothing(what, tmp_path, capsys):
    extra, words = BAD_OPTIONS[what]
    (line,) = _refused(["run", *CPU_RUN, *extra, "--out", tmp_path / "out"], capsys, tmp_path)
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"


@pytest.mark.parametrize("what", ["no such folder", "a file", "an empty folder"])
def test_resuming_what_is_not_a_run_folder_is_refused(what, tmp_path, capsys):
    target = tmp_path / "run"
    if what == "a file":
        target.write_text("mine\n")
    elif what == "an empty folder":
        target.mkdir()
    (line,) = _refused(["run", "--resume", target], capsys, tmp_path)
    assert str(target) in line, line


# ---------------------------------------------------------------- where output goes
def test_out_naming_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("mine\n")
    (line,) = _refused(["run", *CPU_RUN, "--out", tmp_path / "out"], capsys, tmp_path)
    assert str(tmp_path / "out") in line and "file" in line


def test_out_inside_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("mine\n")
    (line,) = _refused(["run", *CPU_RUN, "--out", tmp_path / "f" / "out"], capsys, tmp_path)
    assert str(tmp_path / "f") in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro, ro / "out"):
            (line,) = _refused(["run", *CPU_RUN, "--out", out], capsys, tmp_path)
            assert str(ro) in line
    finally:
        ro.chmod(0o755)


def test_publish_to_a_file_is_refused(cpu_out, tmp_path, capsys):
    run = _copy_out(cpu_out, tmp_path)
    (tmp_path / "site").write_text("mine\n")
    (line,) = _refused(["publish", run, "--to", tmp_path / "site"], capsys, tmp_path)
    assert str(tmp_path / "site") in line


@pytest.mark.parametrize("theirs", ["a file", "an empty folder", "a hidden file", "a bad marker"])
def test_publish_to_a_folder_that_is_not_a_site_is_refused_and_left_alone(theirs, cpu_out, tmp_path,
                                                                          capsys):
    run = _copy_out(cpu_out, tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    if theirs == "a file":
        (site / "index.html").write_text("my page\n")
    elif theirs == "an empty folder":
        (site / "notes").mkdir()
    elif theirs == "a hidden file":
        (site / ".git").write_text("gitdir: elsewhere\n")
    else:       # the marker's name as a folder is not the marker
        (site / ".hcbench-site").mkdir()
        (site / "index.html").write_text("my page\n")
    (line,) = _refused(["publish", run, "--to", site], capsys, tmp_path)
    assert str(site) in line, line


@pytest.mark.parametrize("knobs", [{"MHC_PRE_BLOCK_T": "64"}, {"HC_PRE_CONFIG": "a"},
                                   {"MHC_PRE_BLOCK_T": "64", "HC_PRE_CONFIG": "a"}])
@pytest.mark.parametrize("resume", [False, True])
def test_a_retired_kernel_knob_is_refused(knobs, resume, cpu_out, tmp_path, capsys, monkeypatch):
    """A knob under its old name would be ignored silently, so the run would not be what was asked."""
    run = _copy_out(cpu_out, tmp_path)
    for k, v in knobs.items():
        monkeypatch.setenv(k, v)
    argv = ["run", "--resume", run] if resume else ["run", *CPU_RUN, "--out", tmp_path / "new"]
    lines = _refused(argv, capsys, tmp_path, most=len(knobs))
    assert len(lines) == len(knobs)
    for k in knobs:
        assert any(k in line and "HCBENCH_" in line for line in lines), (k, lines)


def test_a_refusal_in_a_real_process_has_no_traceback_and_exit_2(tmp_path):
    """The same promise from the outside: the interpreter's exit status and stderr."""
    (tmp_path / "s.yaml").write_text(_bomb())
    res = _harness("run", tmp_path / "s.yaml", "--out", tmp_path / "out", timeout=60)
    assert res.returncode == 2
    (line,) = _error_lines(res.stderr)
    assert "aliases" in line and sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


# ================================================================= B. concurrent and killed runs
def _wait_for(cond, what: str, timeout: float = 90, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if proc is not None and proc.poll() is not None:
            assert cond(), f"the child ended (exit {proc.returncode}) before {what}"
            return
        time.sleep(0.01)


def test_two_resumes_at_once_one_is_refused_and_nothing_is_lost(cpu_out, tmp_path, capsys):
    run = _copy_out(cpu_out, tmp_path)
    want = _cpu_case_ids()
    first = _start(tmp_path / "first", "run", *CPU_RUN, "--resume", run)
    try:
        # Printed once the first holds the folder (it has taken its lock and read its records).
        _wait_for(lambda: "resuming" in Path(f"{tmp_path}/first.out").read_text(),
                  "the first resume to start", proc=first)
        capsys.readouterr()
        rc = cli.main(["run", *CPU_RUN, "--resume", str(run)])
        err = capsys.readouterr().err
        assert first.poll() is None, "the first resume ended before the second tried: nothing raced"
        assert rc == 2, f"the second resume ran (exit {rc}) while the first was writing"
        (line,) = _error_lines(err)
        assert "another process is writing" in line, line
        assert first.wait(timeout=120) == 0, Path(f"{tmp_path}/first.err").read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    records = _records_file(run)
    assert sorted(r["case_id"] for r in records) == sorted(want)
    _assert_history_matches_folder(run.parent, run)


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    out = tmp_path / "out"
    n = 6
    argv = ["run", *CPU_RUN, "--only", "method=residual", "--only", "mode=fwd", "--out", out]
    results = _at_once(tmp_path, [argv] * n, on_second=True)
    assert [rc for rc, _, _ in results] == [0] * n, [err[-500:] for _, _, err in results]
    dirs = _run_dirs(out)
    assert len(dirs) == n, [d.name for d in dirs]
    stamps = [d.name.split("-")[0] for d in dirs]
    assert len(set(stamps)) < n, f"no two runs started in the same second: {stamps}"
    (cid,) = _cpu_case_ids("method=residual", "mode=fwd")
    for d in dirs:
        assert [r["case_id"] for r in _records_file(d)] == [cid]
        _assert_history_matches_folder(out, d)


def _whole_but_the_last(text: str) -> list[dict]:
    """What a kill may leave in records.jsonl: whole records, and at most a torn last line."""
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def killed(cpu_out, tmp_path_factory):
    """SIGKILL three times at seeded random moments (a new run, then two resumes of it); and a
    folder whose last line is torn, resumed and killed just after its next record. One forking
    interpreter runs both; the tests below look at what was left."""
    tmp = tmp_path_factory.mktemp("killed")
    rng = random.Random(20261207)
    out = tmp / "out"
    # The first kill comes once the folder can be resumed (its cases saved); before that it is
    # an empty folder, and a new run is what continues it.
    steps = [{"argv": ["run", *CPU_RUN, "--out", str(out)], "wait": f"{out}/*/scenarios/*.json",
              "after": rng.uniform(0.0, 2.0)}]
    steps += [{"argv": ["run", "--resume", "{run}"], "after": rng.uniform(0.0, 2.0)} for _ in range(2)]
    torn_run = _copy_out(cpu_out, tmp / "torn")
    torn_cid, _ = _tear(torn_run)
    steps.append({"argv": ["run", *CPU_RUN, "--resume", str(torn_run)], "after": 0.0,
                  "wait_lines": [str(torn_run / "records.jsonl"), 2],
                  "records": str(torn_run / "records.jsonl")})
    for i, step in enumerate(steps):
        step.update(signal=int(signal.SIGKILL), log=str(tmp / f"kill{i}"))
    codes = _forks(tmp, {"mode": "steps", "out": str(out), "steps": steps})
    return {"out": out, "steps": steps, "codes": codes, "torn_run": torn_run, "torn_cid": torn_cid}


def test_a_run_killed_at_random_moments_and_resumed_has_every_case_once(killed):
    out, steps, codes = killed["out"], killed["steps"][:3], killed["codes"]
    (run,) = _run_dirs(out)
    for step in steps:
        left = Path(step["log"] + ".records")
        _whole_but_the_last(left.read_text() if left.exists() else "")
    assert cli.main(["run", "--resume", str(run)]) == 0
    records = _records_file(run)
    ids = [r["case_id"] for r in records]
    assert sorted(ids) == sorted(_cpu_case_ids()), f"exits {codes}: {ids}"
    assert all(r["status"] == "ok" for r in records)
    _assert_history_matches_folder(out, run)


def test_a_resume_cuts_a_torn_line_before_it_appends(killed, capsys):
    """Had the resume appended after the torn half line, its first record would be glued to it,
    and the folder unreadable once the resume is killed (no closing rewrite to hide it)."""
    run, step = killed["torn_run"], killed["steps"][3]
    left = _whole_but_the_last(Path(step["log"] + ".records").read_text())
    assert len(left) >= 2, "the resume was killed before it recorded anything: nothing tested"
    capsys.readouterr()
    assert cli.main(["report", str(run)]) == 0, capsys.readouterr().err
    assert cli.main(["run", "--resume", str(run)]) == 0
    ids = [r["case_id"] for r in _records_file(run)]
    assert sorted(ids) == sorted(_cpu_case_ids()) and killed["torn_cid"] in ids
    _assert_history_matches_folder(run.parent, run)


@pytest.mark.parametrize("history", ["missing", "a record short"])
def test_a_resume_brings_the_history_up_to_date_with_the_folder(history, cpu_out, tmp_path):
    """The moment a kill may fall between a record's line and its history row, made certain: the
    history lost (a folder copied from elsewhere) or short of the last record."""
    run = _copy_out(cpu_out, tmp_path, history=history != "missing")
    if history == "a record short":
        last = _records_file(run)[-1]["case_id"]
        con = sqlite3.connect(run.parent / "history.sqlite")
        with con:
            con.execute("DELETE FROM records WHERE case_id = ?", (last,))
        con.close()
    assert cli.main(["run", "--resume", str(run)]) == 0
    _assert_history_matches_folder(run.parent, run)


def test_sigterm_keeps_what_finished_writes_the_report_and_exits_143(tmp_path):
    out = tmp_path / "out"
    proc = _start(tmp_path / "t", "run", *CPU_RUN, "--out", out)
    try:
        def one_record():
            dirs = _run_dirs(out) if out.is_dir() else []
            return dirs and (dirs[0] / "records.jsonl").is_file() and \
                (dirs[0] / "records.jsonl").read_text().count("\n") >= 1
        _wait_for(one_record, "a first record", proc=proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = Path(f"{tmp_path}/t.err").read_text()
    (run,) = _run_dirs(out)
    assert rc == 143, err
    assert "Traceback" not in err
    records = _records_file(run)
    assert 1 <= len(records) <= len(_cpu_case_ids())
    assert f"--resume {run}" in err, err
    assert (run / "report.md").is_file()
    assert f"{len(records)} ok, 0 skipped, 0 failed" in (run / "report.md").read_text()
    # and it resumes to the end, the history with it (whatever moment the signal hit, below)
    assert cli.main(["run", "--resume", str(run)]) == 0
    assert sorted(r["case_id"] for r in _records_file(run)) == sorted(_cpu_case_ids())
    _assert_history_matches_folder(out, run)


def test_a_sigterm_just_after_a_record_is_synced_still_reaches_the_history(tmp_path, monkeypatch):
    """SIGTERM stops the run the orderly way (exit 143, the store closed), so what the folder
    keeps the history gets too. The signal is sent as the first record's line is synced, the
    moment a signal from outside hits whenever it lands during that fsync."""
    real, fired = os.fsync, []

    def fsync(fd):
        real(fd)
        if not fired and os.readlink(f"/proc/self/fd/{fd}").endswith("/records.jsonl"):
            fired.append(fd)
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    assert cli.main(["run", *CPU_RUN, "--only", "method=residual", "--out", str(out)]) == 143
    assert fired
    (run,) = _run_dirs(out)
    assert len(_records_file(run)) == 1
    _assert_history_matches_folder(out, run)


# ================================================================= C. publishing
class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        self.targets += [v for k, v in attrs if k in ("href", "src", "xlink:href") and v]


def _broken_links(site: Path) -> list[str]:
    broken = []
    root = site.resolve()
    for page in sorted(site.rglob("*.html")):
        parser = _Links()
        parser.feed(page.read_text())
        for target in parser.targets:
            parts = urlsplit(target)
            if parts.scheme or parts.netloc or not parts.path:
                continue        # another site, a mailto:, or an anchor in this page
            path = (page.parent / unquote(parts.path)).resolve()
            if not path.is_relative_to(root) or not path.exists():
                broken.append(f"{page.relative_to(site)} -> {target}")
    return broken


def _publish_sources(cpu_out: Path) -> list[Path]:
    (run,) = _run_dirs(cpu_out)
    committed = _committed_run()
    return [run] + ([committed] if committed else [])


def test_publish_leaves_files_beside_the_site_alone(cpu_out, tmp_path, capsys):
    runs = _publish_sources(cpu_out)
    site = tmp_path / "site"
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "site.bak").mkdir()
    (tmp_path / "site.bak" / "index.html").write_text("an old copy\n")
    (tmp_path / ".site.new-mine").mkdir()        # named like publish's own temporary folders
    (tmp_path / ".site.new-mine" / "x").write_text("mine\n")
    before = _snapshot(tmp_path)
    for _ in range(2):
        assert cli.main(["publish", *map(str, runs), "--to", str(site)]) == 0
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith(("notes", "site.bak", ".site.new-mine"))} \
        == before
    assert not _broken_links(site)


def test_a_file_the_user_put_in_the_site_survives_a_republish(cpu_out, tmp_path, capsys):
    runs = [str(r) for r in _publish_sources(cpu_out)]
    site = tmp_path / "site"
    assert cli.main(["publish", *runs, "--to", str(site)]) == 0
    (site / "CNAME").write_text("bench.example.org\n")
    (site / "notes").mkdir()
    (site / "notes" / "read-me.md").write_text("mine\n")
    before = _snapshot(site)
    capsys.readouterr()
    rc = cli.main(["publish", *runs, "--to", str(site)])
    err = capsys.readouterr().err
    if rc == 2:         # refused: one line, the site as it was
        _error_lines(err)
        assert _snapshot(site) == before
    else:
        assert rc == 0, err
    assert (site / "CNAME").read_text() == "bench.example.org\n"
    assert (site / "notes" / "read-me.md").read_text() == "mine\n"


@pytest.fixture(scope="module")
def three_publishes(cpu_out, tmp_path_factory):
    """Three publishes of the same runs into one fresh --to, released at the same moment, and a
    reference site published alone from the same runs."""
    tmp = tmp_path_factory.mktemp("three")
    runs = [str(r) for r in _publish_sources(cpu_out)]
    results = _at_once(tmp, [["publish", *runs, "--to", str(tmp / "site")]] * 3)
    assert cli.main(["publish", *runs, "--to", str(tmp / "reference")]) == 0
    return tmp, results


def test_three_publishes_at_once_leave_one_whole_site(three_publishes):
    tmp, results = three_publishes
    for rc, _, err in results:
        assert rc in (0, 2), err
        if rc == 2:
            _error_lines(err)
    assert any(rc == 0 for rc, _, _ in results)
    site, ref = tmp / "site", tmp / "reference"
    assert _snapshot(site) == _snapshot(ref), "the site is not what one publish of the runs writes"
    assert not _broken_links(site), _broken_links(site)[:10]
    leftovers = sorted(p.name for p in tmp.iterdir() if p.name not in ("site", "reference")
                       and not p.name.endswith(".lock"))
    assert not leftovers, f"temporary folders left beside the site: {leftovers}"


def test_three_publishes_at_once_take_turns(three_publishes):
    _, results = three_publishes
    assert [rc for rc, _, _ in results] == [0, 0, 0], [err.strip() for _, _, err in results]


def test_record_fields_that_look_like_paths_stay_inside_the_site(cpu_out, tmp_path, capsys):
    deep = tmp_path / "a" / "b" / "c"
    run = _copy_out(cpu_out, deep)
    records = _records_file(run)
    evil = ["../../../../escaped", "/tmp/escaped-abs", "..", "r/../../../escaped2", "x/" * 100 + "y"]
    lines = []
    for i, cid in enumerate(evil):
        rec = dict(records[i % len(records)], case_id=cid, scenario="../../../escaped-scenario")
        lines.append(json.dumps(rec))
    (run / "records.jsonl").write_text("\n".join(lines) + "\n")
    site = deep / "site"

    def outside():      # the site's own lock file beside it is publish's
        return {k: v for k, v in _snapshot(tmp_path).items()
                if not k.startswith("a/b/c/site") and k != "a/b/c/.site.lock"}
    before = outside()
    capsys.readouterr()
    assert cli.main(["publish", str(run), "--to", str(site)]) == 0, capsys.readouterr().err
    assert not _changes(before, outside()), _changes(before, outside())
    assert not list(Path("/tmp").glob("escaped*"))
    for p in site.rglob("*"):
        assert p.resolve().is_relative_to(site.resolve()) and not p.is_symlink(), p
        assert "escaped" not in p.name or p.parent.resolve().is_relative_to(site.resolve())
    assert not _broken_links(site), _broken_links(site)[:10]
