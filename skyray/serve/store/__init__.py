"""The job store (see ``jobs``): SQLite embedded by default, PostgreSQL for several ingress replicas or nodes.

    database.py    the engine for either dialect and its read/write transactions
    migrations.py  schema versions and the steps between them
    tables.py      the tables at the current version
    jobs.py        JobStore: jobs, attempts, claims, events, retention
"""

from skyray.serve.store.database import Database, database_url
from skyray.serve.store.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    STALE,
    STATES,
    TERMINAL,
    Event,
    Job,
    JobStore,
)
from skyray.serve.store.migrations import VERSION, SchemaError, migrate

__all__ = [
    "CANCELLED", "DONE", "FAILED", "INTERRUPTED", "QUEUED", "RUNNING", "STALE", "STATES", "TERMINAL", "VERSION",
    "Database", "Event", "Job", "JobStore", "SchemaError", "database_url", "migrate",
]
