"""Publishing to a real PostgreSQL: Debian's postgresql (initdb, pg_ctl) started on a loopback port
in a temporary data directory, trust authentication, stopped at the end. If the server binaries are
missing or the server cannot start, the tests skip with the reason. psycopg is an optional
dependency: when it is not importable the set-up installs psycopg[binary] with pip into a cache
folder (about 5 s once); without network it skips.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from suite.cli import main
from suite.publish.published import load_runs

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "publish"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hcbench" / "pydeps"


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


def test_grafana_queries_run_against_the_schema(pg_url):
    """Every panel and variable query of dashboards/hcbench-grafana.json, with Grafana's macros
    filled in, runs against the published tables and returns rows."""
    assert main(["publish", str(FIXTURE), "--to", pg_url]) == 0
    dash = json.loads((ROOT / "dashboards" / "hcbench-grafana.json").read_text())
    gpus = "'Test GPU A (synthetic)','Test GPU B (synthetic)'"
    fill = {"${gpu:sqlstring}": gpus, "${scenario:sqlstring}": "'sample','sample_model'",
            "${method:sqlstring}": "'residual','hc','mhc'", "${backend:sqlstring}": "'torch','triton'",
            "${reference_gpu}": "Test GPU A (synthetic)"}
    psycopg = _psycopg()
    queries = [t["rawSql"] for p in dash["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    with psycopg.connect(pg_url) as conn:
        for sql in queries:
            for k, v in fill.items():
                sql = sql.replace(k, v)
            sql = __import__("re").sub(r"\$__timeFilter\(([^)]+)\)", r"\1 IS NOT NULL", sql)
            assert "$" not in sql, sql
            assert conn.execute(sql).fetchall(), sql
