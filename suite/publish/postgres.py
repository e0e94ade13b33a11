"""`harness.py publish RUN_DIR... --to postgresql://USER@HOST/DB`: runs and records into PostgreSQL.

Schema (created idempotently with CREATE ... IF NOT EXISTS; dashboards/hcbench-grafana.json reads it):

- hcbench_schema(version): the schema versions that have written to the database, SCHEMA_VERSION.
- hcbench_runs: one row per run folder. run_id (primary key), gpu (model name), started_utc,
  host, scenarios (text[]), copy_gbps, env (env.json as jsonb), published_utc.
- hcbench_records: one row per record, primary key (run_id, case_id): the record's flat columns
  (suite.core.record.COLUMNS, names lower-cased as PostgreSQL folds them: c, t, l_r), which the
  dashboards filter and plot on, the whole record as jsonb (raw samples included) in `record`,
  and two columns derived from it: `join_key` (suite.core.record.join_key: the case id, plus a
  hash of the kernel settings where set), what records of one case share across runs and GPU
  models, and `label` (series_label), a series name that no other join key has. A table made by
  an older version gains the missing columns (ADD COLUMN IF NOT EXISTS), and its rows get
  join_key and label from their stored record.

A re-publish upserts on the primary keys, so it never duplicates; the whole publish is one
transaction, so a failure leaves the database as it was. Nothing local is written or removed.
psycopg (PyPI: psycopg[binary]) is an optional dependency, imported only here.

Publishes into one database take turns: each takes a transaction-level advisory lock (LOCK_KEY)
before anything else and writes rows in primary-key order, so two publishes never deadlock on
each other; a deadlock or serialization failure with some other writer rolls the publish back
and runs it again, ATTEMPTS times at most. Every statement, lock waits included, may take
STATEMENT_TIMEOUT_S seconds (the environment variable HCBENCH_PG_STATEMENT_TIMEOUT_S overrides
it; 0 means no limit), so a publish never waits on a stalled server or a held lock for good.

The address is parsed here, once, and handed to libpq as separate parameters: libpq never parses
the password, so no part of it can be taken for a host name and looked up. A user name or
password with '@', '/', '?' or '#' in it must be percent-encoded (%40, %2F, %3F, %23); written as
is, the address is ambiguous and refused. Messages show the address without its password and
never quote the password in any form.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import time
from urllib.parse import quote, unquote

from suite.core import record as record_schema
from suite.core.scenario import CASE_FIELDS, Case
from suite.publish.published import PublishError, Run

SCHEMA_VERSION = 3
_PG_TYPES = {"text": "TEXT", "int": "BIGINT", "real": "DOUBLE PRECISION", "bool": "BOOLEAN",
             "time": "TIMESTAMPTZ"}
INSTALL_HINT = "pip install 'psycopg[binary]'  (or: pip install -e '.[postgres]')"
ADDRESS_HINT = "give postgresql://USER@HOST[:PORT]/DB"

STATEMENT_TIMEOUT_S = 60.0
TIMEOUT_ENV = "HCBENCH_PG_STATEMENT_TIMEOUT_S"
CONNECT_TIMEOUT_S = 10
# A server that stops answering mid-publish (host gone, network cut) is noticed in about a minute
# by TCP keepalives; the statement timeout is enforced by the server, so it cannot cover that.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
              "keepalives_count": 3}
ATTEMPTS = 5
RETRY_WAIT_S = 0.1
# pg_advisory_xact_lock key: "hcbench" in ASCII, so other applications' keys are unlikely to meet it.
LOCK_KEY = int.from_bytes(b"hcbench", "big")

DERIVED_COLUMNS = ("join_key", "label")

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
              for n, k in record_schema.COLUMNS if n != "case_id") + "".join(
    f"ALTER TABLE hcbench_records ADD COLUMN IF NOT EXISTS {n} TEXT;\n" for n in DERIVED_COLUMNS) + """
