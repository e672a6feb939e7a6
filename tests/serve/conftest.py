"""One Ray + Serve instance for all Serve tests: the skyray app on the tiny model, on a free 127.0.0.1 port.

Limits are set small so the limit tests are cheap: a queue of 3, 64 KiB bodies, 16 KiB images, 64x64 frames.
Set SKYRAY_TEST_RAY_LOGS=1 to see the replicas' logs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serve_helpers import APP, TOKEN_A, TOKEN_B


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeEnv:
    base_url: str
    options: object  # ServeOptions
    metrics_url: str | None  # Ray's Prometheus endpoint, when this session started Ray

    def client(self, token: str | None = TOKEN_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def deploy(self) -> None:
        from ray import serve

        from skyray.serve import build_app

        serve.run(build_app(self.options), name=APP, route_prefix="/")

    def redeploy(self) -> None:
        """Delete the app (ingress and renderers die mid-job) and deploy it again on the same job store."""
        from ray import serve

        serve.delete(APP)
        self.deploy()


@pytest.fixture(scope="session")
def serve_env(tmp_path_factory) -> Iterator[ServeEnv]:
    import ray
    from ray import serve

    from skyray.serve import ServeOptions

    started_ray = not ray.is_initialized()
    metrics_port = None
    if started_ray:
        metrics_port = free_port()
        os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics visible within a second
        from skyray.executors.ray import EMULATED_SLOT

        ray.init(address="local", num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port,
                 resources={EMULATED_SLOT: 64}, log_to_driver=os.environ.get("SKYRAY_TEST_RAY_LOGS") == "1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    data = tmp_path_factory.mktemp("serve-data")
    options = ServeOptions(
        models=("tiny",), device="cpu", data_dir=str(data), tokens=(TOKEN_A, TOKEN_B), gpus_per_replica=0,
        max_queue=3, max_body_bytes=64 << 10, max_image_bytes=16 << 10, max_pixels=64 * 64, max_side=64,
        max_frames=200, max_steps=10, preview_size=64, max_restarts=3, graceful_shutdown_s=0.5,
    )
    env = ServeEnv(f"http://127.0.0.1:{port}", options,
                   f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None)
    env.deploy()
    yield env
    serve.shutdown()
    if started_ray:
        ray.shutdown()


@pytest.fixture(scope="session")
def client(serve_env) -> Iterator[httpx.Client]:
    with serve_env.client() as c:
        yield c


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """One real PostgreSQL server for the session (see databases.py)."""
    import shutil
    import tempfile

    from databases import PostgresServer

    # Not under pytest's 0700 temp folder: the server runs as its own system user and must reach its data.
    folder = tempfile.mkdtemp(prefix="skyray-pgdata-")
    server = PostgresServer(Path(folder))
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def job_db(request, tmp_path) -> str:
    """A fresh job database: an SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite")
    return request.getfixturevalue("postgres").new_database()
