"""Helpers shared by the Serve tests (constants, polling, downloading videos)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

TOKEN_A = "test-token-alpha-0123456789"
TOKEN_B = "test-token-bravo-9876543210"
APP = "skyray"

# 32x32 frames, 2 steps, a 17-frame window handing 5 frames on: a 9-frame shot renders in well under a second.
SMALL = {"resolution": "32x32", "fps": 8, "steps": 2, "base_num_frames": 17, "overlap_history": 5}
LONG = {**SMALL, "steps": 3, "frames": 97}  # 8 windows: long enough to act while it runs


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 90.0,
             check=lambda job: True) -> dict:
    """Poll a job until its status is in ``statuses`` and ``check(job)`` holds."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job.get("status") in statuses and check(job):
            return job
        if job.get("status") in {"failed"} - statuses:
            raise AssertionError(f"job {job_id} failed: {job.get('error')}")
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not {statuses} after {timeout} s: {job}")


def video_frames(client: httpx.Client, job_id: str, tmp_path: Path) -> int:
    from skyray.output.encode import probe

    r = client.get(f"/v1/jobs/{job_id}/video")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{job_id}.mp4"
    path.write_bytes(r.content)
    return probe(path).frames


def cancel_all(client: httpx.Client) -> None:
    for job in client.get("/v1/jobs").json()["jobs"]:
        if job["status"] in ("queued", "running"):
            client.delete(f"/v1/jobs/{job['id']}")
    for job in client.get("/v1/jobs").json()["jobs"]:
        if job["status"] in ("queued", "running"):
            wait_for(client, job["id"], {"cancelled", "done", "failed"})


def follow(client: httpx.Client, job_id: str, on_event=None, timeout: float = 90) -> list[tuple[str, dict]]:
    """Read a job's server-sent events until the server ends the stream."""
    events: list[tuple[str, dict]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        kind, data = None, None
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
            elif line == "" and kind is not None:
                events.append((kind, data))
                if on_event is not None:
                    on_event(kind, data)
                kind, data = None, None
    return events
