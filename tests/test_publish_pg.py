"""Publishing to a real PostgreSQL: Debian's postgresql (initdb, pg_ctl) started on a loopback port
in a temporary data directory, trust authentication (one role, PW_ROLE, logs in with a password),
stopped at the end. If the server binaries are missing or the server cannot start, the tests that
need it skip with the reason; the address and timeout checks that need no server still run.
psycopg is an optional dependency: when it is not importable the set-up installs psycopg[binary]
with pip into a cache folder (about 5 s once); without network it skips.
"""
from __future__ import annotations

import glob
import importlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from suite.cli import main
from suite.core import record as record_schema
from suite.publish import postgres as publish_pg
from suite.publish.published import PublishError, load_runs
from tests.test_publish_pg_board import BOARD, DISTRIBUTED, board_queries, distributed_records

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "publish"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hcbench" / "pydeps"
PW_ROLE = "hcbench_pw"
SECRET = "p@ss/w#rd?:x"             # every character that ends a part of a URL
TIMEOUT_ENV = "HCBENCH_PG_STATEMENT_TIMEOUT_S"
_DATABASES = itertools.count()


def _psycopg():
    try:
        return importlib.import_module("psycopg")
    except ImportError:
        pass
    if str(CACHE) not in sys.path:
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              "--target", str(CACHE), "psycopg[binary]"], check=False, capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            pytest.skip("psycopg is not installed and pip could not install it: "
                        + (res.stderr.strip().splitlines() or ["?"])[-1])
        sys.path.insert(0, str(CACHE))
    importlib.invalidate_caches()
    return importlib.import_module("psycopg")


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url():
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not found: apt-get install -y postgresql")
    _psycopg()
    # initdb refuses to run as root: as root, run the server as Debian's postgres user.
    as_user = []
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root and runuser is missing: cannot start PostgreSQL")
        try:
            import pwd
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="hcbench-pg-"))
    if as_user:
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data, port = base / "data", _free_port()
    res = subprocess.run(as_user + [initdb, "-D", str(data), "-U", "hcbench", "--auth=trust", "-E", "UTF8"],
                         check=False, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"initdb failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    # One role logs in with a password (SCRAM), so authentication failures can be provoked; every
    # other role is trusted. The file keeps its owner (the server's user) when rewritten.
    (data / "pg_hba.conf").write_text(f"host all {PW_ROLE} 127.0.0.1/32 scram-sha-256\n"
                                      "local all all trust\nhost all all 127.0.0.1/32 trust\n")
    res = subprocess.run(as_user + [pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "-o",
                                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"],
                         check=False, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        log = (base / "log").read_text()[-300:] if (base / "log").exists() else res.stderr
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {log.strip()}")
    try:
        yield f"postgresql://hcbench@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       check=False, capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _count(url: str, sql: str) -> int:
    psycopg = _psycopg()
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchone()[0]


def test_publish_twice_does_not_duplicate(pg_url, capsys):
    runs = load_runs([FIXTURE])
    n_records = sum(len(r.records) for r in runs)
    assert main(["publish", str(FIXTURE), "--to", pg_url]) == 0
    assert f"({n_records} new)" in capsys.readouterr().out
    assert main(["publish", str(FIXTURE), "--to", pg_url]) == 0
    assert "(0 new)" in capsys.readouterr().out
    assert _count(pg_url, "SELECT count(*) FROM hcbench_runs") == len(runs)
    assert _count(pg_url, "SELECT count(*) FROM hcbench_records") == n_records
    assert _count(pg_url, "SELECT count(*) FROM hcbench_records WHERE status = 'failed' "
                          "AND reason LIKE 'check failed%'") == 3    # one per site run
    samples = _count(pg_url, "SELECT max(jsonb_array_length(record->'time_ms'->'samples')) FROM hcbench_records")
    assert samples == 40


def test_refused_connection_and_bad_url_are_one_line_and_keep_local_files(pg_url, tmp_path, capsys):
    site = tmp_path / "site"
    assert main(["publish", str(FIXTURE / "run-a1"), "--to", str(site)]) == 0
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    records = (FIXTURE / "run-a1" / "records.jsonl").read_bytes()
    capsys.readouterr()
    refused = f"postgresql://hcbench@127.0.0.1:{_free_port()}/postgres"
    for url in (refused, "postgresql://hcbench@127.0.0.1:notaport/db", "postgresql:///nohost"):
        assert main(["publish", str(FIXTURE / "run-a1"), "--to", url]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert {p: p.read_bytes() for p in site.rglob("*") if p.is_file()} == before
    assert (FIXTURE / "run-a1" / "records.jsonl").read_bytes() == records


def _fresh_db(pg_url: str, owner: str | None = None) -> str:
    """The address of a new, empty database on the test server."""
    psycopg = _psycopg()
    name = f"hcbench_t{next(_DATABASES)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" + (f" OWNER {owner}" if owner else ""))
    return pg_url.rsplit("/", 1)[0] + "/" + name


def _run_copy(tmp_path: Path, src: str, name: str, gpu: str | None = None, records=None,
              scale: float = 1.0) -> Path:
    """A run folder made from a fixture run: another GPU name, other records, slower medians."""
    out = tmp_path / name
    shutil.copytree(FIXTURE / src, out)
    env = json.loads((out / "env.json").read_text())
    if gpu:
        env["gpus"][0]["name"] = gpu
    (out / "env.json").write_text(json.dumps(env))
    if records is None:
        records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    for r in records:
        if r.get("time_ms") and r["time_ms"].get("median") is not None:
            r["time_ms"] = {**r["time_ms"], "median": r["time_ms"]["median"] * scale}
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def _leaks(text: str, secrets: list[str]) -> list[str]:
    """Every 4-character piece of a secret that shows in `text`."""
    return sorted({s[i:i + 4] for s in secrets for i in range(max(len(s) - 3, 1))
                   if s[i:i + 4] in text})


@pytest.mark.parametrize("stall", ["lock", "sleep"])
def test_a_stalled_server_fails_the_publish_within_the_timeout(pg_url, monkeypatch, capsys, stall):
    """Another session holding the records table, or a statement the server never finishes: the
    publish ends after HCBENCH_PG_STATEMENT_TIMEOUT_S with one error line, exit 2, and nothing
    of it stays in the database."""
    psycopg = _psycopg()
    url = _fresh_db(pg_url)
    assert main(["publish", str(FIXTURE / "run-a1"), "--to", url]) == 0
    capsys.readouterr()
    holder = psycopg.connect(url)
    if stall == "lock":     # the transaction stays open, so the lock stays held
        holder.execute("LOCK TABLE hcbench_records IN ACCESS EXCLUSIVE MODE")
    else:
        holder.execute("CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS "
                       "$$ BEGIN PERFORM pg_sleep(600); RETURN NEW; END $$")
        holder.execute("CREATE TRIGGER stall BEFORE INSERT ON hcbench_records "
                       "FOR EACH ROW EXECUTE FUNCTION stall()")
        holder.commit()
    monkeypatch.setenv(TIMEOUT_ENV, "1")
    result = {}

    def publish():
        t0 = time.monotonic()
        result["rc"] = main(["publish", str(FIXTURE / "run-a2"), "--to", url])
        result["s"] = time.monotonic() - t0

    worker = threading.Thread(target=publish, daemon=True)
    worker.start()
    worker.join(20)
    hung = worker.is_alive()
    # a publish that hangs is ended here, so the checks below report it rather than wait on it
    holder.rollback()
    holder.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    holder.rollback()
    worker.join(60)
    holder.close()
    assert not hung, "the publish waited past its statement timeout"
    err = capsys.readouterr().err.strip().splitlines()
    assert result["rc"] == 2 and result["s"] < 10, (result, err)
    assert len(err) == 1 and err[0].startswith("error: ") and TIMEOUT_ENV in err[0], err
    assert "nothing was published" in err[0], err
    assert _count(url, "SELECT count(*) FROM hcbench_runs WHERE run_id = 'run-a2'") == 0
    assert _count(url, "SELECT count(*) FROM hcbench_records WHERE run_id = 'run-a2'") == 0


def test_a_dashboard_reading_the_tables_does_not_hold_up_a_publish(pg_url, monkeypatch):
    """A reader (Grafana's queries) holds ACCESS SHARE on the records table: a publish into
    tables that have every column takes no lock that waits on it."""
    psycopg = _psycopg()
    url = _fresh_db(pg_url)
    assert main(["publish", str(FIXTURE / "run-a1"), "--to", url]) == 0
    monkeypatch.setenv(TIMEOUT_ENV, "5")
    reader = psycopg.connect(url)
    reader.execute("SELECT count(*) FROM hcbench_records").fetchone()     # the lock stays held
    result = {}

    def publish():
        try:
            result["counts"] = publish_pg.publish(url, load_runs([FIXTURE / "run-a2"]))
        except PublishError as exc:
            result["error"] = str(exc)

    worker = threading.Thread(target=publish, daemon=True)
    worker.start()
    worker.join(20)
    hung = worker.is_alive()
    reader.rollback()
    reader.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    reader.close()
    worker.join(60)
    assert not hung, "the publish waited on the reader"
    assert result.get("counts", {}).get("new_records") == 35, result


def test_a_bad_statement_timeout_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    assert main(["publish", str(FIXTURE / "run-a1"), "--to", "postgresql://u@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {TIMEOUT_ENV}"), err


def test_concurrent_publishes_of_overlapping_runs_all_succeed(pg_url):
    """Publishes of overlapping runs in opposite orders, started together, first into a database
    without the tables and then into one with them: all succeed, and the tables hold the union
    once."""
    psycopg = _psycopg()
    runs = load_runs([FIXTURE])
    url = _fresh_db(pg_url)
    orders = [runs, runs[::-1], runs[1:] + runs[:1], runs[2:][::-1] + runs[:2], runs[1:3][::-1]]
    for _ in range(2):
        errors = []
        barrier = threading.Barrier(len(orders))

        def publish(order):
            barrier.wait()
            try:
                publish_pg.publish(url, order)
            except PublishError as exc:
                errors.append(str(exc))

        workers = [threading.Thread(target=publish, args=(o,), daemon=True) for o in orders]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not any(w.is_alive() for w in workers), "a publish hung"
        assert not errors, errors
    want = sorted((run.run_id, r["case_id"]) for run in runs for r in run.records)
    with psycopg.connect(url) as conn:
        assert sorted(conn.execute("SELECT run_id, case_id FROM hcbench_records").fetchall()) == want
        assert sorted(r[0] for r in conn.execute("SELECT run_id FROM hcbench_runs")) == sorted(
            run.run_id for run in runs)


def test_a_deadlock_or_serialization_failure_is_tried_again(pg_url, capsys):
    """The server picking the publish as a deadlock victim, or a serialization failure, rolls
    back and tries again, so the user never sees it; one that never clears ends after a bounded
    number of tries with one line."""
    psycopg = _psycopg()
    url = _fresh_db(pg_url)
    assert main(["publish", str(FIXTURE / "run-a1"), "--to", url]) == 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE tries")
        conn.execute("""CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE k bigint := nextval('tries');
            BEGIN
                IF k = 1 THEN RAISE EXCEPTION 'test: deadlock' USING ERRCODE = 'deadlock_detected';
                ELSIF k = 2 THEN RAISE EXCEPTION 'test: conflict' USING ERRCODE = 'serialization_failure';
                END IF;
                RETURN NEW;
            END $$""")
        conn.execute("CREATE TRIGGER fail BEFORE INSERT ON hcbench_records "
                     "FOR EACH ROW EXECUTE FUNCTION fail()")
    capsys.readouterr()
    assert main(["publish", str(FIXTURE / "run-a2"), "--to", url]) == 0, capsys.readouterr().err
    assert _count(url, "SELECT count(*) FROM hcbench_records WHERE run_id = 'run-a2'") == 35
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""CREATE OR REPLACE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'test: conflict' USING ERRCODE = 'serialization_failure'; END $$""")
    capsys.readouterr()
    t0 = time.monotonic()
    assert main(["publish", str(FIXTURE / "run-b1"), "--to", url]) == 2
    assert time.monotonic() - t0 < 20
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test: conflict" in err[0] and "tried" in err[0], err
    assert _count(url, "SELECT count(*) FROM hcbench_runs WHERE run_id = 'run-b1'") == 0


def test_a_password_never_reaches_dns_or_an_error_line(monkeypatch, capsys):
    """A password with @ / # ? : in it, written as is, is refused before anything is looked up;
    percent-encoded it is sent as the password and the host is the host. No error line (bad host,
    refused connection, an option the server refuses, a bad escape) shows any of it, including a
    password given as ?password=."""
    _psycopg()
    looked_up = []
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        looked_up.append(host)
        if host in ("127.0.0.1", "localhost"):
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    enc, port = quote(SECRET, safe=""), _free_port()
    cases = [  # (address, its secrets, what the line says)
        (f"postgresql://hcbench:{SECRET}@db.example.test:5432/hcbench", [SECRET], "percent-encode"),
        ("postgresql://hcbench:pa@ss@db.example.test/hcbench", ["pa@ss"], "percent-encode"),
        ("postgresql://hcbench:pa#ss@db.example.test/hcbench", ["pa#ss"], "percent-encode"),
        (f"postgresql://hcbench:{enc}@db.example.test:5432/hcbench", [SECRET, enc], "db.example.test"),
        (f"postgresql://hcbench:{enc}@127.0.0.1:{port}/hcbench", [SECRET, enc], "cannot connect"),
        (f"postgresql://hcbench@127.0.0.1:{port}/hcbench?password={enc}", [SECRET, enc], "cannot connect"),
        (f"postgresql://hcbench:{enc}@127.0.0.1:{port}/hcbench?sslmode=bogus", [SECRET, enc], "sslmode"),
        (f"postgresql://hcbench@127.0.0.1:{port}/hcbench?password=s3cret&sslmode=bogus", ["s3cret"],
         "sslmode"),
        (f"postgresql://hcbench:s3cr%zzt@127.0.0.1:{port}/hcbench", ["s3cr%zzt"], "cannot connect"),
    ]
    for url, secrets, says in cases:
        assert main(["publish", str(FIXTURE / "run-a1"), "--to", url]) == 2, url
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (url, lines)
        assert not _leaks(err, secrets), (url, _leaks(err, secrets), err)
    assert "db.example.test" in looked_up                  # the spy sees psycopg's look-ups
    assert set(looked_up) <= {"db.example.test", "127.0.0.1", "localhost"}, looked_up
    for url in [c[0] for c in cases] + [f"postgresql://u:{SECRET}@h/db?x=1&password={SECRET}"]:
        assert not _leaks(publish_pg.redact(url), [SECRET, enc, "s3cret", "s3cr%zzt", "pa@ss", "pa#ss"])


def test_a_password_with_reserved_characters_logs_in_and_a_wrong_one_is_one_line(pg_url, capsys):
    psycopg = _psycopg()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {PW_ROLE} LOGIN PASSWORD '{SECRET}'")
    where = _fresh_db(pg_url, owner=PW_ROLE).split("@", 1)[1]
    enc = quote(SECRET, safe="")
    good = f"postgresql://{PW_ROLE}:{enc}@{where}"
    assert main(["publish", str(FIXTURE / "run-a1"), "--to", good]) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert not _leaks(out.out + out.err, [SECRET, enc])
    assert _count(f"postgresql://hcbench@{where}", "SELECT count(*) FROM hcbench_records") == 35
    wrong = f"postgresql://{PW_ROLE}:{quote('x' + SECRET, safe='')}@{where}"
    assert main(["publish", str(FIXTURE / "run-a2"), "--to", wrong]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "password authentication failed" in lines[0], lines
    assert not _leaks(err, ["x" + SECRET, quote("x" + SECRET, safe="")])


def _sqlstring(values: list[str]) -> str:
    """Grafana's sqlstring format: each value single-quoted with its quotes doubled, joined by
    commas."""
    return ",".join("'" + v.replace("'", "''") + "'" for v in values)


def _fill(sql: str, variables: dict[str, list[str]]) -> str:
    """The SQL as Grafana sends it: ${name:sqlstring} filled in and $__timeFilter(col) expanded."""
    sql = re.sub(r"\$\{(\w+):sqlstring\}", lambda m: _sqlstring(variables[m.group(1)]), sql)
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)",
                 r"\1 BETWEEN '2000-01-01T00:00:00Z' AND '2100-01-01T00:00:00Z'", sql)
    assert "$" not in sql and "[[" not in sql, f"a variable Grafana would not quote: {sql}"
    return sql


def _latest(runs, ok_only: bool) -> dict:
    """The newest record of each GPU model and join key, as the board's DISTINCT ON picks it."""
    out = {}
    for run in runs:
        for r in run.records:
            if ok_only and r["status"] != "ok":
                continue
            key = (run.gpu, record_schema.join_key(r))
            when = r.get("started_utc") or run.started
            if key not in out or when > out[key][0]:
                out[key] = (when, r)
    return {k: r for k, (_, r) in out.items()}


def test_grafana_panels_run_with_grafana_quoting(pg_url, tmp_path):
    """Every panel and variable query of dashboards/hcbench-grafana.json, filled in the way Grafana
    fills ${var:sqlstring}, runs against the published tables, a GPU name with a quote in it
    included, and returns the rows the records say; tables show the distributed fields."""
    psycopg = _psycopg()
    odd = "O'Brien GPU"
    extra = [_run_copy(tmp_path, "run-a1", "run-ob", gpu=odd, scale=2.0),
             _run_copy(tmp_path, "run-a1", "run-dist", gpu="Test GPU D (synthetic)",
                       records=distributed_records())]
    url = _fresh_db(pg_url)
    assert main(["publish", str(FIXTURE), *map(str, extra), "--to", url]) == 0
    runs = load_runs([FIXTURE, *extra])
    board = json.loads(BOARD.read_text())
    every = {"gpu": sorted({r.gpu for r in runs}), "reference_gpu": [odd],
             "scenario": sorted({r.get("scenario") for run in runs for r in run.records}),
             "method": ["residual", "hc", "mhc"], "backend": ["torch", "triton"]}
    only_odd = {**every, "gpu": [odd]}
    by_title = {p["title"]: p for p in board["panels"]}
    with psycopg.connect(url) as conn:
        def rows(title, variables):
            cur = conn.execute(_fill(by_title[title]["targets"][0]["rawSql"], variables))
            names = [d.name for d in cur.description]
            return names, [dict(zip(names, row)) for row in cur.fetchall()]

        for where, sql in board_queries(board):
            assert conn.execute(_fill(sql, every)).fetchall(), where
        gpus = {row[0] for row in conn.execute(_fill(
            next(v["query"] for v in board["templating"]["list"] if v["name"] == "gpu"), every))}
        assert odd in gpus

        _, got = rows("Runs (newest first)", only_odd)
        assert [r["run_id"] for r in got] == ["run-ob"]

        _, got = rows("Median time per case over time (ms)", every)
        ok = [(run.gpu, r) for run in runs for r in run.records if r["status"] == "ok"]
        assert len(got) == len(ok)
        cases = {(gpu, record_schema.join_key(r)) for gpu, r in ok}
        assert len({r["metric"] for r in got}) == len(cases)
        _, got = rows("Median time per case over time (ms)", only_odd)
        assert got and all(r["metric"].startswith(odd + " ") for r in got)

        names, got = rows("Newest record of each case per GPU", every)
        assert len(got) == len(_latest(runs, ok_only=False))
        assert set(DISTRIBUTED) <= set(names), names
        dist = [r for r in got if r["gpu"] == "Test GPU D (synthetic)"]
        assert {(r["gpus"], r["parallel"], r["overlap"], r["microbatches"]) for r in dist} == {
            tuple(r["case"].get(f) for f in DISTRIBUTED) for r in distributed_records()}

        names, got = rows("GPU models side by side: time over the reference GPU's time (same case id)",
                          every)
        assert set(DISTRIBUTED) <= set(names), names
        latest = _latest(runs, ok_only=True)
        want = sorted((gpu, round(r["time_ms"]["median"] / latest[(odd, key)]["time_ms"]["median"], 3))
                      for (gpu, key), r in latest.items() if gpu != odd and (odd, key) in latest)
        assert want and sorted((r["gpu"], float(r["ratio"])) for r in got) == want

        names, got = rows("Failed and skipped cases", every)
        assert set(DISTRIBUTED) <= set(names), names
        assert len(got) == sum(r["status"] != "ok" for run in runs for r in run.records)
        _, got = rows("Failed and skipped cases", only_odd)
        assert {r["gpu"] for r in got} == {odd}


def test_rows_an_older_version_wrote_get_their_join_key_and_label(pg_url):
    """Tables without the derived columns (an older version's) gain them on the next publish,
    and the rows already there get them from their stored record."""
    psycopg = _psycopg()
    url = _fresh_db(pg_url)
    assert main(["publish", str(FIXTURE / "run-a1"), "--to", url]) == 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE hcbench_records DROP COLUMN join_key, DROP COLUMN label")
    assert main(["publish", str(FIXTURE / "run-b1"), "--to", url]) == 0
    runs = {r.run_id: r for r in load_runs([FIXTURE])}
    with psycopg.connect(url) as conn:
        got = conn.execute("SELECT run_id, case_id, join_key, label FROM hcbench_records").fetchall()
    want = {(run_id, r["case_id"], record_schema.join_key(r), publish_pg.series_label(r))
            for run_id in ("run-a1", "run-b1") for r in runs[run_id].records}
    assert set(got) == want and len(got) == len(want)


def test_an_address_of_another_scheme_is_refused_without_its_password(tmp_path, capsys):
    assert main(["publish", str(FIXTURE / "run-a1"), "--to", "mysql://user:hunter2@db.example/x"]) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "give a folder or a postgresql://" in err
