"""The job store: every job's record and progress events (the source of truth), in SQLite or PostgreSQL.

Ingress replicas insert jobs and claim them; renderer replicas mark them running, write progress and finish
them.  Every renderer write names the *attempt* it was given: a job re-dispatched after a restart gets a new
attempt number, and writes from an older attempt (a replica that was presumed dead) are ignored, so a job has
one owner at a time.  A claim is a conditional ``UPDATE``: of replicas claiming the same job at once, one wins.

A claimed job names its dispatcher, and each dispatcher writes a heartbeat; a job whose dispatcher has been
silent for a lease (its ingress replica died) is queued again by whichever replica notices.  Every event is
written in the transaction that changed (or locked) its job's row, so a job's events commit in ``seq`` order and
a reader following ``seq`` never skips one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from skyray.serve.store.database import Database
from skyray.serve.store.migrations import migrate
from skyray.serve.store.tables import dispatchers, events, expired_jobs, jobs, usage

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
TERMINAL = frozenset({DONE, FAILED, CANCELLED})
# What a renderer call can end with besides a final status: a newer attempt owns the job, or the replica stopped.
STALE, INTERRUPTED = "stale", "interrupted"
DAY_S = 86400.0


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
    frames: int = 0
    expires_at: float | None = None
    dispatcher: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    data: dict
    ts: float


_JOB_FIELDS = tuple(f.name for f in fields(Job))


class JobStore:
    """Thread-safe access to the job database at ``target``: an SQLite file path or ``sqlite:///`` URL (created
    on first use), or a ``postgresql://`` DSN.  Opening migrates the schema.  ``ttl_s``: finished jobs expire
    that long after they end (None: never)."""

    def __init__(self, target: str | Path, ttl_s: float | None = None) -> None:
        self.db = Database(target)
        self.ttl_s = ttl_s
        migrate(self.db)

    def close(self) -> None:
        self.db.close()

    def _expiry(self, now: float) -> float | None:
        return None if self.ttl_s is None else now + self.ttl_s

    # ----------------------------------------------------------------------------------------------- reading

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or None if it does not exist, has expired or (with ``owner``) belongs to someone else."""
        q = sa.select(jobs).where(jobs.c.id == job_id, _alive(time.time()))
        if owner is not None:
            q = q.where(jobs.c.owner == owner)
        with self.db.read() as c:
            row = c.execute(q).first()
        return _job(row) if row else None

    def expired_at(self, job_id: str, owner: str | None = None) -> float | None:
        """When the job expired (its files and record are gone, or about to be), or None if it did not."""
        now = time.time()
        q = sa.select(expired_jobs.c.expired).where(expired_jobs.c.id == job_id)
        live = sa.select(jobs.c.expires_at).where(jobs.c.id == job_id, jobs.c.expires_at <= now)
        if owner is not None:
            q, live = q.where(expired_jobs.c.owner == owner), live.where(jobs.c.owner == owner)
        with self.db.read() as c:
            value = c.execute(q).scalar() or c.execute(live).scalar()
        return None if value is None else float(value)

    def list(self, owner: str, limit: int = 100) -> list[Job]:
        q = (sa.select(jobs).where(jobs.c.owner == owner, _alive(time.time()))
             .order_by(jobs.c.created.desc()).limit(limit))
        with self.db.read() as c:
            return [_job(r) for r in c.execute(q)]

    def counts(self, owner: str | None = None) -> dict[str, int]:
        q = sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)
        if owner is not None:
            q = q.where(jobs.c.owner == owner)
        out = dict.fromkeys(STATES, 0)
        with self.db.read() as c:
            for status, n in c.execute(q):
                out[status] = n
        return out

    def queued(self, model: str | None = None, undispatched: bool = True, limit: int = 100) -> list[Job]:
        """Queued jobs, oldest first."""
        q = sa.select(jobs).where(jobs.c.status == QUEUED)
        if model is not None:
            q = q.where(jobs.c.model == model)
        if undispatched:
            q = q.where(jobs.c.dispatched == 0)
        with self.db.read() as c:
            return [_job(r) for r in c.execute(q.order_by(jobs.c.created, jobs.c.id).limit(limit))]

    def queue_position(self, job: Job) -> int:
        """How many queued jobs are ahead of ``job`` (0: next)."""
        ahead = sa.or_(jobs.c.created < job.created, sa.and_(jobs.c.created == job.created, jobs.c.id < job.id))
        q = sa.select(sa.func.count()).where(jobs.c.status == QUEUED, ahead)
        with self.db.read() as c:
            return int(c.execute(q).scalar_one())

    def events(self, job_id: str, after: int = 0, limit: int = 200) -> list[Event]:
        q = (sa.select(events.c.seq, events.c.type, events.c.data, events.c.ts)
             .where(events.c.job == job_id, events.c.seq > after).order_by(events.c.seq).limit(limit))
        with self.db.read() as c:
            return [Event(r.seq, r.type, json.loads(r.data), r.ts) for r in c.execute(q)]

    def recent_job_seconds(self, limit: int = 20) -> float | None:
        """Mean wall time of the last finished jobs (for Retry-After hints)."""
        last = (sa.select((jobs.c.finished - jobs.c.started).label("took"))
                .where(jobs.c.status == DONE, jobs.c.started.is_not(None))
                .order_by(jobs.c.finished.desc()).limit(limit).subquery())
        with self.db.read() as c:
            value = c.execute(sa.select(sa.func.avg(last.c.took))).scalar()
        return None if value is None else float(value)

    def running_etas(self, owner: str) -> list[float | None]:
        """The ETA (seconds) of each of ``owner``'s running jobs (None where not yet known)."""
        q = sa.select(jobs.c.eta).where(jobs.c.owner == owner, jobs.c.status == RUNNING)
        with self.db.read() as c:
            return [r.eta for r in c.execute(q)]

    def frames_since(self, owner: str, since: float) -> list[tuple[float, int]]:
        """(submitted, frames) of ``owner``'s jobs submitted after ``since``, oldest first (expired ones too)."""
        q = (sa.select(usage.c.ts, usage.c.frames).where(usage.c.owner == owner, usage.c.ts > since)
             .order_by(usage.c.ts))
        with self.db.read() as c:
            return [(float(r.ts), int(r.frames)) for r in c.execute(q)]

    # ------------------------------------------------------------------------------------------ ingress side

    def add(self, job_id: str, owner: str, kind: str, model: str, storyboard: dict, video: str,
            parent: str | None = None, frames: int = 0, guard: Callable[[], None] | None = None) -> Job:
        """Insert a queued job.  ``guard`` (which may raise to refuse it: a full queue, a quota) runs while this
        insert holds the lock that every other ``add`` takes, so limits checked there hold under concurrent
        submissions to any replica."""
        now = time.time()
        with self.db.write() as c:
            if guard is not None:
                self.db.lock(c, "skyray-add")  # SQLite: BEGIN IMMEDIATE already is that lock
                guard()
            c.execute(jobs.insert().values(
                id=job_id, owner=owner, kind=kind, model=model, status=QUEUED, storyboard=json.dumps(storyboard),
                video=video, parent=parent, created=now, attempt=0, dispatched=0, restarts=0, cancel_requested=0,
                windows_done=0, windows_total=0, frames=frames))
            c.execute(usage.insert().values(job=job_id, owner=owner, ts=now, frames=frames))
            _event(c, job_id, "status", {"status": QUEUED}, now)
        job = self.get(job_id)
        assert job is not None
        return job

    def claim(self, job_id: str, dispatcher: str | None = None, slots: int | None = None,
              owner_limit: int | None = None) -> int | None:
        """Hand a queued job to ``dispatcher``; returns its new attempt number, or None if it is not claimable:
        already claimed (by any replica), cancelled, finished, or (with ``slots``) its model already has
        ``slots`` claimed jobs, or (with ``owner_limit``) its owner already has that many claimed."""
        where = [jobs.c.id == job_id, jobs.c.status == QUEUED, jobs.c.dispatched == 0, jobs.c.cancel_requested == 0]
        with self.db.write() as c:
            if slots is not None or owner_limit is not None:
                # The counts below and the update are one decision: replicas claiming at once take turns.
                self.db.lock(c, "skyray-claim")
                row = c.execute(sa.select(jobs.c.model, jobs.c.owner).where(jobs.c.id == job_id)).first()
                if row is None:
                    return None
                claimed = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.dispatched == 1)
                if slots is not None and c.execute(claimed.where(jobs.c.model == row.model)).scalar_one() >= slots:
                    return None
                if owner_limit is not None and \
                        c.execute(claimed.where(jobs.c.owner == row.owner)).scalar_one() >= owner_limit:
                    return None
            attempt = c.execute(
                jobs.update().where(*where)
                .values(attempt=jobs.c.attempt + 1, dispatched=1, dispatcher=dispatcher)
                .returning(jobs.c.attempt)).scalar()
        return None if attempt is None else int(attempt)

    def heartbeat(self, dispatcher: str) -> None:
        """``dispatcher`` is alive: the jobs it claimed stay claimed."""
        now = time.time()
        with self.db.write() as c:
            if not c.execute(dispatchers.update().where(dispatchers.c.id == dispatcher).values(seen=now)).rowcount:
                c.execute(dispatchers.insert().values(id=dispatcher, seen=now))

    def retire(self, dispatcher: str) -> None:
        """``dispatcher`` stopped in order: its jobs are orphans now, not after a lease."""
        with self.db.write() as c:
            c.execute(dispatchers.delete().where(dispatchers.c.id == dispatcher))

    def release_orphans(self, lease_s: float) -> list[str]:
        """Queue again every claimed job whose dispatcher has not been seen for ``lease_s`` (its ingress replica
        died or was replaced; a job claimed before dispatchers had names counts too).  The next claim gives each
        a new attempt, which also retires any renderer still busy with an old one.  Returns the job ids."""
        now = time.time()
        alive = sa.select(dispatchers.c.id).where(dispatchers.c.seen > now - lease_s)
        orphan = sa.and_(jobs.c.status.in_((QUEUED, RUNNING)), jobs.c.dispatched == 1,
                         sa.or_(jobs.c.dispatcher.is_(None), jobs.c.dispatcher.not_in(alive)))
        released = []
        with self.db.write() as c:
            for (job_id,) in c.execute(sa.select(jobs.c.id).where(orphan)).all():
                n = c.execute(jobs.update().where(jobs.c.id == job_id, orphan)
                              .values(status=QUEUED, dispatched=0, dispatcher=None, eta=None)).rowcount
                if n:
                    _event(c, job_id, "status", {"status": QUEUED, "requeued": "its ingress replica stopped"}, now)
                    released.append(job_id)
            c.execute(dispatchers.delete().where(dispatchers.c.seen <= now - 10 * lease_s))
        return released

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
        with self.db.write() as c:
            n = c.execute(jobs.update()
                          .where(jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.status.in_((QUEUED, RUNNING)))
                          .values(status=QUEUED, dispatched=0, dispatcher=None, eta=None,
                                  restarts=jobs.c.restarts + int(started))).rowcount
            if n:
                _event(c, job_id, "status", {"status": QUEUED, "requeued": reason}, now)
        return QUEUED if n else None

    def recover(self) -> list[str]:
        """Queue again every job that was dispatched or running (one ingress, restarted: nothing is in flight).
        With several ingress replicas use ``release_orphans``, which spares the jobs of live replicas."""
        now = time.time()
        in_flight = sa.or_(jobs.c.status == RUNNING, sa.and_(jobs.c.status == QUEUED, jobs.c.dispatched == 1))
        ids = []
        with self.db.write() as c:
            for (job_id,) in c.execute(sa.select(jobs.c.id).where(in_flight)).all():
                c.execute(jobs.update().where(jobs.c.id == job_id)
                          .values(status=QUEUED, dispatched=0, dispatcher=None, eta=None))
                _event(c, job_id, "status", {"status": QUEUED, "requeued": "service restarted"}, now)
                ids.append(job_id)
        return ids

    def fail_unserved(self, models: tuple[str, ...]) -> list[str]:
        """Fail waiting jobs for models this deployment no longer serves (nothing would ever take them)."""
        now = time.time()
        failed = []
        with self.db.write() as c:
            rows = c.execute(sa.select(jobs.c.id, jobs.c.model)
                             .where(jobs.c.status == QUEUED, jobs.c.model.not_in(models))).all()
            for job_id, model in rows:
                msg = f"model {model!r} is no longer served here (served: {', '.join(models)})"
                n = c.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == QUEUED)
                              .values(status=FAILED, finished=now, error=msg, dispatched=0,
                                      expires_at=self._expiry(now))).rowcount
                if n:
                    _event(c, job_id, "status", {"status": FAILED, "error": msg}, now)
                    failed.append(job_id)
        return failed

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a job: at once if no renderer has it, else at the renderer's next window boundary."""
        now = time.time()
        with self.db.write() as c:
            n = c.execute(jobs.update()
                          .where(jobs.c.id == job_id, jobs.c.status == QUEUED, jobs.c.dispatched == 0)
                          .values(status=CANCELLED, finished=now, cancel_requested=1,
                                  expires_at=self._expiry(now))).rowcount
            if n:
                _event(c, job_id, "status", {"status": CANCELLED}, now)
            c.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status.in_((QUEUED, RUNNING)))
                      .values(cancel_requested=1))
        return self.get(job_id)

    # ------------------------------------------------------------------------------------------- retention

    def expire(self, now: float | None = None, limit: int = 100) -> list[Job]:
        """Finished jobs past their ``expires_at`` (oldest first; finished jobs without one get it now, from
        ``ttl_s``).  Delete their files, then ``purge`` them."""
        now = time.time() if now is None else now
        with self.db.write() as c:
            if self.ttl_s is not None:  # jobs finished before retention was on (or before this schema)
                c.execute(jobs.update().where(jobs.c.status.in_(TERMINAL), jobs.c.expires_at.is_(None))
                          .values(expires_at=sa.func.coalesce(jobs.c.finished, now) + self.ttl_s))
            rows = c.execute(sa.select(jobs).where(jobs.c.status.in_(TERMINAL), jobs.c.expires_at <= now)
                             .order_by(jobs.c.expires_at).limit(limit)).all()
        return [_job(r) for r in rows]

    def purge(self, expired: list[Job]) -> None:
        """Delete the rows and events of expired jobs, keeping a tombstone so that asking for one answers 410."""
        with self.db.write() as c:
            for job in expired:
                n = c.execute(jobs.delete().where(jobs.c.id == job.id, jobs.c.status.in_(TERMINAL))).rowcount
                if n:
                    c.execute(events.delete().where(events.c.job == job.id))
                    c.execute(expired_jobs.delete().where(expired_jobs.c.id == job.id))
                    c.execute(expired_jobs.insert().values(id=job.id, owner=job.owner,
                                                           expired=job.expires_at or time.time()))
            c.execute(usage.delete().where(usage.c.ts < time.time() - 2 * DAY_S))

    # ----------------------------------------------------------------------------------------- renderer side

    def start(self, job_id: str, attempt: int) -> str:
        """A renderer begins ``attempt``: 'running', 'cancelled' (cancel came first) or 'stale' (superseded)."""
        now = time.time()
        mine = [jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.status == QUEUED]
        with self.db.write() as c:
            n = c.execute(jobs.update().where(*mine, jobs.c.cancel_requested == 0)
                          .values(status=RUNNING, started=sa.func.coalesce(jobs.c.started, now), error=None)).rowcount
            if n:
                _event(c, job_id, "status", {"status": RUNNING, "attempt": attempt}, now)
                return RUNNING
            n = c.execute(jobs.update().where(*mine, jobs.c.cancel_requested == 1)
                          .values(status=CANCELLED, finished=now, dispatched=0,
                                  expires_at=self._expiry(now))).rowcount
            if n:
                _event(c, job_id, "status", {"status": CANCELLED}, now)
        return CANCELLED if n else STALE

    def should_stop(self, job_id: str, attempt: int) -> bool:
        """True when the job was cancelled or handed to a newer attempt."""
        q = sa.select(jobs.c.attempt, jobs.c.cancel_requested, jobs.c.status).where(jobs.c.id == job_id)
        with self.db.read() as c:
            row = c.execute(q).first()
        return row is None or row[0] != attempt or bool(row[1]) or row[2] != RUNNING

    def progress(self, job_id: str, attempt: int, windows_done: int, windows_total: int, shot: str | None,
                 eta: float | None, event: tuple[str, dict] | None = None) -> bool:
        now = time.time()
        with self.db.write() as c:
            n = c.execute(jobs.update()
                          .where(jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.status == RUNNING)
                          .values(windows_done=windows_done, windows_total=windows_total, shot=shot,
                                  eta=eta)).rowcount
            if n and event is not None:
                _event(c, job_id, event[0], event[1], now)
        return bool(n)

    def finish(self, job_id: str, attempt: int, status: str, error: str | None) -> bool:
        """Record the end of ``attempt`` (done, failed or cancelled); False if the attempt was superseded."""
        assert status in TERMINAL
        now = time.time()
        data: dict[str, Any] = {"status": status}
        if error:
            data["error"] = error
        done = jobs.c.windows_total if status == DONE else jobs.c.windows_done
        with self.db.write() as c:
            n = c.execute(jobs.update()
                          .where(jobs.c.id == job_id, jobs.c.attempt == attempt,
                                 jobs.c.status.in_((QUEUED, RUNNING)))
                          .values(status=status, finished=now, error=error, dispatched=0, eta=None,
                                  windows_done=done, expires_at=self._expiry(now))).rowcount
            if n:
                _event(c, job_id, "status", data, now)
        return bool(n)

    def add_event(self, job_id: str, type_: str, data: dict) -> None:
        with self.db.write() as c:
            c.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id).with_for_update())  # order with the row
            _event(c, job_id, type_, data, time.time())


def _alive(now: float):
    return sa.or_(jobs.c.expires_at.is_(None), jobs.c.expires_at > now)


def _event(c: Connection, job_id: str, type_: str, data: dict, ts: float) -> None:
    c.execute(events.insert().values(job=job_id, type=type_, data=json.dumps(data), ts=ts))


def _job(row) -> Job:
    d = {k: row._mapping[k] for k in _JOB_FIELDS}
    d["storyboard"] = json.loads(d["storyboard"])
    for key in ("dispatched", "cancel_requested"):
        d[key] = bool(d[key])
    return Job(**d)
