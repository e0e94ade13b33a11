"""Where runs go: one folder per run, and the SQLite history every run is appended to.

A run folder holds records.jsonl (one record per case), env.json, scenario copies and report.md.
records.jsonl grows by one synced line per case (RunStore); every other file is written whole to
a temporary file and renamed over the old one, so a crash or Ctrl-C leaves either the old or the
new version, never half a file. One process at a time writes
a run folder: it holds the folder's lock (`lock_beside`), and a second writer stops with
RunLocked. The history lives next to
the run folders (results/history.sqlite) and each record is upserted as soon as it exists.
"""
from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from suite.core import record as record_schema
from suite.core.guard import now_utc
from suite.core.scenario import Case


class RunLocked(Exception):
    """Another process is writing this run folder."""


def new_record(case, scenario: str, gpu_uuid: str | None, env: dict | None = None) -> dict:
    """A case's record before it runs (status ok until something says otherwise): every field
    of the format present, so skipped and failed records read like measured ones. `env` (the
    run's suite.measure.env.capture) gives the code commit and the kernel settings it ran with."""
    env = env or {}
    return {"schema": record_schema.SCHEMA, "case_id": case.case_id, "case": case.to_dict(),
            "scenario": scenario, "status": "ok", "reason": None, "time_ms": None,
            "bytes": None, "flops": None, "gbps": None, "tflops": None,
            "pct_of_copy": None, "peak_mem_bytes": None, "check": None,
            "gpu_uuid": gpu_uuid if case.device == "cuda" else None, "started_utc": now_utc(),
            "code": env.get("code"), "kernel_settings": env.get("kernel_settings")}


HISTORY_NAME = "history.sqlite"
HISTORY_WAIT_S = 5.0     # how long a write waits for another process's hold on the history


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())     # mkstemp makes 0600; results are shared files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def umask() -> int:
    """The process's umask (files the suite makes are shared: their mode follows it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class RunFolderError(ValueError):
    """A run folder's file is not what this version writes: one line naming the file."""


def read_records(run_dir: Path) -> list[dict]:
    """The records of a run folder, one per case (its last line), each checked
    (suite.core.record.problem); RunFolderError on the first line that is not a record."""
    path = Path(run_dir) / "records.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()         # torn: a writer was killed while writing it (RunStore cuts it off)
    records: dict[str, dict] = {}
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunFolderError(f"{path}: line {i}: not a JSON record ({exc.msg})") from None
            why = record_schema.problem(record)
            if why:
                raise RunFolderError(f"{path}: line {i}: not a record: {why}")
            records.pop(record["case_id"], None)    # a case recorded again: its last line counts
            records[record["case_id"]] = record
    return list(records.values())


def read_env(run_dir: Path) -> dict:
    """A run folder's env.json ({} where there is none); RunFolderError when it is not a JSON
    object."""
    path = Path(run_dir) / "env.json"
    if not path.exists():
        return {}
    try:
        env = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(env, dict):
        raise RunFolderError(f"{path}: not a JSON object but {type(env).__name__}")
    return env


def not_run(run_dir: Path, records: list[dict]) -> list[dict]:
    """The cases a run folder's saved scenarios list without a record (the run stopped before
    them, or a filter left them out), each {case_id, case, scenario}, once each."""
    seen = {r["case_id"] for r in records}
    out = []
    for f in sorted((Path(run_dir) / "scenarios").glob("*.json")):
        try:
            doc = json.loads(f.read_text())
            for c in doc.get("cases", []):
                cid = Case(**c).case_id
                if cid not in seen:
                    seen.add(cid)
                    out.append({"case_id": cid, "case": c, "scenario": doc.get("name")})
        except (ValueError, TypeError, KeyError, AttributeError):
            continue    # a saved list we cannot read hides nothing that ran: records still show
    return out


def device_model(env: dict) -> str:
    """The device a run's times belong to, from its env.json: the first GPU's model name, else
    "CPU <model>". Runs join across time and are compared only within one device model."""
    gpus = env.get("gpus") or []
    if gpus and isinstance(gpus[0], dict) and gpus[0].get("name"):
        return gpus[0]["name"]
    cpu = (env.get("cpu") or {}).get("model")
    return f"CPU {cpu}" if cpu else "unknown device"


