"""The OpenAI Videos API (``/v1/videos``) over skyray's own jobs, so that clients written for OpenAI-compatible
video servers (the official ``openai`` client, SGLang's and vLLM-Omni's users) render with skyray unchanged.

A video *is* a job: the same id, the same token, the same admission (``admit_shot`` / ``admit_film``) and queue,
visible under ``/v1/jobs`` too.  What is OpenAI's maps onto what is skyray's:

- ``seconds`` becomes the shot's ``duration`` (snapped to the frame grid: 4k+1 frames fresh, 4k continued) and
  ``size`` (``WxH``) its resolution; the rendered length is reported back from the manifest once it exists.
- ``input_reference`` (an upload or ``{"image_url": "data:..."}``) is the shot's first frame.
- ``POST /v1/videos/extensions`` is ``continue_from`` a finished video: the new job holds the stitched film;
  ``remix`` renders a finished one-shot video's settings again with a new prompt.
- skyray's own fields arrive flat (the client's ``extra_body``; multipart cannot carry nested objects): any
  field of ``POST /v1/shots`` (``seed``, ``steps``, ``fps``, ``negative_prompt``...), or ``storyboard``, a whole
  storyboard as one YAML or JSON string.

Errors on these routes have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, including the
401/413 answered by the ``Gate`` before a route runs.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
import base64
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError

from skyray.serve.admission import Admitted, Rejected, admit_film, admit_shot
from skyray.serve.files import JobFiles
from skyray.serve.schema import JOB_ID_PATTERN, JobAccepted, ShotRequest
from skyray.serve.store import CANCELLED, DONE, FAILED, QUEUED, RUNNING, Job

if TYPE_CHECKING:
    from skyray.serve.ingress import IngressService

PREFIX = "/v1/videos"
SIDECAR = "video.json"  # what the Videos API remembers of a job beyond the store (the remix source)
LIST_WINDOW = 1000  # list pages through a token's newest jobs, this many at most
DEFAULT_SECONDS = 4.0
STATUS = {QUEUED: "queued", RUNNING: "in_progress", DONE: "completed", FAILED: "failed", CANCELLED: "failed"}
# OpenAI's names for the fields a skyray message names first.
PARAMS = {"resolution": "size", "duration": "seconds", "frames": "seconds", "image": "input_reference",
          "continue_from": "video"}
KINDS = {400: ("invalid_request_error", "invalid_value"), 401: ("invalid_request_error", "invalid_api_key"),
         404: ("invalid_request_error", "not_found"), 409: ("invalid_request_error", "conflict"),
         410: ("invalid_request_error", "expired"), 413: ("invalid_request_error", "request_too_large"),
         429: ("requests", "rate_limit_exceeded")}
# Fields the Videos API names itself; every other field of ShotRequest may come flat through extra_body.
OWN = {"prompt", "model", "seconds", "size", "input_reference", "video", "storyboard"}
PASSED = set(ShotRequest.model_fields) - {"image", "continue_from", "resolution", "duration"}

Accept = Callable[[str, Callable[[str, Path], Admitted]], Awaitable[JobAccepted]]


class VideoError(Rejected):
    """A refusal naming OpenAI's ``param``."""

    def __init__(self, status: int, detail: str, param: str | None = None) -> None:
        super().__init__(status, detail)
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind, code = KINDS.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _param_of(message: str) -> str | None:
    """The field a skyray message starts with (``'image: not valid base64'``, ``"model 'x' is not served"``)."""
    m = re.search(r"field '(\w+)'", message) or re.match(r"(\w+)[: ]", message)
    name = m[1] if m else None
    return PARAMS.get(name, name) if name in ShotRequest.model_fields or name in OWN else None


def _problem(exc: Exception) -> JSONResponse:
    if isinstance(exc, Rejected):
        status = 400 if exc.status in (415, 422) else exc.status
        param = exc.param if isinstance(exc, VideoError) else _param_of(exc.detail)
        return JSONResponse(error_body(status, exc.detail, param), status, headers=exc.headers)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    name = loc[0] if loc else None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5])
    return JSONResponse(error_body(400, message, PARAMS.get(name, name)), 400)


