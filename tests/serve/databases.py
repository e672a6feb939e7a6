"""A real PostgreSQL server for the store tests (the ``pgserver`` wheel: PostgreSQL 16 binaries, run as root),
and a fresh database on it per test."""

from __future__ import annotations

import uuid
from pathlib import Path


class PostgresServer:
    def __init__(self, folder: Path) -> None:
        import pgserver

        self._server = pgserver.get_server(folder, cleanup_mode="stop")
        self.uri = self._server.get_uri()

    def new_database(self) -> str:
        """A DSN of a new, empty database."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self._server.get_uri(name)

    def stop(self) -> None:
        self._server.cleanup()