CREATE INDEX IF NOT EXISTS hcbench_records_case ON hcbench_records (case_id, started_utc);
CREATE INDEX IF NOT EXISTS hcbench_records_scenario ON hcbench_records (scenario, method, backend);
"""

RECORD_COLUMNS = ("run_id",) + tuple(n.lower() for n in record_schema.NAMES) + ("record",)
_WRITTEN = RECORD_COLUMNS + DERIVED_COLUMNS

# ALTER TABLE takes an ACCESS EXCLUSIVE lock even when the column exists, which would queue every
# dashboard query behind the publish: the schema statements run only when something is missing.
SCHEMA_PRESENT = """
SELECT to_regclass('hcbench_schema') IS NOT NULL AND to_regclass('hcbench_runs') IS NOT NULL
   AND to_regclass('hcbench_records_case') IS NOT NULL
   AND to_regclass('hcbench_records_scenario') IS NOT NULL
   AND (SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('hcbench_records')
        AND attname = ANY(%s) AND attnum > 0 AND NOT attisdropped) = %s
"""

RUN_SQL = """
INSERT INTO hcbench_runs (run_id, gpu, started_utc, host, scenarios, copy_gbps, env)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (run_id) DO UPDATE SET gpu = EXCLUDED.gpu, started_utc = EXCLUDED.started_utc,
    host = EXCLUDED.host, scenarios = EXCLUDED.scenarios, copy_gbps = EXCLUDED.copy_gbps,
    env = EXCLUDED.env, published_utc = now()
"""

RECORD_SQL = (f"INSERT INTO hcbench_records ({', '.join(_WRITTEN)}) VALUES "
              f"({', '.join(['%s'] * len(_WRITTEN))}) ON CONFLICT (run_id, case_id) DO UPDATE SET "
              + ", ".join(f"{c} = EXCLUDED.{c}" for c in _WRITTEN[2:])
              + " RETURNING (xmax = 0)")


# ---------------------------------------------------------------- the address

def _split(url: str) -> tuple[str, str, str]:
    """(scheme, authority, rest): the authority ends at the first '/', '?' or '#', as in a URL."""
    scheme, _, after = url.partition("://")
    end = min((i for i in (after.find(c) for c in "/?#") if i >= 0), default=len(after))
    return scheme, after[:end], after[end:]


def _secrets(url: str) -> list[str]:
    """Every form of the password the address may carry: as written, percent-decoded and
    percent-encoded, from the user part (taken up to the last '@', so a password holding '@' or
    '/' is covered whole) and from ?password= (longest first, for replacing)."""
    _, sep, after = url.partition("://")
    written = []
    if sep and "@" in after:
        user_part = after.rsplit("@", 1)[0]
        if ":" in user_part:
            written.append(user_part.partition(":")[2])
    written += re.findall(r"(?i)[?&]password=([^&#]*)", after)
    forms = {f for w in written for f in (w, unquote(w), quote(unquote(w), safe=""))}
    return sorted((f for f in forms if f), key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """`text` with every form of the address's password replaced by ***."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def _ambiguous(url: str) -> bool:
    """Whether the address reads differently depending on where its user part is taken to end:
    more than one '@' in it, an '@' after the host, or a '#' (libpq and URL parsers disagree)."""
    _, authority, rest = _split(url)
    return authority.count("@") > 1 or "@" in rest or "#" in url


def redact(url: str) -> str:
    """The address without its password, for messages. Where the address is ambiguous, no part
    of it is known not to be password, so only its scheme is shown."""
    if "://" not in url:
        return url
    scheme, authority, rest = _split(url)
    if _ambiguous(url):
        return f"{scheme}://***"
    user_part, _, host_part = authority.rpartition("@")
    if ":" in user_part:
        authority = f"{user_part.partition(':')[0]}:***@{host_part}"
    rest = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", rest)
    return f"{scheme}://{authority}{rest}"


