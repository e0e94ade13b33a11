"""`harness.py publish RUN_DIR... --to postgresql://USER@HOST/DB`: runs and records into PostgreSQL.

Schema (created idempotently with CREATE ... IF NOT EXISTS; dashboards/hcbench-grafana.json reads it):

- hcbench_schema(version): the schema version, SCHEMA_VERSION.
- hcbench_runs: one row per run folder. run_id (primary key), gpu (model name), started_utc,
  host, scenarios (text[]), copy_gbps, env (env.json as jsonb), published_utc.
- hcbench_records: one row per record, primary key (run_id, case_id). The columns the dashboards
  filter and plot on (scenario, status, reason, method, backend, op, scope, n, c, t, dtype, mode,
  device, layers, recompute, l_r, started_utc, median_ms, p10_ms, p90_ms, cv, gbps, pct_of_copy,
  peak_mem_bytes), and the whole record as jsonb (raw samples included) in `record`.

A re-publish upserts on the primary keys, so it never duplicates; the whole publish is one
transaction, so a failure leaves the database as it was. Nothing local is written or removed.
psycopg (PyPI: psycopg[binary]) is an optional dependency, imported only here.
"""
from __future__ import annotations

import json
from urllib.parse import urlsplit, urlunsplit

from suite.publish_model import PublishError, Run

SCHEMA_VERSION = 1
INSTALL_HINT = "pip install 'psycopg[binary]'  (or: pip install -e '.[postgres]')"

SCHEMA = """
CREATE TABLE IF NOT EXISTS hcbench_schema (version INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS hcbench_runs (
    run_id TEXT PRIMARY KEY,
    gpu TEXT NOT NULL,
    started_utc TIMESTAMPTZ,
    host TEXT,
    scenarios TEXT[],
    copy_gbps DOUBLE PRECISION,
    env JSONB,
    published_utc TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS hcbench_records (
    run_id TEXT NOT NULL REFERENCES hcbench_runs (run_id) ON DELETE CASCADE,
    case_id TEXT NOT NULL,
    scenario TEXT, status TEXT NOT NULL, reason TEXT,
    method TEXT, backend TEXT, op TEXT, scope TEXT, n INTEGER, c INTEGER, t INTEGER,
    dtype TEXT, mode TEXT, device TEXT, layers INTEGER, recompute TEXT, l_r INTEGER,
    started_utc TIMESTAMPTZ,
    median_ms DOUBLE PRECISION, p10_ms DOUBLE PRECISION, p90_ms DOUBLE PRECISION,
    cv DOUBLE PRECISION, gbps DOUBLE PRECISION, pct_of_copy DOUBLE PRECISION,
    peak_mem_bytes BIGINT,
    record JSONB NOT NULL,
    PRIMARY KEY (run_id, case_id));
CREATE INDEX IF NOT EXISTS hcbench_records_case ON hcbench_records (case_id, started_utc);
CREATE INDEX IF NOT EXISTS hcbench_records_scenario ON hcbench_records (scenario, method, backend);
"""

RUN_SQL = """
INSERT INTO hcbench_runs (run_id, gpu, started_utc, host, scenarios, copy_gbps, env)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (run_id) DO UPDATE SET gpu = EXCLUDED.gpu, started_utc = EXCLUDED.started_utc,
    host = EXCLUDED.host, scenarios = EXCLUDED.scenarios, copy_gbps = EXCLUDED.copy_gbps,
    env = EXCLUDED.env, published_utc = now()
"""

RECORD_COLUMNS = ("run_id", "case_id", "scenario", "status", "reason", "method", "backend", "op",
                  "scope", "n", "c", "t", "dtype", "mode", "device", "layers", "recompute", "l_r",
                  "started_utc", "median_ms", "p10_ms", "p90_ms", "cv", "gbps", "pct_of_copy",
                  "peak_mem_bytes", "record")
RECORD_SQL = (f"INSERT INTO hcbench_records ({', '.join(RECORD_COLUMNS)}) VALUES "
              f"({', '.join(['%s'] * len(RECORD_COLUMNS))}) ON CONFLICT (run_id, case_id) DO UPDATE SET "
              + ", ".join(f"{c} = EXCLUDED.{c}" for c in RECORD_COLUMNS[2:])
              + " RETURNING (xmax = 0)")


def redact(url: str) -> str:
    """The address without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise PublishError(f"--to {redact(url)}: not a PostgreSQL address ({exc}); "
                           "give postgresql://USER@HOST[:PORT]/DB") from None
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.path.strip("/"):
        raise PublishError(f"--to {redact(url)}: not a PostgreSQL address; give postgresql://USER@HOST[:PORT]/DB")
    del port


def _record_row(run: Run, r: dict) -> tuple:
    c, t = r.get("case") or {}, r.get("time_ms") or {}
    return (run.run_id, r["case_id"], r.get("scenario"), r.get("status"), r.get("reason"),
            c.get("method"), c.get("backend"), c.get("op"), c.get("scope", "site"), c.get("n"),
            c.get("C"), c.get("T"), c.get("dtype"), c.get("mode"), c.get("device"), c.get("layers"),
            c.get("recompute"), c.get("L_r"), r.get("started_utc") or run.started or None,
            t.get("median"), t.get("p10"), t.get("p90"), t.get("cv"), r.get("gbps"),
            r.get("pct_of_copy"), r.get("peak_mem_bytes"), json.dumps(r, sort_keys=True, default=str))


def publish(url: str, runs: list[Run]) -> dict:
    check_url(url)
    try:
        import psycopg
    except ImportError:
        raise PublishError(f"publishing to PostgreSQL needs psycopg, which is not installed: "
                           f"{INSTALL_HINT}") from None
    try:
        conn = psycopg.connect(url, connect_timeout=10)
    except (psycopg.Error, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PublishError(f"{redact(url)}: cannot connect ({first}); nothing was published") from None
    counts = {"runs": 0, "records": 0, "new_records": 0}
    try:
        # one transaction: committed at the end, rolled back on any error
        with conn, conn.cursor() as cur:
            cur.execute(SCHEMA)
            cur.execute("INSERT INTO hcbench_schema (version) VALUES (%s) ON CONFLICT DO NOTHING",
                        (SCHEMA_VERSION,))
            for run in runs:
                cur.execute(RUN_SQL, (run.run_id, run.gpu, run.started or None, run.env.get("host"),
                                      run.scenarios, run.copy_gbps,
                                      json.dumps(run.env, sort_keys=True, default=str)))
                counts["runs"] += 1
                for r in run.records:
                    cur.execute(RECORD_SQL, _record_row(run, r))
                    counts["records"] += 1
                    counts["new_records"] += bool(cur.fetchone()[0])
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PublishError(f"{redact(url)}: publish failed and was rolled back ({first})") from None
    finally:
        conn.close()
    return counts
