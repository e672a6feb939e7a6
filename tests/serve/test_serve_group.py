"""A renderer replica that is a group of several ranks: the replica's own placement group holds one rank actor
per bundle (CPU-emulated here), which split every forward; the replica drives them."""

from __future__ import annotations

import dataclasses

import pytest
from serve_helpers import SMALL, TOKEN_A, video_frames, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_rank_replica_renders_a_shot(serve_env, tmp_path):
    import httpx
    from ray import serve

    from skyray.serve import build_app

    options = dataclasses.replace(serve_env.options, data_dir=str(tmp_path / "group-data"), emulated_ranks=2,
                                  cpus_per_replica=0.5, tokens=serve_env.options.tokens)
    serve.run(build_app(options), name="group", route_prefix="/group")
    try:
        with httpx.Client(base_url=f"{serve_env.base_url}/group", timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN_A}"}) as client:
            r = client.post("/v1/shots", json={"prompt": "a lighthouse at dawn", "frames": 25, **SMALL})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            job = wait_for(client, job_id, {"done"}, timeout=180)
            assert job["progress"]["windows_done"] == job["progress"]["windows_total"] == 2
            assert video_frames(client, job_id, tmp_path) == 25
            manifest = client.get(f"/v1/jobs/{job_id}/manifest").json()
            workers = {w["worker"] for s in manifest["shots"] for w in s["windows"]}
            assert all("/b0" in w for w in workers)  # rank 0's actor reports for the group
            # CFG-parallel over the two ranks: rank 0 ran only the conditional pass of each of the 2 rows
            # (a single rank runs 2 x 2 forwards per window).
            assert [w["forwards"] for s in manifest["shots"] for w in s["windows"]] == [2, 2]
    finally:
        serve.delete("group")
