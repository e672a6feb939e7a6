"""Retention and per-token quotas through the real HTTP API (uvicorn on 127.0.0.1, no Ray) on SQLite and on
PostgreSQL.  No renderer runs here: the test plays the renderer's part through the store (claim, start, finish)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from serve_helpers import SMALL, TOKEN_A, TOKEN_B

from skyray.serve.ingress import REPLICA_HEADER, IngressService
from skyray.serve.options import ServeOptions, token_hash
from skyray.serve.quotas import frames_free_in
from skyray.serve.store import DONE, RUNNING
from skyray.serve.store.jobs import DAY_S


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_api(job_db: str, tmp_path, **overrides):
    import uvicorn

    db = {"database_url": job_db} if "://" in job_db else {"job_db": job_db}
    options = ServeOptions(models=("tiny",), device="cpu", data_dir=str(tmp_path / "data"), tokens=(TOKEN_A, TOKEN_B),
                           gpus_per_replica=0, max_pixels=64 * 64, max_side=64, max_frames=200, max_steps=10,
                           **db, **overrides).for_replicas()
    service = IngressService(options, (token_hash(TOKEN_A), token_hash(TOKEN_B)), {"tiny": None}, name="test")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(service.asgi_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(10)
        service.store.close()


def client(base: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def submit(c: httpx.Client, **body) -> httpx.Response:
    return c.post("/v1/shots", json={"prompt": "a lighthouse at dusk", **SMALL, "frames": 9, **body})


def render(service: IngressService, job_id: str, status: str = DONE, eta: float | None = None) -> int:
    """Do what a renderer does with a job: claim, start, (progress), finish."""
    store = service.store
    attempt = store.claim(job_id, "test")
    assert store.start(job_id, attempt) == RUNNING
    if eta is not None:
        store.progress(job_id, attempt, 1, 3, job_id, eta)
    if status != RUNNING:
        assert store.finish(job_id, attempt, status, None)
    return attempt


def test_finished_jobs_expire_files_and_rows_and_continuing_answers_410(job_db, tmp_path):
    with running_api(job_db, tmp_path, job_ttl_s=1.0) as (base, service), client(base, TOKEN_A) as a, \
            client(base, TOKEN_B) as b:
        r = submit(a)
        assert r.status_code == 202, r.text
        assert r.headers[REPLICA_HEADER] == "test"
        job_id = r.json()["id"]
        assert a.get(f"/v1/jobs/{job_id}").json()["expires_at"] is None  # waiting jobs never expire
        render(service, job_id)
        folder = service.options.jobs_dir / job_id
        (folder / "shots").mkdir(parents=True, exist_ok=True)
        (folder / "shots" / f"{job_id}.mp4").write_bytes(b"not really a video")
        job = a.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == DONE and job["expires_at"] == pytest.approx(job["finished"] + 1.0)
        continued = submit(a, continue_from=job_id)
        assert continued.status_code != 410, continued.text  # (409/422 here: no tail latents were rendered)

        time.sleep(1.2)
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/video"):
            r = a.get(path)
            assert r.status_code == 410 and "expired at" in r.json()["detail"], (path, r.text)
        r = submit(a, continue_from=job_id)
        assert r.status_code == 410, r.text
        assert r.json()["detail"].startswith(f"continue_from: job {job_id} expired at")
        assert b.get(f"/v1/jobs/{job_id}").status_code == 404  # someone else's expired job is just absent
        assert folder.exists()  # gone to clients at once; the sweep deletes it

        assert service.dispatcher.sweep() == [job_id]
        assert not folder.exists() and service.store.events(job_id) == []
        assert a.get(f"/v1/jobs/{job_id}").status_code == 410
        assert job_id not in [j["id"] for j in a.get("/v1/jobs").json()["jobs"]]


def test_queued_and_running_quotas_answer_429_with_retry_after(job_db, tmp_path):
    with running_api(job_db, tmp_path, quota_queued=2, quota_running=1) as (base, service), \
            client(base, TOKEN_A) as a, client(base, TOKEN_B) as b:
        first, second = (submit(a).json()["id"] for _ in range(2))
        r = submit(a)
        assert r.status_code == 429 and "quota_queued 2" in r.json()["detail"], r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert submit(b).status_code == 202  # the limit is per token

        render(service, first, status=RUNNING, eta=41.2)  # one of A's renders, one waits
        r = submit(a)
        assert r.status_code == 429 and "quota_running 1" in r.json()["detail"], r.text
        assert r.headers["Retry-After"] == "42"  # when its running job is due to finish
        # The running limit also holds in dispatch: A's waiting job is not claimed while A has one rendering.
        assert service.store.claim(second, "test", owner_limit=1) is None


def test_frames_per_day_quota_says_when_it_frees(job_db, tmp_path):
    with running_api(job_db, tmp_path, quota_frames_per_day=30) as (base, service), client(base, TOKEN_A) as a:
        t0 = time.time()
        assert submit(a, frames=17).status_code == 202
        assert submit(a, frames=9).status_code == 202
        r = submit(a, frames=9)
        assert r.status_code == 429, r.text
        assert "quota_frames_per_day 30" in r.json()["detail"]
        # 26 of 30 used: the 9 fit once the first job (17 frames) is a day old.
        assert abs(t0 + DAY_S - time.time() - int(r.headers["Retry-After"])) < 5
        assert service.store.counts()["queued"] == 2


def test_frames_free_in():
    day = [(100.0, 17), (200.0, 9)]
    assert frames_free_in(day, 4, 30, now=300.0) == 0.0  # 26 + 4 fit now
    assert frames_free_in(day, 9, 30, now=300.0) == 100.0 + DAY_S - 300.0  # after the 17 age out
    assert frames_free_in(day, 25, 30, now=300.0) == 200.0 + DAY_S - 300.0  # after both
    assert frames_free_in(day, 31, 30, now=300.0) is None  # never
