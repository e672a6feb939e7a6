"""The studio: a page at ``/`` of the Serve app (static files beside this module, no build step, no CDN), and the
routes it needs, open to every client:

- ``POST /v1/plan``: validate and plan a storyboard without submitting it (errors with their line numbers);
- ``GET /v1/jobs/{id}/shots/{shot}``, ``/contact_sheet``, ``/thumbnail``: a job's per-shot clips (each as soon as
  its shot is done) and images;
- ``POST /v1/jobs/{id}/media``: short-lived signed URLs (``/media/...?exp=&sig=``, HMAC-SHA256) for a ``<video>``
  or ``<img>``, which cannot send an ``Authorization`` header; no long-lived token ever goes into a URL.

The page keeps its token in ``sessionStorage`` and follows progress with a streaming ``fetch`` of the SSE route
(``EventSource`` cannot send a header either).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
import hashlib
import hmac
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from skyray.serve.admission import Rejected, admit_film
from skyray.serve.schema import JOB_ID_PATTERN
from skyray.serve.store import DONE

if TYPE_CHECKING:
    from skyray.serve.ingress import IngressService

STATIC = Path(__file__).parent
FILES = {"app.js": "text/javascript", "style.css": "text/css", "demo.yaml": "text/plain"}
MEDIA_TTL_S = 900  # long enough to play a film with Range requests, short enough to be useless in a log
SHOT_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"


def media_key(token_hashes: tuple[str, ...], data_dir: str) -> bytes:
    """The signing key: the same on every ingress replica (they share the token hashes), unknown to clients."""
    return hashlib.sha256(("skyray-media\n" + "\n".join(sorted(token_hashes)) + "\n" + data_dir).encode()).digest()


def sign(key: bytes, path: str, expires: int) -> str:
    return hmac.new(key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def plan_summary(plan) -> dict:
    from skyray.plan import format_plan

    rate = 989.0 * 0.4  # format_plan's defaults: 40% MFU of an H100's dense bf16 peak
    return {
        "title": plan.title, "model": plan.model, "width": plan.width, "height": plan.height, "fps": plan.fps,
        "frames": plan.frames, "seconds": round(plan.seconds, 3),
        "windows": sum(len(s.windows) for s in plan.shots), "gpu_seconds": _sig(plan.tflops / rate),
        "shots": [{"id": s.id, "frames": s.frames, "seconds": round(s.seconds, 3), "windows": len(s.windows),
                   "continues": s.continues, "gpu_seconds": _sig(s.tflops / rate)} for s in plan.shots],
        "warnings": list(plan.warnings), "text": format_plan(plan),
    }


def _sig(x: float) -> float:
    return float(f"{x:.4g}")  # a tiny model's estimate is far below a millisecond: keep significant digits


def issues_of(message: str) -> list[dict]:
    """``storyboard:6: shot 'a' field 'promt': ...`` lines as ``{"line", "message"}``."""
    out = []
    for text in message.splitlines():
        m = re.match(r"storyboard:(\d+): ", text)
        out.append({"line": int(m[1]) if m else None, "message": text})
    return out


def add_studio(app: FastAPI, service: "IngressService") -> None:
    options, store = service.options, service.store
    key = media_key(tuple(service.auth.hashes), str(options.jobs_dir))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(), headers={"Cache-Control": "no-cache"})

    @app.get("/studio/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        if name not in FILES:
            raise Rejected(404, f"no studio file {name!r}")
        return FileResponse(STATIC / name, media_type=FILES[name], headers={"Cache-Control": "no-cache"})

    @app.post("/v1/plan", tags=["studio"])
    async def plan(request: Request) -> JSONResponse:
        """Validate and plan a storyboard (YAML or JSON) without submitting it: ``{"ok": true, "plan": ...}``,
        or ``{"ok": false, "issues": [{"line", "message"}]}`` with the storyboard's line numbers."""
        body = await request.body()
        content_type = request.headers.get("content-type", "application/x-yaml")

        def check() -> dict:
            from skyray.plan import compile_plan
            from skyray.storyboard import storyboard_from_data

            with tempfile.TemporaryDirectory(prefix="skyray-plan-") as tmp:
                try:
                    admitted = admit_film(body, content_type, "plan", Path(tmp), options)
                except Rejected as exc:
                    if exc.status in (413, 415):
                        raise
                    return {"ok": False, "issues": issues_of(exc.detail)}
                sb = storyboard_from_data(admitted.storyboard, Path(tmp), "storyboard")
                return {"ok": True, "plan": plan_summary(compile_plan(sb))}

        return JSONResponse(await run_in_threadpool(check))

    def owned(request: Request, job_id: str):
        job = store.get(job_id, request.state.owner)
        if job is None:
            raise Rejected(404, f"no job {job_id}")
        return job

    files = service.files

    def result(request: Request, job, relative: str, kind: str, when_done: bool = True) -> Response:
        """The job's file, from wherever job files live (Range requests honoured)."""
        if when_done and job.status != DONE:
            raise Rejected(409, f"job {job.id} is {job.status}; {relative} exists once it is done")
        response = files.response(job.id, relative, kind, request.headers.get("range"))
        if response is None:
            raise Rejected(404, f"job {job.id} has no {relative} (yet)")
        return response

    JobId = PathParam(pattern=JOB_ID_PATTERN)

    @app.get("/v1/jobs/{job_id}/shots/{shot}", response_class=FileResponse, tags=["results"])
    def shot_clip(request: Request, job_id: str = JobId, shot: str = PathParam(pattern=SHOT_PATTERN)):
        """One shot's clip (mp4), as soon as that shot is done, while the rest of the film renders."""
        return result(request, owned(request, job_id), f"shots/{shot}.mp4", "video/mp4", when_done=False)

    @app.get("/v1/jobs/{job_id}/contact_sheet", response_class=FileResponse, tags=["results"])
    def contact_sheet(request: Request, job_id: str = JobId):
        """A grid of frames of every shot (PNG)."""
        return result(request, owned(request, job_id), "contact_sheet.png", "image/png")

    @app.get("/v1/jobs/{job_id}/thumbnail", response_class=FileResponse, tags=["results"])
    async def job_thumbnail(request: Request, job_id: str = JobId):
        """The film's first frame (JPEG)."""
        from skyray.serve.videos import local_thumbnail, remote_thumbnail

        job = owned(request, job_id)
        if job.status != DONE or files.size(job.id, "film.mp4") is None:
            result(request, job, "film.mp4", "video/mp4")  # says why not
        await run_in_threadpool(remote_thumbnail if files.remote else local_thumbnail, files, job.id)
        return result(request, job, "thumbnail.jpg", "image/jpeg")

    @app.post("/v1/jobs/{job_id}/media", tags=["results"])
    def media_urls(request: Request, job_id: str = JobId) -> JSONResponse:
        """Signed URLs, valid ``MEDIA_TTL_S`` seconds, of the job's film, contact sheet and finished shots."""
        job = owned(request, job_id)
        expires = int(time.time()) + MEDIA_TTL_S

        def url(rel: str) -> str:
            path = f"{job.id}/{rel}"
            return f"/media/{path}?exp={expires}&sig={sign(key, path, expires)}"

        shots = {name[:-4]: url(f"shots/{name}") for name in files.location.list(f"{job.id}/shots")
                 if name.endswith(".mp4")}
        body = {"expires_at": expires, "shots": shots,
                "video": url("film.mp4") if job.status == DONE and files.size(job.id, "film.mp4") else None,
                "contact_sheet": url("contact_sheet.png") if job.status == DONE else None}
        return JSONResponse(body)

    @app.get("/media/{job_id}/{rel:path}", include_in_schema=False)
    def media(request: Request, job_id: str, rel: str, exp: int = 0, sig: str = "") -> Response:
        path = f"{job_id}/{rel}"
        if not re.fullmatch(JOB_ID_PATTERN, job_id) or not re.fullmatch(r"(shots/[A-Za-z0-9_.-]+\.mp4|film\.mp4|"
                                                                         r"contact_sheet\.png)", rel):
            raise Rejected(404, "no such media")
        if not hmac.compare_digest(sig, sign(key, path, exp)):
            raise Rejected(403, "bad media signature")
        if exp < time.time():
            raise Rejected(403, "this media URL has expired; ask for a new one")
        kind = "image/png" if rel.endswith(".png") else "video/mp4"
        response = files.response(job_id, rel, kind, request.headers.get("range"),
                                  headers={"Cache-Control": "private, max-age=60"})
        if response is None:
            raise Rejected(404, "no such media")
        return response
