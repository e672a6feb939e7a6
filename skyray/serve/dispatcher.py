"""The dispatcher: hands queued jobs to the renderer deployments, oldest first, and watches them end.

Every ingress replica runs one, all claiming from the one job store: a claim is a conditional update, so each
job goes to exactly one dispatcher, and the store counts claimed jobs per model, so all of them together keep
at most ``slots`` renderer calls open per model (and at most ``owner_limit`` per token).  Each renderer replica
takes one call at a time (``max_ongoing_requests=1``); calls beyond the running replicas wait in the handle,
which is the demand Serve's autoscaler sees.

A dispatcher writes a heartbeat; one that has been silent for ``lease_s`` is presumed dead (its replica was
killed), and whichever dispatcher notices first queues its jobs again; the next claim is a new attempt, which
also stops a renderer still busy with the old one.  A renderer call that raises (the replica died, the
deployment is being replaced) is not the job's fault: the job is queued again after a back-off and resumes from
its checkpoints; after ``max_restarts`` it fails.  What the renderer finishes it records in the store itself, so
nothing here is needed to keep a result.  Finished jobs past their ``expires_at`` are swept here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from skyray.serve.files import JobFiles
from skyray.serve.store import INTERRUPTED, QUEUED, STATES, JobStore

log = logging.getLogger("skyray.serve")
MAX_BACKOFF_S = 30.0
MAX_SWEEP_S = 60.0


class Dispatcher:
    def __init__(self, store: JobStore, renderers: dict[str, Any], slots: int, max_restarts: int,
                 metrics: dict[str, Any] | None = None, poll_s: float = 0.5, lease_s: float = 10.0,
                 owner_limit: int | None = None, jobs_dir: Path | str | JobFiles | None = None,
                 name: str | None = None) -> None:
        self.store = store
        self.renderers = renderers  # model -> DeploymentHandle of its Renderer
        self.slots = slots
        self.max_restarts = max_restarts
        self.metrics = metrics
        self.poll_s = poll_s
        self.lease_s = lease_s
        self.owner_limit = owner_limit
        # Where job folders live, for retention (None: no sweeping).
        self.files = jobs_dir if jobs_dir is None or isinstance(jobs_dir, JobFiles) else JobFiles(jobs_dir)
        self.id = name or uuid.uuid4().hex
        self.in_flight: dict[str, dict[str, asyncio.Task]] = {m: {} for m in renderers}
        self._not_before: dict[str, float] = {}  # job id -> earliest re-dispatch after a renderer failure
        self._failures: dict[str, int] = {}  # job id -> renderer calls in a row that raised
        self._due = {"heartbeat": 0.0, "orphans": 0.0, "sweep": 0.0}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.store.heartbeat(self.id)
        self._task = asyncio.get_running_loop().create_task(self.run())

    def stop(self) -> None:
        """Stop dispatching and hand this dispatcher's jobs to the others now (rather than after a lease)."""
        if self._task is not None:
            self._task.cancel()
        self.store.retire(self.id)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                self.housekeeping()
                self.dispatch()
                self.record_metrics()
            except Exception:  # a database restart or similar: try again next tick rather than stop dispatching
                log.exception("dispatcher tick failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass

    def _time_for(self, what: str, every: float) -> bool:
        now = time.monotonic()
        if now < self._due[what]:
            return False
        self._due[what] = now + every
        return True

    def housekeeping(self) -> None:
        if self._time_for("heartbeat", self.lease_s / 4):
            self.store.heartbeat(self.id)
        if self._time_for("orphans", self.lease_s / 2):
            released = self.store.release_orphans(self.lease_s)
            if released:
                log.warning("queued again %d job(s) of an ingress replica that stopped: %s", len(released),
                            ", ".join(released))
        ttl = self.store.ttl_s
        if self.files is not None and ttl is not None and self._time_for("sweep", min(MAX_SWEEP_S, ttl / 4)):
            self.sweep()

    def sweep(self) -> list[str]:
        """Delete the files, then the rows, of finished jobs past their expiry."""
        expired = self.store.expire()
        assert self.files is not None
        for job in expired:
            self.files.delete(job.id)
        self.store.purge(expired)
        if expired:
            log.info("expired %d finished job(s)", len(expired))
        return [j.id for j in expired]

    def dispatch(self) -> None:
        now = time.monotonic()
        for model, handle in self.renderers.items():
            running = self.in_flight[model]
            free = self.slots - len(running)
            if free <= 0:
                continue
            # Look past the first few: jobs in back-off and jobs of tokens at their running limit are skipped.
            for job in self.store.queued(model, limit=free + len(self._not_before) + 32):
                if free <= 0:
                    break
                if self._not_before.get(job.id, 0) > now:
                    continue
                attempt = self.store.claim(job.id, self.id, self.slots, self.owner_limit)
                if attempt is None:
                    continue
                self._not_before.pop(job.id, None)
                running[job.id] = asyncio.get_running_loop().create_task(self._render(model, handle, job.id, attempt))
                free -= 1

    async def _render(self, model: str, handle: Any, job_id: str, attempt: int) -> None:
        try:
            status = await handle.render.remote(job_id, attempt)
            log.info("job %s attempt %d ended: %s", job_id, attempt, status)
            if status == INTERRUPTED:  # the replica was stopped (scaled down, redeployed) mid-job
                self._requeue(job_id, attempt, "renderer stopped", crashed=False)
            else:
                self._failures.pop(job_id, None)
        except Exception as exc:
            reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self._requeue(job_id, attempt, reason, crashed=True)
        finally:
            self.in_flight[model].pop(job_id, None)
            self.wake()

    def _requeue(self, job_id: str, attempt: int, reason: str, crashed: bool) -> None:
        new = self.store.requeue(job_id, attempt, reason, self.max_restarts if crashed else None)
        log.warning("job %s attempt %d lost its renderer (%s); now %s", job_id, attempt, reason, new)
        if new == QUEUED:
            failures = self._failures[job_id] = self._failures.get(job_id, 0) + 1
            self._not_before[job_id] = time.monotonic() + min(MAX_BACKOFF_S, 2.0 ** failures)
        else:
            self._failures.pop(job_id, None)

    def record_metrics(self) -> None:
        if not self.metrics:
            return
        counts = self.store.counts()
        for state in STATES:
            self.metrics["jobs"].set(counts[state], tags={"state": state})
        self.metrics["queue_depth"].set(counts[QUEUED])