def connect_params(url: str) -> dict:
    """The address as psycopg.connect keyword arguments (host, port, user, password, dbname, and
    the query's parameters), or PublishError naming what is wrong."""
    shown = redact(url)
    scheme, authority, rest = _split(url)
    if "://" not in url or scheme.lower() not in ("postgresql", "postgres"):
        raise PublishError(f"--to {shown}: not a PostgreSQL address; {ADDRESS_HINT}")
    if _ambiguous(url):
        raise PublishError(f"--to {shown}: the address is ambiguous: a user name or password "
                           "holding '@', '/', '?' or '#' must be percent-encoded (%40, %2F, %3F, "
                           f"%23); {ADDRESS_HINT}")
    user_part, at, host_part = authority.rpartition("@")
    if host_part.startswith("["):               # [IPv6]:port
        host, _, port = host_part[1:].partition("]")
        if port and not port.startswith(":"):
            raise PublishError(f"--to {shown}: not a PostgreSQL address; {ADDRESS_HINT}")
        port = port[1:]
    else:
        host, _, port = host_part.partition(":")
    host = unquote(host)                        # %2F...: a Unix socket folder
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise PublishError(f"--to {shown}: port {scrub(port, url)!r} is not a number from 1 to "
                           f"65535; {ADDRESS_HINT}")
    path, _, query = rest.partition("?")
    dbname = unquote(path[1:])
    if not dbname:
        raise PublishError(f"--to {shown}: no database name; {ADDRESS_HINT}")
    params: dict = {"dbname": dbname}
    if host:
        params["host"] = host
    if port:
        params["port"] = int(port)
    if at:
        user, colon, password = user_part.partition(":")
        if user:
            params["user"] = unquote(user)
        if colon:
            params["password"] = unquote(password)
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise PublishError(f"--to {shown}: {scrub(item, url)!r} in the query is not "
                               f"NAME=VALUE; {ADDRESS_HINT}")
        params[unquote(key)] = unquote(value)
    if not params.get("host"):      # libpq would pick a default host: publishing names its target
        raise PublishError(f"--to {shown}: no host; {ADDRESS_HINT}")
    return params


