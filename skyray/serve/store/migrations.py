"""Schema versions of the job store and the steps between them.

Version 1 is the schema of the first release, which had no version table: a database with a ``jobs`` table
and no ``schema_version`` is version 1.  Every database, new or old, SQLite or PostgreSQL, walks the same steps
from its version to ``VERSION``, each in its own transaction, under a lock, so replicas starting together
migrate once.  A database newer than this code is refused rather than written with the wrong schema.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from skyray.serve.store.database import Database

_TYPES = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL"},
    "postgresql": {"serial": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION"},
}

# Each step: DDL statements with {serial} and {real} filled in per dialect.  Never edit a released step; add one.
STEPS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE IF NOT EXISTS jobs (
            id TEXT PRIMARY KEY, owner TEXT NOT NULL, kind TEXT NOT NULL, model TEXT NOT NULL,
            status TEXT NOT NULL, storyboard TEXT NOT NULL, video TEXT NOT NULL, parent TEXT,
            created {real} NOT NULL, started {real}, finished {real},
            attempt INTEGER NOT NULL DEFAULT 0, dispatched INTEGER NOT NULL DEFAULT 0,
            restarts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
            windows_done INTEGER NOT NULL DEFAULT 0, windows_total INTEGER NOT NULL DEFAULT 0,
            shot TEXT, eta {real}, error TEXT)""",
        "CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created)",
        "CREATE TABLE IF NOT EXISTS events (seq {serial}, job TEXT NOT NULL, type TEXT NOT NULL, "
        "data TEXT NOT NULL, ts {real} NOT NULL)",
        "CREATE INDEX IF NOT EXISTS events_job ON events(job, seq)",
    ],
    # Replicated ingress (which dispatcher holds a job, and their heartbeats), retention and quotas.
    2: [
        "ALTER TABLE jobs ADD COLUMN frames INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN expires_at {real}",
        "ALTER TABLE jobs ADD COLUMN dispatcher TEXT",
        "CREATE INDEX jobs_owner ON jobs(owner, status)",
        "CREATE INDEX jobs_expires ON jobs(expires_at)",
        "CREATE TABLE dispatchers (id TEXT PRIMARY KEY, seen {real} NOT NULL)",
        "CREATE TABLE usage (job TEXT PRIMARY KEY, owner TEXT NOT NULL, ts {real} NOT NULL, "
        "frames INTEGER NOT NULL)",
        "CREATE INDEX usage_owner ON usage(owner, ts)",
        "CREATE TABLE expired_jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, expired {real} NOT NULL)",
    ],
}
VERSION = max(STEPS)


class SchemaError(RuntimeError):
    pass


def current_version(conn: Connection) -> int:
    tables = set(sa.inspect(conn).get_table_names())
    if "schema_version" in tables:
        return int(conn.execute(sa.text("SELECT version FROM schema_version")).scalar_one())
    return 1 if "jobs" in tables else 0


def migrate(db: Database) -> list[int]:
    """Bring the database to ``VERSION``; returns the steps applied."""
    applied = []
    while True:
        with db.write() as conn:
            db.lock(conn, "skyray-schema")
            version = current_version(conn)
            if version > VERSION:
                raise SchemaError(f"job database {db.redacted} has schema version {version}, newer than this "
                                  f"skyray's {VERSION}: upgrade skyray (or point it at another database)")
            if version == VERSION:
                return applied
            step = version + 1
            for statement in STEPS[step]:
                conn.exec_driver_sql(statement.format(**_TYPES[db.dialect]))
            if version == 0 or "schema_version" not in sa.inspect(conn).get_table_names():
                conn.exec_driver_sql("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                conn.execute(sa.text("INSERT INTO schema_version (version) VALUES (:v)"), {"v": step})
            else:
                conn.execute(sa.text("UPDATE schema_version SET version = :v"), {"v": step})
            applied.append(step)
