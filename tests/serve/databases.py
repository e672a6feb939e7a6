"""A real PostgreSQL server for the store tests (the ``pgserver`` wheel: PostgreSQL 16 binaries, run as root),
and a fresh schema on it per test."""

from __future__ import annotations

import uuid
from pathlib import Path


class PostgresServer:
    def __init__(self, folder: Path) -> None:
        import pgserver

        self._server = pgserver.get_server(folder, cleanup_mode="stop")
        self.uri = self._server.get_uri()

    def new_database(self) -> str:
        """A DSN whose tables start empty: a new schema, first on its search_path (a schema costs milliseconds;
        a new database copies a 7 MB template)."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.uri}{'&' if '?' in self.uri else '?'}options=-csearch_path%3D{name}"

    def stop(self) -> None:
        from pgserver import _commands

        # Fast mode: the default (smart) waits for every client to hang up, and pooled connections never do.
        _commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self._server.pgdata, user=self._server.system_user)
        self._server.cleanup()
