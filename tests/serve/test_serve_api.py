"""The HTTP API end to end: real Serve on 127.0.0.1, the tiny model, real renders, real mp4s."""

from __future__ import annotations

import base64
import io
import json
import os
import time

import httpx
import pytest
import yaml
from PIL import Image
from serve_helpers import LONG, SMALL, TOKEN_B, cancel_all, follow, video_frames, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

def submit(client: httpx.Client, **body) -> str:
    r = client.post("/v1/shots", json={"prompt": "a lighthouse at dawn", **SMALL, **body})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    return r.json()["id"]


def png(size: int = 32, color=(200, 80, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------------------------------- service


def test_openapi_and_health(serve_env):
    with serve_env.client(token=None) as anon:
        spec = anon.get("/openapi.json").json()
        health = anon.get("/healthz")
    paths = spec["paths"]
    for p in ("/v1/shots", "/v1/films", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/video",
              "/v1/jobs/{job_id}/manifest"):
        assert p in paths
    assert "delete" in paths["/v1/jobs/{job_id}"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "application/x-yaml" in paths["/v1/films"]["post"]["requestBody"]["content"]
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_token_required(serve_env):
    body = {"prompt": "x", "frames": 9, **SMALL}
    with serve_env.client(token=None) as anon:
        r = anon.post("/v1/shots", json=body)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert anon.get("/v1/jobs").status_code == 401
        assert anon.get("/v1/jobs", headers={"Authorization": "Basic dXNlcjpwYXNz"}).status_code == 401
    with serve_env.client(token="not-a-token-we-know-of") as wrong:
        assert wrong.post("/v1/shots", json=body).status_code == 401
        assert wrong.get("/v1/jobs/" + "0" * 32).status_code == 401


# ---------------------------------------------------------------------------------------------- happy paths


def test_shot_events_video_range_manifest(client, tmp_path):
    job_id = submit(client, frames=9, seed=3)
    events = follow(client, job_id)
    kinds = [k for k, _ in events]
    statuses = [d["status"] for k, d in events if k == "status"]
    assert statuses[0] == "queued" and "running" in statuses and statuses[-1] == "done"
    assert {"plan", "shot_start", "window", "shot_done"} <= set(kinds)
    window = next(d for k, d in events if k == "window")
    assert (window["window"], window["windows"], window["windows_done"], window["windows_total"]) == (0, 1, 1, 1)
    preview = Image.open(io.BytesIO(base64.b64decode(window["preview"]["base64"])))
    assert preview.format == "JPEG" and max(preview.size) <= 64

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "done" and job["progress"]["fraction"] == 1.0 and job["error"] is None
    assert job["video_url"] == f"/v1/jobs/{job_id}/video"
    assert video_frames(client, job_id, tmp_path) == 9

    size = len(client.get(f"/v1/jobs/{job_id}/video").content)
    r = client.get(f"/v1/jobs/{job_id}/video", headers={"Range": "bytes=0-99"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 0-99/{size}"
    assert len(r.content) == 100
    tail = client.get(f"/v1/jobs/{job_id}/video", headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and len(tail.content) == 50

    manifest = client.get(f"/v1/jobs/{job_id}/manifest").json()
    assert manifest["film"]["frames"] == 9
    assert [s["id"] for s in manifest["shots"]] == [job_id]


def test_film_yaml_and_json(client, tmp_path):
    film = {
        "title": "two shots", "resolution": "32x32", "fps": 8, "seed": 1,
        "defaults": {"steps": 2, "base_num_frames": 17, "overlap_history": 5},
        "shots": [
            {"id": "open", "prompt": "a harbor at night", "frames": 9},
            {"id": "more", "continue": True, "prompt": "a boat leaves", "frames": 8},
        ],
    }
    r = client.post("/v1/films", content=yaml.safe_dump(film, sort_keys=False),
                    headers={"Content-Type": "application/x-yaml"})
    assert r.status_code == 202, r.text
    yaml_job = r.json()["id"]
    one = {**film, "shots": film["shots"][:1]}
    r = client.post("/v1/films", json=one)
    assert r.status_code == 202, r.text
    json_job = r.json()["id"]
    assert follow(client, yaml_job)[-1] == ("status", {"job": yaml_job, "status": "done"})
    wait_for(client, json_job, {"done"})
    assert video_frames(client, yaml_job, tmp_path) == 17
    assert video_frames(client, json_job, tmp_path) == 9
    manifest = client.get(f"/v1/jobs/{yaml_job}/manifest").json()
    assert [(s["id"], s["continues"]) for s in manifest["shots"]] == [("open", None), ("more", "open")]


def test_image_shot(client, tmp_path):
    job_id = submit(client, frames=9, image=f"data:image/png;base64,{png()}")
    wait_for(client, job_id, {"done"})
    assert video_frames(client, job_id, tmp_path) == 9


def test_continue_from_a_finished_job(client, tmp_path):
    parent = submit(client, frames=9, prompt="a red kite")
    wait_for(client, parent, {"done"})
    child = submit(client, continue_from=parent, frames=8, prompt="the kite climbs")
    wait_for(client, child, {"done"})
    assert video_frames(client, child, tmp_path) == 8  # the job's video is the new shot's clip
    manifest = client.get(f"/v1/jobs/{child}/manifest").json()
    shots = {s["id"]: s for s in manifest["shots"]}
    assert shots[parent]["reused"] and not shots[child]["reused"]
    assert shots[child]["continues"] == parent
    assert client.get(f"/v1/jobs/{child}").json()["parent"] == parent

    grandchild = submit(client, continue_from=child, frames=4, prompt="the kite lands")
    wait_for(client, grandchild, {"done"})
    assert video_frames(client, grandchild, tmp_path) == 4
    manifest = client.get(f"/v1/jobs/{grandchild}/manifest").json()
    assert [(s["id"], s["reused"]) for s in manifest["shots"]] == [(parent, True), (child, True), (grandchild, False)]

    # The parent kept 2 tail latents (overlap_history 5); a continuation may not ask for more.
    r = client.post("/v1/shots", json={"prompt": "x", **SMALL, "continue_from": parent, "frames": 8,
                                       "overlap_history": 9})
    assert r.status_code == 422 and "saved 2" in r.json()["detail"]
    r = client.post("/v1/shots", json={"prompt": "x", **SMALL, "continue_from": parent, "frames": 8,
                                       "resolution": "64x64"})
    assert r.status_code == 422 and "resolution" in r.json()["detail"]


# ------------------------------------------------------------------------------------------------ rejections


@pytest.mark.parametrize(
    "body, needle",
    [
        ({}, "prompt"),
        ({"prompt": "x", "frames": 9, "colour": "red"}, "colour"),
        ({"prompt": "x", "frames": 10}, "4k+1"),
        ({"prompt": "x"}, "'frames'"),
        ({"prompt": "x", "frames": 9, "resolution": "33x32"}, "multiples of 16"),
        ({"prompt": "x", "frames": 9, "resolution": "128x128"}, "over this server's limit"),
        ({"prompt": "x", "frames": 201}, "at most 200"),
        ({"prompt": "x", "frames": 9, "steps": 11}, "at most 10"),
        ({"prompt": "x", "frames": 9, "model": "Skywork/SkyReels-V2-DF-14B-720P-Diffusers"}, "not served"),
        ({"prompt": "x", "frames": 9, "image": "not base64!"}, "base64"),
        ({"prompt": "x", "frames": 9, "image": base64.b64encode(b"hello").decode()}, "PNG, JPEG or WebP"),
        ({"prompt": "x", "frames": 9, "continue_from": "0" * 32}, "no job"),
        ({"prompt": "x", "frames": 9, "continue_from": "../../etc/passwd"}, "continue_from"),
    ],
)
def test_bad_shot_requests_are_422(client, body, needle):
    body = {**SMALL, **body} if body else body
    r = client.post("/v1/shots", json=body)
    assert r.status_code == 422, r.text
    assert needle in json.dumps(r.json()["detail"])


def test_bad_job_ids(client):
    for bad in ("not-a-job", "0" * 31, "..%2F..%2Fetc%2Fpasswd", "G" * 32):
        assert client.get(f"/v1/jobs/{bad}").status_code in (404, 422)
        assert client.delete(f"/v1/jobs/{bad}").status_code in (404, 422)
        assert client.get(f"/v1/jobs/{bad}/video").status_code in (404, 422)
    assert client.get("/v1/jobs/" + "0" * 32).status_code == 404


FILM_WITH_TYPO = """\
title: typo
resolution: 32x32
defaults: {steps: 2, base_num_frames: 17, overlap_history: 5}
shots:
  - id: a
    promt: a cat
    frames: 9
"""


@pytest.mark.parametrize(
    "text, needle",
    [
        (FILM_WITH_TYPO, "storyboard:6: shot 'a' field 'promt': unknown field 'promt' (did you mean 'prompt'?"),
        (FILM_WITH_TYPO.replace("promt", "prompt").replace("9", "10"), "storyboard:7: shot 'a' field 'frames'"),
        ("title: [unclosed\n", "not valid YAML"),
        (FILM_WITH_TYPO.replace("promt", "prompt") + "    image: /etc/passwd\n", "cannot reference files"),
        ("model: local/other\n" + FILM_WITH_TYPO.replace("promt", "prompt"), "not served"),
        (FILM_WITH_TYPO.replace("promt", "prompt").replace("9", "201"), "at most 200"),
        ("title: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
        ("a: &a [x, x]\n" + "".join(f"b{i}: &b{i} [*{'a' if i == 0 else f'b{i - 1}'}, *{'a' if i == 0 else f'b{i - 1}'}]\n"
                                     for i in range(40)), "YAML aliases"),
    ],
)
def test_bad_films_are_422_with_line_numbers(client, text, needle):
    r = client.post("/v1/films", content=text, headers={"Content-Type": "text/yaml"})
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]


def test_film_content_type(client):
    r = client.post("/v1/films", content="title: x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def test_oversize_is_413(client):
    r = client.post("/v1/shots", json={"prompt": "x" * (70 << 10), "frames": 9, **SMALL})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    big = base64.b64encode(os.urandom(20 << 10)).decode()  # 20 KiB image in a 27 KiB body: the image limit
    r = client.post("/v1/shots", json={"prompt": "x", "frames": 9, **SMALL, "image": big})
    assert r.status_code == 413 and "image" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit holds on the streamed body too
        for _ in range(80):
            yield b"x" * 1024

    r = client.post("/v1/films", content=chunks(), headers={"Content-Type": "text/yaml"})
    assert r.status_code == 413


# -------------------------------------------------------------------------------------- ownership and queue


def test_jobs_are_private_to_their_token(serve_env, client):
    job_id = submit(client, frames=9)
    wait_for(client, job_id, {"done"})
    with serve_env.client(TOKEN_B) as other:
        for path in ("", "/events", "/video", "/manifest"):
            assert other.get(f"/v1/jobs/{job_id}{path}").status_code == 404, path
        assert other.delete(f"/v1/jobs/{job_id}").status_code == 404
        assert job_id not in {j["id"] for j in other.get("/v1/jobs").json()["jobs"]}
        r = other.post("/v1/shots", json={"prompt": "x", **SMALL, "frames": 8, "continue_from": job_id})
        assert r.status_code == 422 and "no job" in r.json()["detail"]
    assert job_id in {j["id"] for j in client.get("/v1/jobs").json()["jobs"]}


def test_cancel_a_running_job(client, tmp_path):
    job_id = submit(client, **LONG)
    cancelled: list[httpx.Response] = []

    def on_event(kind, data):
        if kind == "window" and not cancelled:
            cancelled.append(client.delete(f"/v1/jobs/{job_id}"))

    events = follow(client, job_id, on_event)
    assert cancelled and cancelled[0].status_code == 202 and cancelled[0].json()["cancel_requested"]
    assert events[-1][1]["status"] == "cancelled"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert job["progress"]["windows_done"] < job["progress"]["windows_total"] == 8
    assert client.get(f"/v1/jobs/{job_id}/video").status_code == 409
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 409
    # The renderer is free again.
    after = submit(client, frames=9)
    wait_for(client, after, {"done"}, timeout=30)
    assert video_frames(client, after, tmp_path) == 9


def test_full_queue_is_429(client):
    running = submit(client, **LONG)
    wait_for(client, running, {"running"})
    queued = [submit(client, frames=9) for _ in range(3)]  # the queue holds 3
    r = client.post("/v1/shots", json={"prompt": "one too many", "frames": 9, **SMALL})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    # A queued job that no renderer has yet is cancelled at once, which frees a place.
    r = client.delete(f"/v1/jobs/{queued[0]}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{queued[1]}").json()["queue_position"] == 0
    queued.append(submit(client, frames=9))
    cancel_all(client)


def test_prometheus_metrics(serve_env, client):
    """Queue depth, jobs by state and window seconds reach Ray's Prometheus endpoint (run after the renders)."""
    if serve_env.metrics_url is None:
        pytest.skip("Ray was started elsewhere, without a known metrics port")
    wanted = ("ray_skyray_queue_depth", 'ray_skyray_jobs{', "ray_skyray_window_seconds_count",
              "ray_skyray_jobs_submitted_total")
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(serve_env.metrics_url, timeout=10).text
        values = {}
        for line in text.splitlines():
            if line.startswith("ray_skyray"):
                name = line.split("{")[0] + ("{" if 'state="done"' in line else "")
                values[name] = float(line.rsplit(" ", 1)[1])
        if all(w in values for w in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(w in values for w in wanted), sorted(values)
    assert values["ray_skyray_window_seconds_count"] >= 1
    assert values['ray_skyray_jobs{'] >= 1  # jobs in state done
