"""One SQLAlchemy engine for the job store: an embedded SQLite file, or a PostgreSQL server.

The store's SQL is the same for both; what differs lives here.  SQLite serialises writers itself: every write
transaction starts with ``BEGIN IMMEDIATE`` (the write lock up front, so two writers never deadlock upgrading a
read lock) and reads start a deferred ``BEGIN`` (a WAL snapshot that blocks nobody).  PostgreSQL runs READ
COMMITTED: the store's writes are conditional ``UPDATE``s, which re-check their ``WHERE`` on the row a
concurrent writer left, and the few read-then-write steps take a transaction-scoped advisory lock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, make_url

_READ = "skyray_read"


def database_url(target: str | Path) -> str:
    """A SQLAlchemy URL for ``target``: a ``postgresql://`` (or ``postgres://``) DSN, a ``sqlite:///`` URL, or a
    path of an SQLite file."""
    text = str(target)
    if text.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


class Database:
    """The engine and its transactions (``read()``, ``write()``), for either dialect."""

    def __init__(self, target: str | Path) -> None:
        self.url: URL = make_url(database_url(target))
        self.dialect = self.url.get_backend_name()
        if self.dialect == "sqlite":
            if self.url.database:
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        elif self.dialect == "postgresql":
            # pre_ping: a replica outlives a database restart or failover without failing its next request.
            try:
                self.engine = sa.create_engine(self.url, pool_size=4, max_overflow=8, pool_pre_ping=True,
                                               pool_recycle=600)
            except ModuleNotFoundError as err:
                raise ModuleNotFoundError(f"job database {self.redacted} needs psycopg 3: pip install "
                                          f"'skyray[postgres]' ({err})") from err
        else:
            raise ValueError(f"job database: {self.redacted} is neither SQLite nor PostgreSQL")

    @property
    def redacted(self) -> str:
        """The URL without its password (for logs and errors)."""
        return self.url.render_as_string(hide_password=True)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(**{_READ: True}) as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def lock(self, conn: Connection, name: str) -> None:
        """Hold the lock ``name`` until ``conn``'s transaction ends (SQLite: the write lock already is one)."""
        if self.dialect == "postgresql":
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_connect(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # the begin listener below issues BEGIN itself
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ) else "BEGIN IMMEDIATE")
