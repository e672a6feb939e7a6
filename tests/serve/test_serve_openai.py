"""The OpenAI Videos API, driven by the official ``openai`` client against the real Serve app (tiny model)."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image
from serve_helpers import TOKEN_A, TOKEN_B

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# skyray's own fields, flat through extra_body: 2 steps, 8 fps, a 17-frame window handing 5 frames on.
EXTRA = {"fps": 8, "steps": 2, "base_num_frames": 17, "overlap_history": 5, "seed": 7}


@pytest.fixture(scope="module")
def oai(serve_env):
    with openai.OpenAI(api_key=TOKEN_A, base_url=f"{serve_env.base_url}/v1", max_retries=0, timeout=60) as c:
        yield c


def make(oai, prompt: str = "a lighthouse at dawn", **kw) -> openai.types.Video:
    kw.setdefault("seconds", "1")
    video = oai.videos.create_and_poll(prompt=prompt, model="tiny", size="32x32", poll_interval_ms=100,
                                       extra_body={**EXTRA, **kw.pop("extra", {})}, **kw)
    assert video.status == "completed", video.error
    return video


def frames_of(data: bytes, tmp_path, name: str) -> np.ndarray:
    from skyray.output.encode import read_frames

    path = tmp_path / f"{name}.mp4"
    path.write_bytes(data)
    return read_frames(path)


def png(color=(220, 40, 40), size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_create_and_poll_and_download(oai, serve_env, tmp_path):
    video = make(oai)
    # 1 s at 8 fps snaps to 9 frames (4k+1), reported back as rendered.
    assert (video.object, video.model, video.size, video.seconds, video.progress) == ("video", "tiny", "32x32",
                                                                                     "1.125", 100)
    assert video.completed_at >= video.created_at and video.expires_at > video.completed_at
    assert video.prompt == "a lighthouse at dawn" and video.error is None

    clip = frames_of(oai.videos.download_content(video.id).read(), tmp_path, "film")
    assert clip.shape == (9, 32, 32, 3)
    thumb = Image.open(io.BytesIO(oai.videos.download_content(video.id, variant="thumbnail").read()))
    assert thumb.format == "JPEG" and thumb.size == (32, 32)
    sheet = Image.open(io.BytesIO(oai.videos.download_content(video.id, variant="spritesheet").read()))
    assert sheet.format == "PNG" and sheet.size[0] > 32

    # A video is a job: the same id under /v1/jobs, same token.
    with serve_env.client() as c:
        job = c.get(f"/v1/jobs/{video.id}").json()
    assert job["status"] == "done" and job["kind"] == "shot"


def test_input_reference_is_the_first_frame(oai, serve_env, tmp_path):
    plain = make(oai, "a red door")
    uploaded = make(oai, "a red door", input_reference=("door.png", png(), "image/png"))
    # As JSON (the client sends create as multipart, so post the JSON form through its generic post).
    body = {"prompt": "a red door", "model": "tiny", "size": "32x32", "seconds": "1", **EXTRA,
            "input_reference": {"image_url": "data:image/png;base64," + base64.b64encode(png()).decode()}}
    inline = oai.videos.poll(oai.post("/videos", body=body, cast_to=openai.types.Video).id, poll_interval_ms=100)
    assert inline.status == "completed", inline.error
    first = {v.id: frames_of(oai.videos.download_content(v.id).read(), tmp_path, v.id)[0].astype(float)
             for v in (plain, uploaded, inline)}
    # Same seed and prompt: the image alone changes the opening frame (a little, on the random tiny model), and
    # upload and data URI agree; the job holds the very image as its shot's first frame.
    assert np.abs(first[plain.id] - first[uploaded.id]).mean() > 0.1
    for v in (uploaded, inline):
        assert (serve_env.options.jobs_dir / v.id / "inputs" / "image.png").read_bytes() == png()
    assert np.abs(first[uploaded.id] - first[inline.id]).max() <= 1.0


def test_extend_and_remix(oai, serve_env, tmp_path):
    base = make(oai, "a paper boat")
    # client.videos.extend(video={"id": ...}) of openai 3.x refuses the reference before sending anything (it
    # expects a file at `video`), so the same request goes through the client's generic post, as JSON.
    body = {"prompt": "the boat drifts away", "seconds": "1", "video": {"id": base.id},
            **{k: v for k, v in EXTRA.items() if k != "seed"}}
    ext = oai.post("/videos/extensions", body=body, cast_to=openai.types.Video)
    ext = oai.videos.poll(ext.id, poll_interval_ms=100)
    assert ext.status == "completed", ext.error
    # The extension is the stitched film: 9 frames + 8 continued frames (a multiple of 4) at 8 fps.
    assert ext.seconds == "2.125" and ext.prompt == "the boat drifts away"
    film = frames_of(oai.videos.download_content(ext.id).read(), tmp_path, "ext")
    original = frames_of(oai.videos.download_content(base.id).read(), tmp_path, "base")
    assert film.shape[0] == 17
    assert np.abs(film[:9].astype(float) - original.astype(float)).mean() < 2.0  # the original, reused

    remix = oai.videos.poll(oai.videos.remix(base.id, prompt="a paper plane").id, poll_interval_ms=100)
    assert remix.status == "completed" and remix.remixed_from_video_id == base.id
    assert (remix.seconds, remix.size, remix.prompt) == (base.seconds, base.size, "a paper plane")

    with pytest.raises(openai.NotFoundError):
        oai.post("/videos/extensions", body={"prompt": "x", "seconds": "1", "video": {"id": "0" * 32}},
                 cast_to=openai.types.Video)
    # The multipart form of an extension (video[id], as the client encodes a nested object) works as well.
    with serve_env.client() as c:
        r = c.post("/v1/videos/extensions", data={"prompt": "on", "seconds": "1", "video[id]": ext.id, **EXTRA})
    assert r.status_code == 200, r.text
    assert oai.videos.poll(r.json()["id"], poll_interval_ms=100).seconds == "3.125"


def test_list_pages_and_delete(oai):
    older, newer = make(oai, "first"), make(oai, "second")
    page = oai.videos.list(limit=1)
    assert [v.id for v in page.data] == [newer.id] and page.has_more
    nxt = oai.videos.list(limit=1, after=newer.id)
    assert [v.id for v in nxt.data] == [older.id]
    walked = [v.id for v in oai.videos.list(limit=1)]  # the client follows last_id page by page
    assert walked[:2] == [newer.id, older.id] and len(walked) == len(set(walked))
    assert [v.id for v in oai.videos.list(order="asc", after=older.id, limit=5)][:1] == [newer.id]

    gone = oai.videos.delete(newer.id)
    assert (gone.id, gone.deleted, gone.object) == (newer.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        oai.videos.retrieve(newer.id)
    assert newer.id not in {v.id for v in oai.videos.list(limit=100)}


def test_errors_have_openai_shape(serve_env, oai):
    for key in ("not-a-key-we-know-at-all", TOKEN_B[:-1]):
        with openai.OpenAI(api_key=key, base_url=f"{serve_env.base_url}/v1", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as err:
                wrong.videos.list()
    assert err.value.response.json()["error"]["code"] == "invalid_api_key"

    cases = [({"size": "33x32"}, "size", "multiples of 16"), ({"size": "128x128"}, "size", "limit"),
             ({"model": "sora-2"}, "model", "not served"), ({"seconds": "-1"}, "seconds", "> 0"),
             ({"extra_body": {"colour": "red"}}, "colour", "unknown field")]
    for kw, param, needle in cases:
        kw = {"size": "32x32", "seconds": "1", "model": "tiny", **kw}
        with pytest.raises(openai.BadRequestError) as err:
            oai.videos.create(prompt="x", **kw)
        body = err.value.response.json()["error"]
        assert body["param"] == param and needle in body["message"], body
        assert body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        oai.videos.retrieve("f" * 32)
    with TOKEN_B_client(serve_env) as other:  # another token's videos do not exist for you
        with pytest.raises(openai.NotFoundError):
            other.videos.retrieve(oai.videos.list(limit=1).data[0].id)


def TOKEN_B_client(serve_env) -> openai.OpenAI:
    return openai.OpenAI(api_key=TOKEN_B, base_url=f"{serve_env.base_url}/v1", max_retries=0)


def test_a_whole_storyboard_through_extra_body(oai):
    storyboard = (
        "title: two shots\nresolution: 32x32\nfps: 8\nseed: 2\n"
        "defaults: {steps: 2, base_num_frames: 17, overlap_history: 5}\n"
        "shots:\n  - {id: a, prompt: a harbor, frames: 9}\n  - {id: b, continue: true, prompt: a boat, frames: 8}\n")
    video = oai.videos.create_and_poll(prompt="a harbor", model="tiny", extra_body={"storyboard": storyboard},
                                       poll_interval_ms=100)
    assert (video.status, video.seconds, video.size, video.prompt) == ("completed", "2.125", "32x32", "a boat")
    with pytest.raises(openai.BadRequestError) as err:  # its line-numbered storyboard errors, in OpenAI's shape
        oai.videos.create(prompt="x", extra_body={"storyboard": storyboard.replace("frames: 9", "frames: 10")})
    assert err.value.response.json()["error"]["message"].startswith("storyboard:7: shot 'a' field 'frames'")
