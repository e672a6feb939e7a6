"""The HTTP API (FastAPI): submit shots and films, follow jobs, fetch results, cancel.

Every ``/v1`` route needs a bearer token (checked before the body is read) and sees only the jobs of that token;
another token's job answers 404 exactly like a job that does not exist.  Bodies are capped before parsing.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations, and the dependency aliases
# below are local to create_api, where string annotations could not be resolved.
import asyncio
import json
import math
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from skyray.serve.admission import JSON_TYPES, YAML_TYPES, Admitted, Rejected, admit_film, admit_shot
from skyray.serve.auth import TokenAuth
from skyray.serve.quotas import check_quota
from skyray.serve.schema import (
    JOB_ID_PATTERN,
    Health,
    JobAccepted,
    JobList,
    JobView,
    Problem,
    Progress,
    ShotRequest,
)
from skyray.serve.store import CANCELLED, DONE, QUEUED, RUNNING, Job

if TYPE_CHECKING:
    from skyray.serve.ingress import Ingress

SSE_POLL_S = 0.25
SSE_KEEPALIVE_S = 15.0
_bearer = HTTPBearer(auto_error=False, description="An API token from SKYRAY_API_TOKEN")
JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, description="A job id (32 hex digits)")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or unknown bearer token"},
    404: {"model": Problem, "description": "No such job (or not yours)"},
}


class Gate:
    """ASGI middleware for ``/v1``: bearer auth first, then the body size limit (413) and UTF-8 for text bodies
    (422), before any parsing."""

    def __init__(self, app, auth: TokenAuth, max_body_bytes: int) -> None:
        self.app, self.auth, self.max_body = app, auth, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        auth = headers.get(b"authorization")
        owner = self.auth.owner(auth.decode("latin-1") if auth is not None else None)
        if owner is None:
            return await _send_json(send, 401, {"detail": "missing or unknown bearer token"},
                                    {"www-authenticate": 'Bearer realm="skyray"'})
        scope.setdefault("state", {})["owner"] = owner
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _send_json(send, 400, {"detail": "invalid Content-Length"})
            if declared > self.max_body:
                return await _send_json(send, 413, {"detail": f"request body is {declared} bytes, over the limit "
                                                              f"of {self.max_body}"})
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _send_json(send, 413, {"detail": f"request body is over the limit of {self.max_body} "
                                                              "bytes"})
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _is_text(headers.get(b"content-type")) and not _utf8(body):
            return await _send_json(send, 422, {"detail": "the request body is not UTF-8 text"})
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _is_text(content_type: bytes | None) -> bool:
    """JSON (also what FastAPI assumes without a content type), YAML and text: bodies that must be UTF-8."""
    media = (content_type or b"").split(b";")[0].strip().lower().decode("latin-1")
    return media in ("", *JSON_TYPES, *YAML_TYPES) or media.endswith("+json") or media.startswith("text/")


def _utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _send_json(send, status: int, data: dict, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(data).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def create_api(service: "Ingress") -> FastAPI:
    """The FastAPI app of one ingress replica (``service`` holds the options, store and dispatcher)."""
    options, store, files = service.options, service.store, service.files
    app = FastAPI(
        title="skyray",
        version="1",
        description="Render shots and multi-shot films with SkyReels-V2 diffusion forcing. Jobs are queued, "
        "rendered one per renderer replica, and survive restarts.",
    )
    app.add_middleware(Gate, auth=service.auth, max_body_bytes=options.max_body_bytes)

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, exc: Rejected) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)

    def owner(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> str:
        return request.state.owner  # set by Gate, which already refused unknown tokens

    Owner = Annotated[str, Depends(owner)]

    def job_of(job_id: JobId, who: Owner) -> Job:
        job = store.get(job_id, who)
        if job is None:
            gone(job_id, who, "")
            raise Rejected(404, f"no job {job_id}")
        return job

    def gone(job_id: str, who: str, field: str) -> None:
        """410 for an expired job of ``who`` (its files and record were deleted after ``job_ttl_s``)."""
        expired = store.expired_at(job_id, who)
        if expired is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expired))
            raise Rejected(410, f"{field}job {job_id} expired at {when} (finished jobs are kept "
                                f"{options.job_ttl_s:g} s): its files and record are deleted")

    ThisJob = Annotated[Job, Depends(job_of)]

    def view(job: Job) -> JobView:
        total = job.windows_total
        base = f"/v1/jobs/{job.id}"
        return JobView(
            id=job.id, kind=job.kind, model=job.model, status=job.status, created=job.created,
            started=job.started, finished=job.finished,
            progress=Progress(windows_done=job.windows_done, windows_total=total, shot=job.shot,
                              fraction=round(job.windows_done / total, 4) if total else 0.0),
            eta_seconds=job.eta if job.status == RUNNING else None,
            queue_position=store.queue_position(job) if job.status == QUEUED else None,
            cancel_requested=job.cancel_requested, restarts=job.restarts, error=job.error, parent=job.parent,
            video_url=f"{base}/video" if job.status == DONE else None,
            manifest_url=f"{base}/manifest" if job.status == DONE else None, expires_at=job.expires_at,
        )

    def check_queue() -> None:
        if store.counts()[QUEUED] >= options.max_queue:
            avg = store.recent_job_seconds()
            retry = int(min(3600, max(1, math.ceil(avg if avg is not None else 30))))
            raise Rejected(429, f"the queue is full ({options.max_queue} jobs waiting); retry later",
                           {"Retry-After": str(retry)})

    def enqueue(who: str, admitted: Admitted) -> JobAccepted:
        def guard() -> None:  # again, atomically with the insert: the queue may have filled in the meantime
            check_queue()
            check_quota(store, who, options, admitted.frames)

        store.add(admitted.job_id, who, admitted.kind, admitted.model, admitted.storyboard, admitted.video,
                  admitted.parent, frames=admitted.frames, guard=guard)
        service.on_submitted(admitted.kind)
        return JobAccepted(id=admitted.job_id, status=QUEUED)

    async def accept(who: str, build) -> JobAccepted:
        """Admit and queue a job: ``build(job_id, job_dir) -> Admitted`` (every route that submits uses this)."""
        check_queue()
        check_quota(store, who, options)
        job_id = uuid.uuid4().hex
        job_dir = options.jobs_dir / job_id  # local staging; ``publish`` moves it to the job's folder in ``outputs``
        try:
            admitted = await run_in_threadpool(build, job_id, job_dir)
            await run_in_threadpool(files.publish, job_id, job_dir)
            return enqueue(who, admitted)
        except BaseException:
            await run_in_threadpool(_remove_tree, job_dir)
            await run_in_threadpool(files.delete, job_id)  # whatever was published before the failure
            raise

    async def admit(who: str, build) -> JSONResponse:
        accepted = await accept(who, build)
        return JSONResponse(accepted.model_dump(), 202, headers={"Location": f"/v1/jobs/{accepted.id}"})

    responses = {**_ERRORS, 400: {"model": Problem, "description": "Unreadable body"}, 413: {"model": Problem},
                 415: {"model": Problem}, 422: {"model": Problem},
                 429: {"model": Problem, "description": "Queue full; see Retry-After"}}

    @app.post("/v1/shots", status_code=202, response_model=JobAccepted, responses=responses, tags=["jobs"])
    async def submit_shot(req: ShotRequest, who: Owner) -> JSONResponse:
        """Render one shot (optionally continuing a finished job of yours)."""
        parent = None
        if req.continue_from is not None:
            parent = store.get(req.continue_from, who)
            if parent is None:
                gone(req.continue_from, who, "continue_from: ")
                raise Rejected(422, f"continue_from: no job {req.continue_from}")
        return await admit(who, lambda job_id, job_dir: admit_shot(req, job_id, job_dir, options, parent, files))

    film_body = {
        "required": True,
        "content": {
            **{t: {"schema": {"type": "string", "description": "A storyboard in YAML"}} for t in YAML_TYPES[:1]},
            **{t: {"schema": {"type": "object", "description": "A storyboard as JSON"}} for t in JSON_TYPES},
        },
    }

    @app.post("/v1/films", status_code=202, response_model=JobAccepted, responses=responses, tags=["jobs"],
              openapi_extra={"requestBody": film_body})
    async def submit_film(request: Request, who: Owner) -> JSONResponse:
        """Render a whole storyboard (YAML: application/x-yaml or text/yaml; or application/json)."""
        body = await request.body()
        content_type = request.headers.get("content-type", "")
        return await admit(who, lambda job_id, job_dir: admit_film(body, content_type, job_id, job_dir, options))

    @app.get("/v1/jobs", response_model=JobList, responses=_ERRORS, tags=["jobs"])
    def list_jobs(who: Owner) -> JobList:
        """Your most recent jobs (at most 100), newest first."""
        return JobList(jobs=[view(j) for j in store.list(who)])

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses=_ERRORS, tags=["jobs"])
    def get_job(job: ThisJob) -> JobView:
        """Status, progress (window i of n), ETA and error of a job."""
        return view(job)

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, status_code=202, tags=["jobs"],
                responses={**_ERRORS, 200: {"model": JobView, "description": "Cancelled at once (it was waiting)"},
                           409: {"model": Problem, "description": "Already finished"}})
    def cancel_job(job: ThisJob) -> JSONResponse:
        """Cancel a job: at once if it is waiting, else at its next window boundary (finished shots are kept)."""
        if job.terminal:
            raise Rejected(409, f"job {job.id} is already {job.status}")
        updated = store.request_cancel(job.id) or job
        service.dispatcher.wake()
        code = 200 if updated.status == CANCELLED else 202
        return JSONResponse(view(updated).model_dump(), code)

    @app.get("/v1/jobs/{job_id}/events", responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
             response_class=StreamingResponse, tags=["jobs"])
    async def job_events(request: Request, job: ThisJob) -> StreamingResponse:
        """Server-sent events: status changes, shot starts and ends, and each finished window with its progress
        and a JPEG preview; the stream ends after the job's final status.  Reconnect with Last-Event-ID."""
        try:
            after = int(request.headers.get("last-event-id", "0"))
        except ValueError:
            after = 0
        return StreamingResponse(_sse(request, job.id, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(request: Request, job_id: str, after: int):
        last_sent = asyncio.get_running_loop().time()
        while True:
            job = store.get(job_id)
            events = store.events(job_id, after)
            for e in events:
                after = e.seq
                yield f"id: {e.seq}\nevent: {e.type}\ndata: {json.dumps({'job': job_id, **e.data})}\n\n"
            if events:
                last_sent = asyncio.get_running_loop().time()
                continue  # drain before looking at the status again
            if job is None or job.terminal:
                return
            if await request.is_disconnected():
                return
            if asyncio.get_running_loop().time() - last_sent > SSE_KEEPALIVE_S:
                last_sent = asyncio.get_running_loop().time()
                yield ": keep-alive\n\n"
            await asyncio.sleep(SSE_POLL_S)

    @app.get("/v1/jobs/{job_id}/video", response_class=FileResponse, tags=["results"],
             responses={**_ERRORS, 206: {"description": "Partial content (Range)"}, 409: {"model": Problem},
                        200: {"content": {"video/mp4": {}}}})
    def job_video(request: Request, job: ThisJob) -> Response:
        """The job's H.264 mp4 (the film, or the shot's clip); supports Range requests."""
        _done(job)
        response = files.response(job.id, job.video, "video/mp4", request.headers.get("range"), f"{job.id}.mp4")
        if response is None:
            raise Rejected(404, f"job {job.id} finished but {job.video} is missing on the server")
        return response

    @app.get("/v1/jobs/{job_id}/manifest", responses={**_ERRORS, 409: {"model": Problem}}, tags=["results"])
    def job_manifest(job: ThisJob) -> JSONResponse:
        """The render manifest: shots, windows, seeds, settings, timings and versions."""
        _done(job)
        data = files.read_bytes(job.id, "manifest.json")
        if data is None:
            raise Rejected(404, f"job {job.id} finished but manifest.json is missing on the server")
        return JSONResponse(json.loads(data))

    def _done(job: Job) -> None:
        if job.status != DONE:
            raise Rejected(409, f"job {job.id} is {job.status}; results exist once it is done")

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> JSONResponse:
        """Liveness of the ingress and its dispatcher (no token needed)."""
        counts = store.counts()
        alive = service.dispatcher.alive
        body = Health(status="ok" if alive else "degraded", queued=counts[QUEUED], running=counts[RUNNING],
                      dispatcher=alive)
        return JSONResponse(body.model_dump(), 200 if alive else 503)

    from skyray.serve.studio import add_studio
    from skyray.serve.videos import add_videos_api

    add_videos_api(app, service, accept)  # /v1/videos: the OpenAI Videos API over the same jobs
    add_studio(app, service)  # the page at / and what it needs: /v1/plan, shot clips, signed media URLs
    return app


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
