"""The job store: one SQLite file that every job's record and progress events live in (the source of truth).

The ingress inserts jobs and hands them out; renderer replicas mark them running, write progress and finish
them.  Every renderer write names the *attempt* it was given: a job re-dispatched after a restart gets a new
attempt number, and writes from an older attempt (a replica that was presumed dead) are ignored, so a job has
one owner at a time.  SQLite in WAL mode lets the processes of one machine (or of pods sharing one volume with
POSIX locks) read while one writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
TERMINAL = frozenset({DONE, FAILED, CANCELLED})
# What a renderer call can end with besides a final status: a newer attempt owns the job, or the replica stopped.
STALE, INTERRUPTED = "stale", "interrupted"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,            -- sha256 of the bearer token that created it ('' without auth)
    kind TEXT NOT NULL,             -- 'shot' or 'film'
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    storyboard TEXT NOT NULL,       -- resolved storyboard as JSON (storyboard_from_data input)
    video TEXT NOT NULL,            -- the job's mp4, relative to its folder
    parent TEXT,                    -- continue_from job id
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempt INTEGER NOT NULL DEFAULT 0,
    dispatched INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    windows_done INTEGER NOT NULL DEFAULT 0,
    windows_total INTEGER NOT NULL DEFAULT 0,
    shot TEXT,
    eta REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job, seq);
"""


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    kind: str
    model: str
    status: str
    storyboard: dict
    video: str
    parent: str | None
    created: float
    started: float | None
    finished: float | None
    attempt: int
    dispatched: bool
    restarts: int
    cancel_requested: bool
    windows_done: int
    windows_total: int
    shot: str | None
    eta: float | None
    error: str | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    data: dict
    ts: float


