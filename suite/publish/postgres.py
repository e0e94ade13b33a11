"""`harness.py publish RUN_DIR... --to postgresql://USER@HOST/DB`: runs and records into PostgreSQL.

Schema (created idempotently with CREATE ... IF NOT EXISTS; dashboards/hcbench-grafana.json reads it):

- hcbench_schema(version): the schema version, SCHEMA_VERSION.
- hcbench_runs: one row per run folder. run_id (primary key), gpu (model name), started_utc,
  host, scenarios (text[]), copy_gbps, env (env.json as jsonb), published_utc.
- hcbench_records: one row per record, primary key (run_id, case_id): the record's flat columns
  (suite.core.record.COLUMNS, names lower-cased as PostgreSQL folds them: c, t, l_r), which the
  dashboards filter and plot on, and the whole record as jsonb (raw samples included) in
  `record`. A table made by an older version gains the missing columns (ADD COLUMN IF NOT
  EXISTS), and every re-published record fills them.

A re-publish upserts on the primary keys, so it never duplicates; the whole publish is one
transaction, so a failure leaves the database as it was. Nothing local is written or removed.
psycopg (PyPI: psycopg[binary]) is an optional dependency, imported only here.
"""
from __future__ import annotations

import json
from urllib.parse import urlsplit, urlunsplit

from suite.core import record as record_schema
from suite.publish.published import PublishError, Run

SCHEMA_VERSION = 2
_PG_TYPES = {"text": "TEXT", "int": "BIGINT", "real": "DOUBLE PRECISION", "bool": "BOOLEAN",
             "time": "TIMESTAMPTZ"}
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
    record JSONB NOT NULL,
    PRIMARY KEY (run_id, case_id));
""" + "".join(f"ALTER TABLE hcbench_records ADD COLUMN IF NOT EXISTS {n.lower()} {_PG_TYPES[k]};\n"
              for n, k in record_schema.COLUMNS if n != "case_id") + """
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

RECORD_COLUMNS = ("run_id",) + tuple(n.lower() for n in record_schema.NAMES) + ("record",)
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
    row = record_schema.flat(r)
    if not row["started_utc"]:
        row["started_utc"] = run.started or None
    return (run.run_id, *(row[n] for n in record_schema.NAMES),
            json.dumps(r, sort_keys=True, default=str))


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
