"""The ingress deployment: the HTTP API and a dispatcher, in each of ``ingress_replicas`` replicas.

Replicas share nothing but the job store: any of them accepts a job, shows it, streams its events and cancels
it, whichever accepted it.  Each runs a dispatcher claiming from the store (each job exactly once, see
``dispatcher``); a replica that dies leaves its claimed jobs to the others, which queue them again once its
heartbeat is older than ``dispatcher_lease_s`` (at once when it was stopped in order).
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from skyray.serve.auth import TokenAuth
from skyray.serve.dispatcher import Dispatcher
from skyray.serve.files import JobFiles
from skyray.serve.options import ServeOptions
from skyray.serve.store import JobStore

log = logging.getLogger("skyray.serve")
REPLICA_HEADER = "x-skyray-replica"


class IngressService:
    """What one ingress replica holds: its options, token check, job store and dispatcher (not yet started).
    The API (``create_api``) runs on this; the Serve deployment below adds metrics and starts the dispatcher."""

    def __init__(self, options: ServeOptions, token_hashes: tuple[str, ...], renderers: dict[str, Any],
                 metrics: dict[str, Any] | None = None, name: str | None = None) -> None:
        self.options = options
        self.auth = TokenAuth(token_hashes, options.insecure_no_auth)
        options.jobs_dir.mkdir(parents=True, exist_ok=True)  # job files, or the staging of uploads for ``outputs``
        self.files = JobFiles(options.outputs_target)
        self.store = JobStore(options.store_target, ttl_s=options.ttl_s)
        orphans = self.store.fail_unserved(tuple(renderers))
        if orphans:
            log.warning("failed %d waiting job(s) for models no longer served: %s", len(orphans), ", ".join(orphans))
        self.metrics = metrics
        self.dispatcher = Dispatcher(self.store, renderers, options.max_replicas, options.max_restarts, metrics,
                                     lease_s=options.dispatcher_lease_s, owner_limit=options.quota_running or None,
                                     jobs_dir=self.files, name=name)

    def asgi_app(self):
        from skyray.serve.api import create_api

        app = create_api(self)
        app.add_middleware(ReplicaHeader, replica=self.dispatcher.id)
        return app

    def on_submitted(self, kind: str) -> None:
        if self.metrics:
            self.metrics["submitted"].inc(tags={"kind": kind})
        self.dispatcher.wake()


@serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress(IngressService):
    async def __init__(self, options: ServeOptions, token_hashes: tuple[str, ...], renderers: dict[str, Any]) -> None:
        from ray.util import metrics

        import skyray.models  # noqa: F401
        import skyray.plan  # noqa: F401 - import torch and the planner now, not in the first request

        gauges = {
            "queue_depth": metrics.Gauge("skyray_queue_depth", "Jobs waiting for a renderer"),
            "jobs": metrics.Gauge("skyray_jobs", "Jobs in the store, by state", tag_keys=("state",)),
            "submitted": metrics.Counter("skyray_jobs_submitted", "Jobs accepted, by kind", tag_keys=("kind",)),
        }
        super().__init__(options, token_hashes, renderers, gauges, serve.get_replica_context().replica_id.unique_id)
        self.dispatcher.start()
        log.info("ingress replica %s dispatching from %s", self.dispatcher.id, self.store.db.redacted)

    def __serve_build_asgi_app__(self):
        return self.asgi_app()

    def check_health(self) -> None:
        if not self.dispatcher.alive:
            raise RuntimeError("the dispatcher loop stopped")

    def __del__(self) -> None:
        # Serve calls this when the replica is stopped in order (scale down, redeploy): its jobs go to the other
        # replicas now, not after a lease.  A killed replica never gets here; the lease covers it.
        dispatcher = getattr(self, "dispatcher", None)
        if dispatcher is not None:
            try:
                dispatcher.stop()
            except Exception:
                log.exception("could not retire dispatcher %s", dispatcher.id)


class ReplicaHeader:
    """ASGI middleware naming the replica that answered (``X-Skyray-Replica``), for operators and tests."""

    def __init__(self, app, replica: str) -> None:
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)