def new_run_dir(root: Path, device_label: str) -> Path:
    """A new, empty run folder. Processes that start in the same second each get their own:
    mkdir is the atomic test (a name another process took raises, and the next suffix is tried)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:32]
    Path(root).mkdir(parents=True, exist_ok=True)
    for suffix in range(1, 10_000):
        path = Path(root) / (f"{stamp}-{host}-{device_label}" + (f"-{suffix}" if suffix > 1 else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{root}: no free run folder name for {stamp}-{host}-{device_label}")


def lock_beside(folder: Path, wait_s: float = 0.0) -> int:
    """Takes a folder's lock: an flock on `.<folder>.lock` beside it (outside the folder, so
    that committing the folder never takes the lock file along), released when the holder closes
    it or exits, also when killed. While another process holds it, waits up to `wait_s` seconds
    (saying so once on stderr), then raises RunLocked. A run folder does not wait (two writers of
    one run are a mistake); a published site does (publishes take turns)."""
    folder = Path(folder)
    fd = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise
        if time.monotonic() >= deadline:
            os.close(fd)
            waited = f" for {wait_s:.0f} s" if wait_s else ""
            raise RunLocked(f"{folder}: another process is writing this folder (it holds "
                            f".{folder.name}.lock){waited}; wait for it to finish, or write into "
                            "another folder")
        if not said:
            print(f"{folder}: another process is writing this folder; waiting for it (up to "
                  f"{wait_s:.0f} s)", file=sys.stderr)
            said = True
        time.sleep(0.1)


HISTORY_EVERY_S = 2.0       # the most the history lags behind a running folder


class RunStore:
    """The records of one run. Each record is appended to records.jsonl as one line and synced
    to disk as soon as it is final, so a run of many cases costs one line per case, not a
    rewrite of the file. A kill can only leave the line being written torn: the next writer cuts
    it off, and readers skip it. A case recorded twice (a resumed retry) keeps its last line;
    `close` folds the file back to one line per case. The store holds the run folder's lock
    from creation to `close`, so two writers never interleave, and on opening it brings the
    history up to date with the folder (the folder is the truth, the history its index). The
    history takes new records at most every HISTORY_EVERY_S and at `close`."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock_beside(self.dir)
        self._path = self.dir / "records.jsonl"
        _cut_torn_tail(self._path)
        self._by_id: dict[str, dict] = {r["case_id"]: r for r in read_records(self.dir)}
        self._lines = _count_lines(self._path)
        self._fh = None
        self.history = History(self.dir.parent / HISTORY_NAME)
        self._pending: list[dict] = list(self._by_id.values())
        self._indexed: set[str] = set()       # case ids whose newest record the history has
        self._deferred = False
        self._indexed_at = 0.0
        if self._pending:
            self._index()

    @property
    def records(self) -> list[dict]:
        return list(self._by_id.values())

    @property
    def run_id(self) -> str:
        return self.dir.name

    def add(self, record: dict) -> None:
        self._indexed.discard(record["case_id"])
        self._by_id.pop(record["case_id"], None)
        self._by_id[record["case_id"]] = record
        if self._fh is None:
            self._fh = open(self._path, "a")
        self._fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._lines += 1
        self._pending.append(record)
        # The history is an index of the folder: a few seconds behind it costs nothing (close and
        # every resume bring it up to date), while a SQLite commit per case cost more syncs than
        # the record itself.
        if time.monotonic() - self._indexed_at >= HISTORY_EVERY_S:
            self._index()

    def index_run(self, env: dict, scenario_paths: list[str]) -> None:
        """The run's row in the history (its environment and scenarios), or a warning when
        another process holds the history: the run goes on, and a resume of it adds it."""
        try:
            self.history.add_run(self.run_id, env, scenario_paths, self.dir)
        except sqlite3.OperationalError as exc:
            if not _held_elsewhere(exc):
                raise
            print(f"warning: {self.history.path} is locked by another process; this run is "
                  "indexed there when it is resumed", file=sys.stderr)
            self._deferred = True

    def _index(self) -> None:
        """Writes the pending records into the history; while another process holds the
        database they wait for the next case (the folder already has them)."""
        self._indexed_at = time.monotonic()
        try:
            self.history.add_records(self.run_id, self._pending)
        except sqlite3.OperationalError as exc:
            if not _held_elsewhere(exc):
                raise
            if not self._deferred:
                print(f"warning: {self.history.path} is locked by another process; its records "
                      "are written there later (the run folder has them now)", file=sys.stderr)
            self._deferred = True
            return
        self._indexed.update(r["case_id"] for r in self._pending)
        self._pending = []

    def close(self) -> None:
        # Every record of the folder that the history lacks, not only the queued ones: a signal
        # between a line's fsync and its queueing must not leave the history short.
        self._pending = [r for cid, r in self._by_id.items() if cid not in self._indexed]
        if self._pending:
            self._index()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._lock is None:
            return
        if self._lines != len(self._by_id):     # a case recorded twice: one line per case again
            atomic_write(self._path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n"
                                             for r in self._by_id.values()))
            self._lines = len(self._by_id)
        os.close(self._lock)
        self._lock = None