class JobStore:
    """Thread-safe access to the job database at ``path`` (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _write(self, statements: list[tuple[str, tuple]]) -> list[int]:
        """Run statements in one transaction; returns each one's rowcount."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                counts = [self._db.execute(sql, args).rowcount for sql, args in statements]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return counts

    # ----------------------------------------------------------------------------------------------- reading

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or None if it does not exist or (with ``owner``) belongs to someone else."""
        if owner is None:
            row = self._exec("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        else:
            row = self._exec("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner)).fetchone()
        return _job(row) if row else None

    def list(self, owner: str, limit: int = 100) -> list[Job]:
        rows = self._exec("SELECT * FROM jobs WHERE owner = ? ORDER BY created DESC LIMIT ?", (owner, limit))
        return [_job(r) for r in rows.fetchall()]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for status, n in self._exec("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall():
            out[status] = n
        return out

    def queued(self, model: str | None = None, undispatched: bool = True, limit: int = 100) -> list[Job]:
        """Queued jobs, oldest first."""
        sql = "SELECT * FROM jobs WHERE status = ?"
        args: list[Any] = [QUEUED]
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        if undispatched:
            sql += " AND dispatched = 0"
        rows = self._exec(sql + " ORDER BY created, rowid LIMIT ?", (*args, limit)).fetchall()
        return [_job(r) for r in rows]

    def queue_position(self, job: Job) -> int:
        """How many queued jobs are ahead of ``job`` (0: next)."""
        row = self._exec(
            "SELECT COUNT(*) FROM jobs WHERE status = ? AND (created < ? OR (created = ? AND id < ?))",
            (QUEUED, job.created, job.created, job.id),
        ).fetchone()
        return int(row[0])

    def events(self, job_id: str, after: int = 0, limit: int = 200) -> list[Event]:
        rows = self._exec(
            "SELECT seq, type, data, ts FROM events WHERE job = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, after, limit),
        ).fetchall()
        return [Event(r["seq"], r["type"], json.loads(r["data"]), r["ts"]) for r in rows]

    def recent_job_seconds(self, limit: int = 20) -> float | None:
        """Mean wall time of the last finished jobs (for Retry-After hints)."""
        row = self._exec(
            "SELECT AVG(finished - started) FROM (SELECT finished, started FROM jobs WHERE status = ? "
            "AND started IS NOT NULL ORDER BY finished DESC LIMIT ?)",
            (DONE, limit),
        ).fetchone()
        return None if row[0] is None else float(row[0])

    # ------------------------------------------------------------------------------------------ ingress side

    def add(self, job_id: str, owner: str, kind: str, model: str, storyboard: dict, video: str,
            parent: str | None = None) -> Job:
        now = time.time()
        self._write([
            ("INSERT INTO jobs (id, owner, kind, model, status, storyboard, video, parent, created) "
             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
             (job_id, owner, kind, model, QUEUED, json.dumps(storyboard), video, parent, now)),
            _event_sql(job_id, "status", {"status": QUEUED}, now),
        ])
        job = self.get(job_id)
        assert job is not None
        return job

    def claim(self, job_id: str) -> int | None:
        """Mark a queued job as handed to a renderer; returns its new attempt number (None if not claimable)."""
        (n,) = self._write([
            ("UPDATE jobs SET attempt = attempt + 1, dispatched = 1 WHERE id = ? AND status = ? AND dispatched = 0 "
             "AND cancel_requested = 0", (job_id, QUEUED)),
        ])
        if not n:
            return None
        job = self.get(job_id)
        return job.attempt if job else None

    def requeue(self, job_id: str, attempt: int, reason: str, max_restarts: int | None) -> str | None:
        """The renderer call of ``attempt`` ended without finishing the job: queue it again.  With
        ``max_restarts`` (the replica crashed) a call that had started rendering counts as a restart, and after
        ``max_restarts`` of those the job fails; without it (the replica was stopped in order) nothing counts.
        Returns the job's new status, or None if the attempt was no longer current."""
        job = self.get(job_id)
        if job is None or job.attempt != attempt or job.terminal:
            return None
        if job.cancel_requested:
            return CANCELLED if self.finish(job_id, attempt, CANCELLED, None) else None
        started = job.status == RUNNING and max_restarts is not None
        if started and job.restarts + 1 > max_restarts:  # type: ignore[operator]
            msg = f"the renderer died {job.restarts + 1} times while rendering this job; last: {reason}"
            return FAILED if self.finish(job_id, attempt, FAILED, msg) else None
        now = time.time()
        n, _ = self._write([
            ("UPDATE jobs SET status = ?, dispatched = 0, restarts = restarts + ?, eta = NULL "
             "WHERE id = ? AND attempt = ? AND status IN (?, ?)",
             (QUEUED, int(started), job_id, attempt, QUEUED, RUNNING)),
            ("INSERT INTO events (job, type, data, ts) SELECT ?, 'status', ?, ? WHERE changes() > 0",
             (job_id, json.dumps({"status": QUEUED, "requeued": reason}), now)),
        ])
        return QUEUED if n else None

    def recover(self) -> list[str]:
        """After an ingress (re)start nothing is in flight: queue again every job that was dispatched or running.
        The next dispatch gives each a new attempt, which also retires any renderer still busy with an old one."""
        rows = self._exec("SELECT id FROM jobs WHERE status = ? OR (status = ? AND dispatched = 1)",
                          (RUNNING, QUEUED)).fetchall()
        ids = [r[0] for r in rows]
        now = time.time()
        for job_id in ids:
            self._write([
                ("UPDATE jobs SET status = ?, dispatched = 0, eta = NULL WHERE id = ? AND status IN (?, ?)",
                 (QUEUED, job_id, QUEUED, RUNNING)),
                _event_sql(job_id, "status", {"status": QUEUED, "requeued": "service restarted"}, now),
            ])
        return ids

    def fail_unserved(self, models: tuple[str, ...]) -> list[str]:
        """Fail waiting jobs for models this deployment no longer serves (nothing would ever take them)."""
        marks = ",".join("?" * len(models))
        rows = self._exec(f"SELECT id, model FROM jobs WHERE status = ? AND model NOT IN ({marks})",
                          (QUEUED, *models)).fetchall()
        now = time.time()
        for job_id, model in rows:
            msg = f"model {model!r} is no longer served here (served: {', '.join(models)})"
            self._write([
                ("UPDATE jobs SET status = ?, finished = ?, error = ?, dispatched = 0 WHERE id = ? AND status = ?",
                 (FAILED, now, msg, job_id, QUEUED)),
                ("INSERT INTO events (job, type, data, ts) SELECT ?, 'status', ?, ? WHERE changes() > 0",
                 (job_id, json.dumps({"status": FAILED, "error": msg}), now)),
            ])
        return [r[0] for r in rows]

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a job: at once if no renderer has it, else at the renderer's next window boundary."""
        now = time.time()
        self._write([
            ("UPDATE jobs SET status = ?, finished = ?, cancel_requested = 1 WHERE id = ? AND status = ? "
             "AND dispatched = 0", (CANCELLED, now, job_id, QUEUED)),
            ("INSERT INTO events (job, type, data, ts) SELECT ?, 'status', ?, ? WHERE changes() > 0",
             (job_id, json.dumps({"status": CANCELLED}), now)),
            ("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status IN (?, ?)", (job_id, QUEUED, RUNNING)),
        ])
        return self.get(job_id)

    # ----------------------------------------------------------------------------------------- renderer side

    def start(self, job_id: str, attempt: int) -> str:
        """A renderer begins ``attempt``: 'running', 'cancelled' (cancel came first) or 'stale' (superseded)."""
        now = time.time()
        n, _ = self._write([
            ("UPDATE jobs SET status = ?, started = COALESCE(started, ?), error = NULL WHERE id = ? AND attempt = ? "
             "AND status = ? AND cancel_requested = 0", (RUNNING, now, job_id, attempt, QUEUED)),
            ("INSERT INTO events (job, type, data, ts) SELECT ?, 'status', ?, ? WHERE changes() > 0",
             (job_id, json.dumps({"status": RUNNING, "attempt": attempt}), now)),
        ])
        if n:
            return RUNNING
        n, _ = self._write([
            ("UPDATE jobs SET status = ?, finished = ?, dispatched = 0 WHERE id = ? AND attempt = ? AND status = ? "
             "AND cancel_requested = 1", (CANCELLED, now, job_id, attempt, QUEUED)),
            ("INSERT INTO events (job, type, data, ts) SELECT ?, 'status', ?, ? WHERE changes() > 0",
             (job_id, json.dumps({"status": CANCELLED}), now)),
        ])
        return CANCELLED if n else STALE

    def should_stop(self, job_id: str, attempt: int) -> bool:
        """True when the job was cancelled or handed to a newer attempt."""
        row = self._exec("SELECT attempt, cancel_requested, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or row[0] != attempt or bool(row[1]) or row[2] != RUNNING

    def progress(self, job_id: str, attempt: int, windows_done: int, windows_total: int, shot: str | None,
                 eta: float | None, event: tuple[str, dict] | None = None) -> bool:
        now = time.time()
        stmts = [("UPDATE jobs SET windows_done = ?, windows_total = ?, shot = ?, eta = ? WHERE id = ? "
                  "AND attempt = ? AND status = ?", (windows_done, windows_total, shot, eta, job_id, attempt, RUNNING))]
        if event is not None:
            stmts.append(("INSERT INTO events (job, type, data, ts) SELECT ?, ?, ?, ? WHERE changes() > 0",
                          (job_id, event[0], json.dumps(event[1]), now)))
        return bool(self._write(stmts)[0])

    def finish(self, job_id: str, attempt: int, status: str, error: str | None) -> bool:
        """Record the end of ``attempt`` (done, failed or cancelled); False if the attempt was superseded."""
        assert status in TERMINAL
        now = time.time()
        data: dict[str, Any] = {"status": status}
        if error:
            data["error"] = error
        n, _ = self._write([
            ("UPDATE jobs SET status = ?, finished = ?, error = ?, dispatched = 0, eta = NULL, "
             "windows_done = CASE WHEN ? = 'done' THEN windows_total ELSE windows_done END "
             "WHERE id = ? AND attempt = ? AND status IN (?, ?)",
             (status, now, error, status, job_id, attempt, QUEUED, RUNNING)),
            ("INSERT INTO events (job, type, data, ts) SELECT ?, 'status', ?, ? WHERE changes() > 0",
             (job_id, json.dumps(data), now)),
        ])
        return bool(n)

    def add_event(self, job_id: str, type_: str, data: dict) -> None:
        self._write([_event_sql(job_id, type_, data, time.time())])


def _event_sql(job_id: str, type_: str, data: dict, ts: float) -> tuple[str, tuple]:
    return "INSERT INTO events (job, type, data, ts) VALUES (?, ?, ?, ?)", (job_id, type_, json.dumps(data), ts)


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["storyboard"] = json.loads(d["storyboard"])
    for key in ("dispatched", "cancel_requested"):
        d[key] = bool(d[key])
    return Job(**d)
