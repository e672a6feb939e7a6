"""The ingress deployment: the HTTP API, the job store and the dispatcher, in one replica.

It must run as a single replica: its dispatcher is the only one handing out jobs, and on start it re-queues
every job that was dispatched or running, since after a restart nothing it handed out is being watched.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from skyray.serve.auth import TokenAuth
from skyray.serve.dispatcher import Dispatcher
from skyray.serve.options import ServeOptions
from skyray.serve.store import JobStore

log = logging.getLogger("skyray.serve")


@serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    async def __init__(self, options: ServeOptions, token_hashes: tuple[str, ...], renderers: dict[str, Any]) -> None:
        from ray.util import metrics

        import skyray.models  # noqa: F401
        import skyray.plan  # noqa: F401 - import torch and the planner now, not in the first request

        self.options = options
        self.auth = TokenAuth(token_hashes, options.insecure_no_auth)
        options.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(options.db_path)
        recovered = self.store.recover()
        if recovered:
            log.info("re-queued %d job(s) that were in flight before this start: %s", len(recovered),
                     ", ".join(recovered))
        orphans = self.store.fail_unserved(tuple(renderers))
        if orphans:
            log.warning("failed %d waiting job(s) for models no longer served: %s", len(orphans), ", ".join(orphans))
        self.metrics = {
            "queue_depth": metrics.Gauge("skyray_queue_depth", "Jobs waiting for a renderer"),
            "jobs": metrics.Gauge("skyray_jobs", "Jobs in the store, by state", tag_keys=("state",)),
            "submitted": metrics.Counter("skyray_jobs_submitted", "Jobs accepted, by kind", tag_keys=("kind",)),
        }
        self.dispatcher = Dispatcher(self.store, renderers, options.max_replicas, options.max_restarts, self.metrics)
        self.dispatcher.start()

    def __serve_build_asgi_app__(self):
        from skyray.serve.api import create_api

        return create_api(self)

    def on_submitted(self, kind: str) -> None:
        self.metrics["submitted"].inc(tags={"kind": kind})
        self.dispatcher.wake()

    def check_health(self) -> None:
        if not self.dispatcher.alive:
            raise RuntimeError("the dispatcher loop stopped")