def _held_elsewhere(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds the database."""
    return "locked" in str(exc) or "busy" in str(exc)


def _cut_torn_tail(path: Path) -> None:
    """Cuts a last line that a killed writer left without its newline."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        fh.truncate(data.rfind(b"\n") + 1)
        fh.flush()
        os.fsync(fh.fileno())


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


_SQLITE_TYPES = {"text": "TEXT", "int": "INTEGER", "real": "REAL", "bool": "INTEGER",
                 "time": "TEXT"}


class History:
    """results/history.sqlite: runs and records across every run on this machine or share. The
    records table holds suite.core.record's flat columns and the whole record as JSON; a table
    made by an older version is rebuilt from that JSON the first time it is opened."""

    RECORD_COLUMNS = ("run_id",) + record_schema.NAMES + ("record",)
    RUNS_SQL = ("CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, started_utc TEXT, "
                "host TEXT, gpu TEXT, scenarios TEXT, path TEXT, env TEXT)")

    @staticmethod
    def records_sql(table: str) -> str:
        return (f"CREATE TABLE IF NOT EXISTS {table} (run_id TEXT NOT NULL, "
                + ", ".join(f'"{n}" {_SQLITE_TYPES[k]}' for n, k in record_schema.COLUMNS)
                + ", record TEXT, PRIMARY KEY (run_id, case_id))")

    def __init__(self, path: Path):
        self.path = Path(path)

    def _connect(self):
        con = sqlite3.connect(self.path, timeout=HISTORY_WAIT_S)
        have = [row[1] for row in con.execute("PRAGMA table_info(records)")]
        if have and tuple(have) != self.RECORD_COLUMNS:
            self._rebuild(con)
        con.execute(self.RUNS_SQL)
        con.execute(self.records_sql("records"))
        return con

    def _rebuild(self, con) -> None:
        """Re-projects every stored record into the current columns: a new table is filled,
        then swapped for the old one in the same transaction, so a crash leaves the old one."""
        rows = con.execute("SELECT run_id, record FROM records").fetchall()
        con.execute("DROP TABLE IF EXISTS records_new")
        con.execute(self.records_sql("records_new"))
        with con:
            for run_id, text in rows:
                self._insert(con, run_id, json.loads(text), "records_new")
            con.execute("DROP TABLE records")
            con.execute("ALTER TABLE records_new RENAME TO records")

    def _insert(self, con, run_id: str, r: dict, table: str = "records") -> None:
        row = record_schema.flat(r)
        marks = ",".join("?" * len(self.RECORD_COLUMNS))
        con.execute(f"INSERT OR REPLACE INTO {table} VALUES ({marks})",
                    (run_id, *(row[n] for n in record_schema.NAMES),
                     json.dumps(r, sort_keys=True, default=str)))

    def add_run(self, run_id: str, env: dict, scenarios: list[str], path: Path) -> None:
        gpu = env["gpus"][0]["name"] if env.get("gpus") else "cpu"
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?)",
                        (run_id, env.get("captured_utc"), env.get("host"), gpu,
                         json.dumps(scenarios), str(path), json.dumps(env, default=str)))
        con.close()

    def add_record(self, run_id: str, r: dict) -> None:
        self.add_records(run_id, [r])

    def add_records(self, run_id: str, records: list[dict]) -> None:
        with self._connect() as con:
            for r in records:
                self._insert(con, run_id, r)
        con.close()


def merge_run_copies(run_dir: Path, copies: list[Path]) -> tuple[int, int]:
    """Folds copies of one run folder, each resumed elsewhere (e.g. separate device calls that
    each started from the committed folder), back into it. A case's record is added when the
    folder lacks it, or replaces one that is not ok with one that is; the saved scenario case
    lists become their union. Returns (records added, records replaced)."""
    run_dir = Path(run_dir)
    lock = lock_beside(run_dir)
    try:
        counts = _merge_into(run_dir, copies)
        _sync_history(run_dir)
        return counts
    finally:
        os.close(lock)


def _sync_history(run_dir: Path) -> None:
    """The history beside a folder brought up to date with it (its run row and every record), or
    a warning while another process holds it: the folder has the records, and the next resume
    or merge adds them."""
    history = History(run_dir.parent / HISTORY_NAME)
    try:
        env = read_env(run_dir)
        if env:
            paths = [json.loads(f.read_text()).get("path", f.stem)
                     for f in sorted((run_dir / "scenarios").glob("*.json"))]
            history.add_run(run_dir.name, env, paths, run_dir)
        history.add_records(run_dir.name, read_records(run_dir))
    except sqlite3.OperationalError as exc:
        if not _held_elsewhere(exc):
            raise
        print(f"warning: {history.path} is locked by another process; the merged records are "
              "written there by the next resume or merge of this folder", file=sys.stderr)


def _merge_into(run_dir: Path, copies: list[Path]) -> tuple[int, int]:
    records = {r["case_id"]: r for r in read_records(run_dir)}
    added = replaced = 0
    for copy in map(Path, copies):
        for r in read_records(copy):
            old = records.get(r["case_id"])
            if old is None:
                added += 1
            elif old.get("status") != "ok" and r.get("status") == "ok":
                replaced += 1
            else:
                continue
            records[r["case_id"]] = r
        for saved in sorted((copy / "scenarios").glob("*.json")):
            mine = run_dir / "scenarios" / saved.name
            theirs = json.loads(saved.read_text())
            if mine.exists():
                doc = json.loads(mine.read_text())
                have = {json.dumps(c, sort_keys=True) for c in doc["cases"]}
                doc["cases"] += [c for c in theirs["cases"] if json.dumps(c, sort_keys=True) not in have]
            else:
                doc = theirs
            write_json(mine, doc)
    atomic_write(run_dir / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records.values()))
    return added, replaced
