"""Ray Serve app for shot and film requests (``skyray serve``, or ``serve run skyray.serve:app``).

HTTP API (OpenAPI at ``/openapi.json``; every ``/v1`` route needs ``Authorization: Bearer <token>``)::

    POST   /v1/shots                 one shot as JSON (base64 image/end_image; continue_from a finished job)  202
    POST   /v1/films                 a storyboard as YAML (application/x-yaml, text/yaml) or JSON              202
    GET    /v1/jobs                  your jobs
    GET    /v1/jobs/{id}             status, progress (window i of n), ETA, error
    GET    /v1/jobs/{id}/events      server-sent events: status, shot start/end, each window + JPEG preview
    GET    /v1/jobs/{id}/video       the mp4 (Range requests -> 206); /manifest the render manifest
    DELETE /v1/jobs/{id}             cancel (at once if waiting, else at the next window boundary)
    GET    /healthz                  no token needed

Layout: ``Ingress`` (``ingress_replicas`` replicas, each a FastAPI app and a dispatcher, sharing the job store)
and one ``Renderer`` deployment per served model (a replica = one placement group of GPU bundles, STRICT_PACK;
one job at a time; autoscaled on waiting jobs).  Jobs render through ``compile_plan`` + ``render_film`` into
``<data_dir>/jobs/<id>/``.

Restarts lose no accepted job: the job store is the source of truth, SQLite (``SKYRAY_JOB_DB``, default
``<data_dir>/jobs.sqlite``; one node) or PostgreSQL (``SKYRAY_DATABASE_URL``; any number of nodes and ingress
replicas).  Each job is claimed by one dispatcher; a dispatcher whose heartbeat stops (its replica died) has its
jobs queued again by another; a renderer call that dies re-queues its job; each re-dispatch is a new *attempt*
that supersedes older ones; and ``render_film`` run again in the job's folder reuses finished shots and resumes
the running one from its last window checkpoint.  Finished jobs expire after ``job_ttl_s`` (files and rows).
Job files (uploaded inputs, a continuation's parent shots, the outputs) live in ``SKYRAY_OUTPUTS``: the local
data directory by default (then shared by the ingress replicas and every renderer), or an object-store URI
(``s3://...``) that every node reaches, read and written through ``skyray.output.location`` (``serve/files.py``).

``app`` is built on first access from ``SKYRAY_*`` environment variables (see :class:`ServeOptions`), so
importing this package starts nothing and needs no token; ``build_app(options)`` builds one explicitly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skyray.serve.options import ServeOptions

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = ["ServeOptions", "app", "build_app"]


def build_app(options: ServeOptions) -> Application:
    from skyray.serve.application import build_app as _build

    return _build(options)


def __getattr__(name: str):
    if name == "app":
        return build_app(ServeOptions.from_env())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
