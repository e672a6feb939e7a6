"""Job files in object storage (issue 13): a second Serve app whose ``outputs`` is an S3 URI on a real S3 server
(moto on 127.0.0.1).  Uploaded inputs, rendered shots, the film and a continuation's copies all live in the
bucket; downloads stream from there with Range requests; retention deletes the job's objects; the secret in the
URI never reaches a response or a log."""

from __future__ import annotations

import base64
import dataclasses
import io
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import SMALL, TOKEN_A, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "skyray-s3"
SECRET = "s3cret-of-the-serve-test-7f3a"
TTL_S = 20.0


def png(size: int = 32, color=(40, 160, 220)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def moto_uri(s3_server) -> str:
    """An S3 URI on the session's moto server (this venv's moto: an older one on PATH answered every
    CompleteMultipartUpload with an empty 200 body)."""
    _, make_uri = s3_server
    return make_uri("serve-jobs", "cluster/jobs", SECRET)


@pytest.fixture(scope="module")
def s3_app(serve_env, moto_uri, tmp_path_factory):
    from ray import serve

    from skyray.serve import build_app

    uri = moto_uri
    options = dataclasses.replace(serve_env.options, data_dir=str(tmp_path_factory.mktemp("s3-data")), outputs=uri,
                                  job_ttl_s=TTL_S, cpus_per_replica=0.25)
    serve.run(build_app(options), name=APP, route_prefix="/s3")
    try:
        with httpx.Client(base_url=f"{serve_env.base_url}/s3", timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN_A}"}) as client:
            yield client, options, uri
    finally:
        serve.delete(APP)


def objects(uri: str, job_id: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{job_id}", recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) + len(job_id) + 2:] for i in infos if i.type == pafs.FileType.File)


def read_object(uri: str, rel: str) -> bytes:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(f"{root}/{rel}") as f:
        return f.read()


def test_job_files_live_in_s3(s3_app, tmp_path):
    from skyray.output.encode import probe

    client, options, uri = s3_app
    image = png()
    r = client.post("/v1/shots", json={"prompt": "a blue kite", **SMALL, "frames": 9,
                                       "image": base64.b64encode(image).decode()})
    assert r.status_code == 202, r.text
    parent = r.json()["id"]
    assert not (options.jobs_dir / parent).exists()  # the ingress's staging folder went to the bucket
    assert read_object(uri, f"{parent}/inputs/image.png") == image
    wait_for(client, parent, {"done"})

    names = objects(uri, parent)
    assert {"film.mp4", "manifest.json", f"shots/{parent}.mp4", f"shots/{parent}.tail.safetensors"} <= set(names)
    video = read_object(uri, f"{parent}/shots/{parent}.mp4")
    whole = client.get(f"/v1/jobs/{parent}/video")
    assert whole.status_code == 200 and whole.content == video
    assert whole.headers["content-type"] == "video/mp4" and whole.headers["accept-ranges"] == "bytes"
    part = client.get(f"/v1/jobs/{parent}/video", headers={"Range": "bytes=100-399"})
    assert part.status_code == 206, part.text
    assert part.content == video[100:400]
    assert part.headers["content-range"] == f"bytes 100-399/{len(video)}"
    tail = client.get(f"/v1/jobs/{parent}/video", headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == video[-50:]
    assert client.get(f"/v1/jobs/{parent}/video", headers={"Range": f"bytes={len(video)}-"}).status_code == 416
    (tmp_path / "parent.mp4").write_bytes(whole.content)
    assert probe(tmp_path / "parent.mp4").frames == 9
    manifest = client.get(f"/v1/jobs/{parent}/manifest")
    assert manifest.status_code == 200

    # A continuation: the parent's image and shots are copied within the bucket; the parent shot is reused.
    r = client.post("/v1/shots", json={"prompt": "the kite climbs", **SMALL, "frames": 8, "continue_from": parent})
    assert r.status_code == 202, r.text
    child = r.json()["id"]
    assert read_object(uri, f"{child}/inputs/image.png") == image
    wait_for(client, child, {"done"})
    shots = {s["id"]: s for s in client.get(f"/v1/jobs/{child}/manifest").json()["shots"]}
    assert shots[parent]["reused"] and not shots[child]["reused"] and shots[child]["continues"] == parent
    clip = client.get(f"/v1/jobs/{child}/video")
    assert clip.content == read_object(uri, f"{child}/shots/{child}.mp4")
    (tmp_path / "child.mp4").write_bytes(clip.content)
    assert probe(tmp_path / "child.mp4").frames == 8

    # The Videos API and the studio read the same files.
    v = client.get(f"/v1/videos/{parent}/content", headers={"Range": "bytes=0-99"})
    assert v.status_code == 206 and v.content == read_object(uri, f"{parent}/film.mp4")[:100]
    thumb = client.get(f"/v1/videos/{parent}/content", params={"variant": "thumbnail"})
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    assert client.get(f"/v1/videos/{parent}").json()["seconds"] == "1.125"

    texts = [r.text for r in (whole, manifest, client.get(f"/v1/jobs/{child}"), client.get("/v1/jobs"),
                              client.get(f"/v1/jobs/{child}/manifest"), client.get(f"/v1/videos/{child}"))]
    assert not any(SECRET in t for t in texts)

    # Retention deletes both jobs' objects once they expire (the sweep runs every TTL/4).
    deadline = time.monotonic() + 3 * TTL_S
    while (objects(uri, parent) or objects(uri, child)) and time.monotonic() < deadline:
        time.sleep(1)
    assert objects(uri, parent) == [] and objects(uri, child) == []
    assert client.get(f"/v1/jobs/{parent}").status_code in (404, 410)

    logs = ray_logs()
    assert logs, "no Ray logs found to check"
    leaked = [p for p in logs if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


def ray_logs() -> list[Path]:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [p for p in (session / "logs").rglob("*") if p.is_file()]