def statement_timeout_s() -> float:
    """How long one statement may take, lock waits included: HCBENCH_PG_STATEMENT_TIMEOUT_S where
    set, else STATEMENT_TIMEOUT_S; 0 means no limit."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return STATEMENT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise PublishError(f"{TIMEOUT_ENV}={raw!r}: not a number of seconds; give e.g. 60 "
                           "(0: no limit)")
    return value


# ---------------------------------------------------------------- rows

def series_label(record: dict) -> str:
    """The record's case as a series name: method/backend, then every case field that enters the
    case id and is set, its kernel settings, and the join key after '#'. The fields alone tell
    two cases apart; the key keeps apart cases whose ids were made by older rules from the same
    fields. Fields at the values an id leaves out (family dense, accum 1, no CUDA graph) are left
    out too, so a case keeps one label across versions."""
    case = record.get("case") or {}
    skip = set(Case.RUN_CONTROL) | {"method", "backend"}
    known = [k for k in CASE_FIELDS if k in case] + sorted(set(case) - set(CASE_FIELDS))
    parts = [f"{case.get('method')}/{case.get('backend')}"]
    for key in known:
        value = case[key]
        if key in skip or value is None or Case.ID_OMITTED.get(key, object()) == value:
            continue
        parts.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    knobs = record.get("kernel_settings") or {}
    parts += [f"{k}={v}" for k, v in sorted(knobs.items())] if isinstance(knobs, dict) else []
    return " ".join(parts) + f" #{record_schema.join_key(record)}"


def _record_row(run: Run, r: dict) -> tuple:
    row = record_schema.flat(r)
    if not row["started_utc"]:
        row["started_utc"] = run.started or None
    return (run.run_id, *(row[n] for n in record_schema.NAMES),
            json.dumps(r, sort_keys=True, default=str), record_schema.join_key(r), series_label(r))


def _first_line(exc: BaseException, url: str) -> str:
    return scrub((str(exc).strip().splitlines() or [type(exc).__name__])[0], url)


# ---------------------------------------------------------------- publish

def _publish_once(conn, runs: list[Run], timeout_s: float) -> dict:
    """One attempt, inside the caller's transaction."""
    counts = {"runs": 0, "records": 0, "new_records": 0}
    limit = str(max(1, round(timeout_s * 1000)) if timeout_s else 0)      # milliseconds
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('statement_timeout', %s, true), "
                    "set_config('lock_timeout', %s, true)", (limit, limit))
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        cur.execute(SCHEMA_PRESENT, (list(_WRITTEN[1:]), len(_WRITTEN) - 1))
        if not cur.fetchone()[0]:
            cur.execute(SCHEMA)
            # rows an older version wrote have no join key or label: made from their record
            cur.execute("SELECT run_id, case_id, record FROM hcbench_records "
                        "WHERE join_key IS NULL OR label IS NULL ORDER BY run_id, case_id")
            old = cur.fetchall()
            if old:
                cur.executemany("UPDATE hcbench_records SET join_key = %s, label = %s "
                                "WHERE run_id = %s AND case_id = %s",
                                [(record_schema.join_key(rec), series_label(rec), rid, cid)
                                 for rid, cid, rec in old])
        cur.execute("INSERT INTO hcbench_schema (version) VALUES (%s) ON CONFLICT DO NOTHING",
                    (SCHEMA_VERSION,))
        for run in sorted(runs, key=lambda r: r.run_id):
            cur.execute(RUN_SQL, (run.run_id, run.gpu, run.started or None, run.env.get("host"),
                                  run.scenarios, run.copy_gbps,
                                  json.dumps(run.env, sort_keys=True, default=str)))
            counts["runs"] += 1
        rows = sorted((_record_row(run, r) for run in runs for r in run.records),
                      key=lambda row: row[:2])
        if rows:
            cur.executemany(RECORD_SQL, rows, returning=True)
            while True:
                counts["records"] += 1
                counts["new_records"] += bool(cur.fetchone()[0])
                if not cur.nextset():
                    break
    return counts


def publish(url: str, runs: list[Run]) -> dict:
    params = connect_params(url)
    timeout_s = statement_timeout_s()
    shown = redact(url)
    try:
        import psycopg
    except ImportError:
        raise PublishError(f"publishing to PostgreSQL needs psycopg, which is not installed: "
                           f"{INSTALL_HINT}") from None
    try:
        conn = psycopg.connect(**{"connect_timeout": CONNECT_TIMEOUT_S, **KEEPALIVES, **params},
                               autocommit=True)
    except (psycopg.Error, ValueError) as exc:
        raise PublishError(f"{shown}: cannot connect ({_first_line(exc, url)}); "
                           "nothing was published") from None
    retried = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                with conn.transaction():
                    return _publish_once(conn, runs, timeout_s)
            except retried as exc:
                if attempt == ATTEMPTS:
                    raise PublishError(f"{shown}: publish failed and was rolled back "
                                       f"({_first_line(exc, url)}; tried {ATTEMPTS} times); "
                                       "nothing was published") from None
                # jittered, so publishes that collided do not collide again in step
                time.sleep(RETRY_WAIT_S * attempt * (0.5 + random.random()))
    except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable) as exc:
        raise PublishError(f"{shown}: publish stopped and rolled back ({_first_line(exc, url)}; "
                           f"a statement may take {timeout_s:g} s, {TIMEOUT_ENV} sets it); "
                           "nothing was published") from None
    except psycopg.Error as exc:
        raise PublishError(f"{shown}: publish failed and was rolled back "
                           f"({_first_line(exc, url)}); nothing was published") from None
    finally:
        conn.close()
