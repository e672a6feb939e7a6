"""The dispatcher: hands queued jobs to the renderer deployments, oldest first, and watches them end.

Per model it keeps at most ``max_replicas`` renderer calls open.  Each renderer replica takes one call at a time
(``max_ongoing_requests=1``); calls beyond the running replicas wait in the handle, which is the demand Serve's
autoscaler sees.  A call that raises (the replica died, the deployment is being replaced) is not the job's fault:
the job is queued again after a back-off and resumes from its checkpoints; after ``max_restarts`` it fails.
What the renderer finishes it records in the store itself, so nothing here is needed to keep a result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from skyray.serve.store import INTERRUPTED, QUEUED, STATES, JobStore

log = logging.getLogger("skyray.serve")
MAX_BACKOFF_S = 30.0


class Dispatcher:
    def __init__(self, store: JobStore, renderers: dict[str, Any], slots: int, max_restarts: int,
                 metrics: dict[str, Any] | None = None, poll_s: float = 0.5) -> None:
        self.store = store
        self.renderers = renderers  # model -> DeploymentHandle of its Renderer
        self.slots = slots
        self.max_restarts = max_restarts
        self.metrics = metrics
        self.poll_s = poll_s
        self.in_flight: dict[str, dict[str, asyncio.Task]] = {m: {} for m in renderers}
        self._not_before: dict[str, float] = {}  # job id -> earliest re-dispatch after a renderer failure
        self._failures: dict[str, int] = {}  # job id -> renderer calls in a row that raised
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                self.dispatch()
                self.record_metrics()
            except Exception:  # a locked database or similar: try again next tick rather than stop dispatching
                log.exception("dispatcher tick failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass

    def dispatch(self) -> None:
        now = time.monotonic()
        for model, handle in self.renderers.items():
            running = self.in_flight[model]
            free = self.slots - len(running)
            if free <= 0:
                continue
            for job in self.store.queued(model, limit=free + len(self._not_before)):
                if free <= 0:
                    break
                if self._not_before.get(job.id, 0) > now:
                    continue
                attempt = self.store.claim(job.id)
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