class VideoRoute(APIRoute):
    """Routes whose refusals (ours and FastAPI's validation) come out in OpenAI's error shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except (Rejected, RequestValidationError) as exc:
                return _problem(exc)

        return route


class OpenAIErrors:
    """ASGI middleware outside the ``Gate``: its ``{"detail": ...}`` refusals (401, 413...) on ``/v1/videos``
    are rewritten in OpenAI's shape; everything else passes untouched."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}

        async def rewrite(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held["start"], held["body"] = message, b""
                return None
            if "start" in held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return None
                start, body = held.pop("start"), held.pop("body")
                try:
                    data = json.loads(body)
                except ValueError:
                    data = None
                if isinstance(data, dict) and "detail" in data and "error" not in data:
                    detail = data["detail"]
                    body = json.dumps(error_body(start["status"], detail if isinstance(detail, str)
                                                 else json.dumps(detail))).encode()
                    headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                    start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
                await send(start)
                return await send({"type": "http.response.body", "body": body})
            return await send(message)

        await self.app(scope, receive, rewrite)


# ------------------------------------------------------------------------------------------------ requests


async def read_fields(request: Request) -> dict[str, Any]:
    """The request's fields, from multipart or urlencoded forms (what the official client sends) or JSON;
    ``a[b]`` form keys (the client's encoding of nested objects) become ``{"a": {"b": ...}}``; uploads stay
    ``UploadFile``s."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form()
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            m = re.fullmatch(r"(\w+)\[(\w+)\]", key)
            if m:
                fields.setdefault(m[1], {})[m[2]] = value
            else:
                fields[key] = value
        return fields
    body = await request.body()
    if not body:
        return {}
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise VideoError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise VideoError(400, "the body must be a JSON object")
    return data


async def _image_of(value: Any) -> str:
    """``input_reference`` as base64 (or a data: URI) for admission, which checks the image itself."""
    if isinstance(value, dict):
        url = value.get("image_url")
        if isinstance(url, dict):  # {"image_url": {"url": ...}}, as in chat messages
            url = url.get("url")
        if not isinstance(url, str):
            raise VideoError(400, "input_reference: give an uploaded image or {\"image_url\": \"data:image/...;"
                                  "base64,...\"}", "input_reference")
        if not url.startswith("data:"):
            raise VideoError(400, "input_reference: this server does not fetch URLs; send the image inline as a "
                                  "data: URI or upload it", "input_reference")
        return url
    if hasattr(value, "read"):
        return base64.b64encode(await value.read()).decode()
    if isinstance(value, str) and value:
        return value
    raise VideoError(400, "input_reference: expected an image", "input_reference")


def _seconds(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise VideoError(400, f"seconds: expected a number of seconds, got {value!r}", "seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise VideoError(400, f"seconds: must be > 0, got {value!r}", "seconds")
    return seconds


def _size(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"\d{1,5}x\d{1,5}", value.strip()):
        raise VideoError(400, f"size: expected 'WIDTHxHEIGHT' such as '960x544', got {value!r}", "size")
    return value.strip()


def shot_request(fields: dict[str, Any], image: str | None = None, continue_from: str | None = None) -> ShotRequest:
    """A ``POST /v1/shots`` request from the Videos API's fields (the flat extras included)."""
    unknown = sorted(set(fields) - OWN - PASSED)
    if unknown:
        raise VideoError(400, f"unknown field {unknown[0]!r} (skyray accepts {', '.join(sorted(PASSED))})",
                         unknown[0])
    body: dict[str, Any] = {k: v for k, v in fields.items() if k in PASSED}
    if isinstance(body.get("teacache"), str):  # a nested object, sent flat as JSON text
        try:
            body["teacache"] = json.loads(body["teacache"])
        except ValueError:
            raise VideoError(400, "teacache: expected a JSON object such as {\"threshold\": 0.1}", "teacache") from None
    body["prompt"] = fields.get("prompt")
    if fields.get("model") is not None:
        body["model"] = fields["model"]
    if "frames" not in body:
        body["duration"] = _seconds(fields.get("seconds", DEFAULT_SECONDS))
    if fields.get("size") is not None:
        body["resolution"] = _size(fields["size"])
    if image is not None:
        body["image"] = image
    if continue_from is not None:
        body["continue_from"] = continue_from
    try:
        return ShotRequest(**body)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else None
        raise VideoError(400, f"{name}: {err['msg']}", PARAMS.get(name, name)) from None


def _remix_request(source: Job, prompt: str, jobs_dir: Path, files: JobFiles) -> ShotRequest:
    """The request that rendered a one-shot video, with a new prompt (its image read back from its inputs)."""
    film = source.storyboard
    shots = film.get("shots", [])
    if source.parent is not None or len(shots) != 1:
        raise VideoError(400, f"video {source.id} is a {len(shots)}-shot film; remix re-renders one-shot videos "
                              "(send the changed storyboard as a new video instead)", "video_id")
    shot = dict(shots[0])
    body: dict[str, Any] = {k: v for k, v in shot.items() if k in ShotRequest.model_fields and k not in
                            ("image", "end_image")}
    for name in ("image", "end_image"):
        if shot.get(name):
            # Inputs are named relative to the job's inputs (older jobs: absolute paths into its folder).
            path = Path(shot[name])
            if path.is_absolute():
                rel = path.relative_to(jobs_dir / source.id).as_posix() if path.is_relative_to(
                    jobs_dir / source.id) else None
            else:
                rel = f"inputs/{path.name}"
            data = files.read_bytes(source.id, rel) if rel else None
            if data is None:
                raise VideoError(409, f"video {source.id}: its {name} is no longer on the server", "video_id")
            body[name] = base64.b64encode(data).decode()
    for name in ("model", "resolution", "fps", "title"):
        if film.get(name) is not None:
            body[name] = film[name]
    body["prompt"] = prompt
    try:
        return ShotRequest(**body)
    except ValidationError as exc:
        raise VideoError(400, f"prompt: {exc.errors()[0]['msg']}", "prompt") from None


# --------------------------------------------------------------------------------------------------- views


def _film_seconds(job: Job, files: JobFiles) -> str:
    """The film's length: from its manifest once rendered, else from the storyboard on the frame grid."""
    from skyray.storyboard import snap_duration

    film = job.storyboard
    fps = int(film.get("fps", 24))
    if job.status == DONE:
        try:
            manifest = json.loads(files.read_bytes(job.id, "manifest.json") or b"")
            return _fmt(manifest["film"]["frames"] / fps)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    frames = 0
    for shot in film.get("shots", []):
        fresh = not (shot.get("continue") or shot.get("continue_from"))
        if isinstance(shot.get("frames"), int):
            frames += shot["frames"]
        elif isinstance(shot.get("duration"), (int, float)):
            frames += snap_duration(float(shot["duration"]), fps, fresh)
    return _fmt(frames / fps)


def _fmt(seconds: float) -> str:
    return f"{round(seconds, 3):g}"


def _size_of(film: dict) -> str:
    from skyray.storyboard import parse_resolution

    try:
        height, width = parse_resolution(str(film.get("resolution", "540p")))
    except ValueError:
        return str(film.get("resolution"))
    return f"{width}x{height}"


def _prompt_of(film: dict) -> str | None:
    shots = film.get("shots") or [{}]
    prompt = shots[-1].get("prompt")
    return " / ".join(map(str, prompt)) if isinstance(prompt, list) else prompt


def _sidecar(job: Job, files: JobFiles) -> dict:
    try:
        return json.loads(files.read_bytes(job.id, SIDECAR) or b"{}")
    except (OSError, ValueError):
        return {}


def video_object(job: Job, files: JobFiles) -> dict:
    status = STATUS[job.status]
    if job.status == DONE:
        progress = 100
    elif job.windows_total:
        progress = min(99, int(100 * job.windows_done / job.windows_total))
    else:
        progress = 0
    error = None
    if job.status == FAILED:
        error = {"code": "render_failed", "message": job.error or "the render failed"}
    elif job.status == CANCELLED:
        error = {"code": "cancelled", "message": "the render was cancelled"}
    return {
        "id": job.id, "object": "video", "model": job.model, "status": status, "progress": progress,
        "created_at": int(job.created), "completed_at": int(job.finished) if job.finished and job.terminal else None,
        "expires_at": int(job.expires_at) if job.expires_at else None, "prompt": _prompt_of(job.storyboard),
        "seconds": _film_seconds(job, files), "size": _size_of(job.storyboard), "error": error,
        "remixed_from_video_id": _sidecar(job, files).get("remixed_from"),
    }


def _poll_after_ms(job: Job) -> int:
    """When a poller should look again: a quarter of the ETA, between 0.2 and 5 s."""
    if job.eta:
        return int(min(5000, max(200, job.eta * 250)))
    return 500


# --------------------------------------------------------------------------------------------------- routes


def add_videos_api(app: FastAPI, service: "IngressService", accept: Accept) -> None:
    """Mount ``/v1/videos`` on ``app``; ``accept`` admits and queues a job as every other submitting route."""
    options, store = service.options, service.store
    jobs_dir, files = options.jobs_dir, service.files
    router = APIRouter(prefix=PREFIX, tags=["videos (OpenAI)"], route_class=VideoRoute)
    app.add_middleware(OpenAIErrors)

    def video_of(request: Request, video_id: str) -> Job:
        if not re.fullmatch(JOB_ID_PATTERN, video_id):
            raise VideoError(404, f"no video {video_id!r}", "video_id")
        job = store.get(video_id, request.state.owner)
        if job is None:
            raise VideoError(404, f"no video {video_id}", "video_id")
        return job

    async def submit(request: Request, build: Callable[[str, Path], Admitted], sidecar: dict | None = None,
                     ) -> JSONResponse:
        who = request.state.owner

        def build_and_note(job_id: str, job_dir: Path) -> Admitted:
            admitted = build(job_id, job_dir)
            if sidecar:
                job_dir.mkdir(parents=True, exist_ok=True)
                (job_dir / SIDECAR).write_text(json.dumps(sidecar))
            return admitted

        accepted = await accept(who, build_and_note)
        job = store.get(accepted.id, who)
        assert job is not None
        return JSONResponse(video_object(job, files), 200, headers={"Location": f"{PREFIX}/{job.id}"})

    @router.post("", summary="Create a video")
    async def create_video(request: Request) -> JSONResponse:
        """A prompt (and ``input_reference``, the first frame) rendered as one shot, or ``storyboard``: a whole
        film.  Multipart form (the official client) or JSON."""
        fields = await read_fields(request)
        if not isinstance(fields.get("prompt"), str) or not fields["prompt"].strip():
            raise VideoError(400, "prompt: a text prompt is required", "prompt")
        text = fields.get("storyboard")
        if text is not None:
            return await submit(request, _film_builder(fields, text))
        image = await _image_of(fields["input_reference"]) if fields.get("input_reference") else None
        req = shot_request(fields, image=image)
        return await submit(request, lambda job_id, job_dir: admit_shot(req, job_id, job_dir, options, None))

    def _film_builder(fields: dict, text: Any) -> Callable[[str, Path], Admitted]:
        if not isinstance(text, str):
            raise VideoError(400, "storyboard: expected one YAML or JSON string", "storyboard")
        extra = sorted(set(fields) - {"prompt", "model", "storyboard"})
        if extra:
            raise VideoError(400, f"{extra[0]}: with a storyboard, settings belong in the storyboard", extra[0])

        def build(job_id: str, job_dir: Path) -> Admitted:
            admitted = admit_film(text.encode(), "application/x-yaml", job_id, job_dir, options)
            if fields.get("model") is not None and fields["model"] != admitted.model:
                raise VideoError(400, f"model: the storyboard renders with {admitted.model!r}, the request names "
                                      f"{fields['model']!r}", "model")
            return admitted

        return build

    @router.post("/extensions", summary="Extend a completed video")
    async def extend_video(request: Request) -> JSONResponse:
        """Continue a completed video from its last latents; the new video is the stitched film."""
        fields = await read_fields(request)
        ref = fields.pop("video", None)
        if hasattr(ref, "read"):
            raise VideoError(400, "video: extending an uploaded file is not supported here; extend a video of "
                                  "this server with {\"id\": ...}, or send a storyboard whose shot has `video`",
                             "video")
        parent_id = ref.get("id") if isinstance(ref, dict) else ref
        if not isinstance(parent_id, str):
            raise VideoError(400, "video: give the video to extend as {\"id\": \"...\"}", "video")
        parent = video_of(request, parent_id)
        if not isinstance(fields.get("prompt"), str):
            raise VideoError(400, "prompt: a text prompt is required", "prompt")
        req = shot_request(fields, continue_from=parent.id)
        return await submit(request, lambda job_id, job_dir: admit_shot(req, job_id, job_dir, options, parent))

    @router.post("/{video_id}/remix", summary="Remix a completed video")
    async def remix_video(request: Request, video_id: str) -> JSONResponse:
        """The same settings (seed, size, length, first frame) rendered again with a new prompt."""
        source = video_of(request, video_id)
        fields = await read_fields(request)
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise VideoError(400, "prompt: a text prompt is required", "prompt")
        if source.status != DONE:
            raise VideoError(409, f"video {source.id} is {STATUS[source.status]}; only a completed video can be "
                                  "remixed", "video_id")
        req = await run_in_threadpool(_remix_request, source, prompt, jobs_dir, files)
        return await submit(request, lambda job_id, job_dir: admit_shot(req, job_id, job_dir, options, None, files),
                            {"remixed_from": source.id})

    @router.get("", summary="List videos")
    def list_videos(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                    order: str = Query("desc", pattern="^(asc|desc)$")) -> JSONResponse:
        jobs = store.list(request.state.owner, limit=LIST_WINDOW)  # newest first
        if order == "asc":
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise VideoError(400, f"after: no video {after!r} in this list", "after")
            jobs = jobs[ids.index(after) + 1:]
        page = jobs[:limit]
        data = [video_object(j, files) for j in page]
        return JSONResponse({"object": "list", "data": data, "first_id": page[0].id if page else None,
                             "last_id": page[-1].id if page else None, "has_more": len(jobs) > limit})

    @router.get("/{video_id}", summary="Retrieve a video")
    def retrieve_video(request: Request, video_id: str) -> JSONResponse:
        job = video_of(request, video_id)
        headers = {} if job.terminal else {"openai-poll-after-ms": str(_poll_after_ms(job))}
        return JSONResponse(video_object(job, files), headers=headers)

    @router.delete("/{video_id}", summary="Delete a video")
    async def delete_video(request: Request, video_id: str) -> JSONResponse:
        """Delete a completed or failed video and its files (a queued one is cancelled first)."""
        job = video_of(request, video_id)
        if not job.terminal:
            job = store.request_cancel(job.id) or job
            service.dispatcher.wake()
            if not job.terminal:
                raise VideoError(409, f"video {job.id} is rendering; it is cancelled at its next window and can be "
                                      "deleted then", "video_id")
        await run_in_threadpool(files.delete, job.id)
        store.purge([job])
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})

    @router.get("/{video_id}/content", summary="Download a video's content")
    async def video_content(request: Request, video_id: str,
                            variant: str = Query("video", pattern="^(video|thumbnail|spritesheet)$")) -> Response:
        """``video``: the film (mp4, Range requests); ``thumbnail``: its first frame (JPEG); ``spritesheet``: the
        contact sheet (PNG)."""
        job = video_of(request, video_id)
        if job.status != DONE:
            raise VideoError(409, f"video {job.id} is {STATUS[job.status]}; its content exists once it is completed",
                             "video_id")
        if variant == "thumbnail":
            await run_in_threadpool(remote_thumbnail if files.remote else local_thumbnail, files, job.id)
        rel, kind = {"video": ("film.mp4", "video/mp4"), "spritesheet": ("contact_sheet.png", "image/png"),
                     "thumbnail": ("thumbnail.jpg", "image/jpeg")}[variant]
        response = await run_in_threadpool(files.response, job.id, rel, kind, request.headers.get("range"),
                                           f"{job.id}.mp4" if variant == "video" else None)
        if response is None:
            raise VideoError(404, f"{rel} is missing on the server", "video_id")
        return response

    app.include_router(router)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise VideoError(404, f"{path.name} is missing on the server", "video_id")
    return path


def local_thumbnail(files: JobFiles, job_id: str) -> None:
    local = files.location.local_path(job_id)
    assert local is not None
    thumbnail(local)


def remote_thumbnail(files: JobFiles, job_id: str) -> None:
    """``thumbnail`` for a job whose files are in an object store: made from a local copy of the film, kept there."""
    if files.size(job_id, "thumbnail.jpg") is not None:
        return
    try:
        with files.local_file(job_id, "film.mp4") as film:
            files.write_bytes(job_id, "thumbnail.jpg", thumbnail(film.parent).read_bytes())
    except FileNotFoundError:
        raise VideoError(404, "film.mp4 is missing on the server", "video_id") from None


def thumbnail(job_dir: Path) -> Path:
    """The film's first frame as a JPEG, made once and kept next to it."""
    path = job_dir / "thumbnail.jpg"
    if not path.is_file():
        from PIL import Image

        from skyray.output.encode import read_frames

        frame = read_frames(_existing(job_dir / "film.mp4"), [0])[0]
        tmp = path.with_suffix(f".{time.monotonic_ns()}.tmp")
        Image.fromarray(frame).save(tmp, format="JPEG", quality=90)
        tmp.replace(path)
    return path
