"""Accepted jobs survive restarts: a killed renderer replica, and the whole app deleted and deployed again.

Each test has one long job running (killed mid-shot) and more waiting; every one must finish with the right
number of frames, and the long one must have resumed from its window checkpoints rather than starting over.
"""

from __future__ import annotations

import pytest
from serve_helpers import APP, SMALL, follow, video_frames, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# 64x64, 193 frames = 49 latents: 16 windows of 10 steps, several seconds on the tiny model.
LONGER = {**SMALL, "resolution": "64x64", "steps": 10, "frames": 193}


def submit(client, **body) -> str:
    r = client.post("/v1/shots", json={"prompt": "waves on a rocky shore", **SMALL, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def renderer_replicas() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}#Renderer#")]


def mid_render(job: dict) -> bool:
    return 2 <= job["progress"]["windows_done"] < job["progress"]["windows_total"] - 4


def check_finished(client, jobs: dict[str, int], tmp_path) -> None:
    for job_id, frames in jobs.items():
        wait_for(client, job_id, {"done"}, timeout=120)
        assert video_frames(client, job_id, tmp_path) == frames, job_id


def resumed_windows(client, job_id: str) -> int:
    manifest = client.get(f"/v1/jobs/{job_id}/manifest").json()
    return sum(1 for w in manifest["shots"][0]["windows"] if w.get("resumed"))


def test_killed_renderer_replica(serve_env, client, tmp_path):
    import ray

    long_job = submit(client, **LONGER)
    waiting = {submit(client, frames=9): 9, submit(client, frames=17, seed=4): 17}
    wait_for(client, long_job, {"running"}, check=mid_render)
    replicas = renderer_replicas()
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)

    check_finished(client, {long_job: 193, **waiting}, tmp_path)
    job = client.get(f"/v1/jobs/{long_job}").json()
    assert job["restarts"] == 1
    assert resumed_windows(client, long_job) >= 2
    assert renderer_replicas() and renderer_replicas() != replicas  # Serve replaced the replica


def test_app_redeployed(serve_env, client, tmp_path):
    long_job = submit(client, **LONGER)
    waiting = {submit(client, frames=9, seed=7): 9, submit(client, frames=13): 13}
    wait_for(client, long_job, {"running"}, check=mid_render)

    # The ingress and the renderer stop mid-job (the renderer gets 0.5 s grace); the store is all that is left.
    serve_env.redeploy()

    check_finished(client, {long_job: 193, **waiting}, tmp_path)
    assert resumed_windows(client, long_job) >= 2
    statuses = [d for kind, d in follow(client, long_job) if kind == "status"]
    # Re-queued by whichever noticed first: the old ingress (its renderer call died) or the new one on start.
    assert any(d["status"] == "queued" and "requeued" in d for d in statuses)
    assert statuses[-1]["status"] == "done"
