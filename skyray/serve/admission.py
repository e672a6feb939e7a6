"""Turn an HTTP request into a job: a resolved storyboard, its input files, and the limits it must respect.

A shot request becomes a one-shot storyboard.  A shot that continues an earlier job becomes that job's
storyboard plus one shot with ``continue_from`` its last shot, rendered in a fresh folder into which the earlier
job's finished shot files (clip, record and saved tail latents) are copied: ``render_film`` recognises them by
content hash, reuses them instead of re-rendering, and starts the new shot from the saved tail latents, exactly
as a re-run of a longer storyboard would.  The job's video is the new shot's clip.

Everything is checked here, before a job is accepted: storyboard errors (422, with the storyboard's own
line-numbered message), served models, frame/resolution/step limits, and uploaded images (413 when too large).
Clients never name server paths: images arrive as base64 and are written into the job's ``inputs/`` folder, and
storyboards sent over HTTP may not reference files at all.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyray.plan import FilmPlan, compile_plan
from skyray.serve.files import JobFiles
from skyray.serve.options import ServeOptions
from skyray.serve.schema import SAMPLING_FIELDS, ShotRequest
from skyray.serve.store import DONE, Job
from skyray.storyboard import (
    InputLimits,
    RawStoryboard,
    Storyboard,
    StoryboardError,
    parse_resolution,
    read_storyboard,
    storyboard_from_data,
)

FILE_FIELDS = ("image", "end_image", "video")
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
YAML_TYPES = ("application/x-yaml", "application/yaml", "text/yaml", "text/x-yaml")
JSON_TYPES = ("application/json",)
# A shot written out in full, prompt travel included, takes well under this many YAML nodes.
NODES_PER_SHOT = 200


class Rejected(Exception):
    """A request that cannot become a job: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


@dataclass(frozen=True)
class Admitted:
    job_id: str
    kind: str
    model: str
    storyboard: dict
    video: str  # relative to the job folder
    parent: str | None
    windows: int
    frames: int


# ------------------------------------------------------------------------------------------------------- shots


def admit_shot(req: ShotRequest, job_id: str, job_dir: Path, options: ServeOptions, parent: Job | None,
               files: JobFiles | None = None) -> Admitted:
    """Validate a shot request and prepare ``job_dir``, the job's local staging folder (inputs; for a
    continuation, the parent's inputs and shots), which ``JobFiles.publish`` then moves to the job's folder."""
    files = files or JobFiles(options.outputs_target)
    inputs = job_dir / "inputs"
    if parent is not None:
        # The parent's shots keep their images (a shot's record hashes them): the new job carries copies.
        files.fetch(parent.id, "inputs", inputs)
    shot: dict[str, Any] = {"id": job_id, "prompt": req.prompt}
    for name in ("frames", "duration", "seed", *SAMPLING_FIELDS):
        value = getattr(req, name)
        if value is not None:
            shot[name] = value
    for name in ("image", "end_image"):
        data = getattr(req, name)
        if data is not None:
            # Named relative to the job's inputs, which may live elsewhere than here; a continuation's new files
            # are named for the job, beside the ones its ancestors' shots use.
            stem = name if parent is None else f"{job_id}.{name}"
            shot[name] = _write_image(data, name, inputs, options, stem).name

    if parent is None:
        model = _served_model(req.model, options)
        film: dict[str, Any] = {"title": req.title or f"shot {job_id}", "model": model, "shots": [shot]}
        if req.resolution is not None:
            film["resolution"] = req.resolution
        if req.fps is not None:
            film["fps"] = req.fps
        rendered = {job_id}
    else:
        film = _continuation(req, parent, shot, options)
        model = film["model"]
        rendered = {job_id}

    # A continuation carries its parent's storyboard, which this server admitted already and which grows by a
    # shot each time: only the new shot is held to the request limits (its prompt and what it renders).
    limits = input_limits(options) if parent is None else dataclasses.replace(
        InputLimits(), max_prompt_chars=options.max_prompt_chars)
    sb = _resolve(film, inputs, f"shot request {job_id}", limits)
    _check_limits(sb, rendered, options)
    plan = _plan(sb)
    if parent is not None:
        _check_tail(plan, job_id, parent, files)
        _copy_parent_shots(parent, plan, job_dir, files)
    windows = sum(len(s.windows) for s in plan.shots if s.id in rendered)
    return Admitted(job_id, "shot", model, film, f"shots/{job_id}.mp4", parent.id if parent else None, windows,
                    plan.shot(job_id).frames)


def _continuation(req: ShotRequest, parent: Job, shot: dict, options: ServeOptions) -> dict:
    if parent.status != DONE:
        raise Rejected(409, f"continue_from: job {parent.id} is {parent.status}; only a finished (done) job "
                            "can be continued")
    film = copy.deepcopy(parent.storyboard)
    if req.model is not None and req.model != film["model"]:
        raise Rejected(422, f"model: a continuation renders with its parent's model {film['model']!r}, "
                            f"not {req.model!r}")
    _served_model(film["model"], options)
    if req.fps is not None and req.fps != film.get("fps", 24):
        raise Rejected(422, f"fps: a continuation keeps its parent's fps ({film.get('fps', 24)}), got {req.fps}")
    if req.resolution is not None:
        try:
            same = parse_resolution(req.resolution) == parse_resolution(film.get("resolution", "540p"))
        except ValueError as exc:
            raise Rejected(422, f"resolution: {exc}") from None
        if not same:
            raise Rejected(422, f"resolution: a continuation keeps its parent's resolution "
                                f"({film.get('resolution', '540p')}), got {req.resolution!r}")
    if req.image is not None:
        raise Rejected(422, "image: a continuation opens with its parent's last frames, not an image; "
                            "drop 'image' or drop 'continue_from'")
    shot["continue_from"] = film["shots"][-1]["id"]
    film["shots"].append(shot)
    return film


def _check_tail(plan: FilmPlan, job_id: str, parent: Job, files: JobFiles) -> None:
    """The parent saved only its own hand-off length of tail latents; the new shot may not ask for more."""
    from safetensors import safe_open

    shot = plan.shot(job_id)
    try:
        with files.local_file(parent.id, f"shots/{shot.continues}.tail.safetensors") as tail_path, \
                safe_open(str(tail_path), "pt") as f:
            have = f.get_slice("tail").get_shape()[2]
    except (OSError, KeyError, IndexError) as exc:
        raise Rejected(409, f"continue_from: job {parent.id} has no saved tail latents ({exc.__class__.__name__}); "
                            "it cannot be continued") from None
    if shot.first_prefix > have:
        raise Rejected(422, f"overlap_history {shot.sampling.overlap_history} needs the last {shot.first_prefix} "
                            f"latents of job {parent.id}, which saved {have}; use its overlap_history "
                            f"({plan.shot(shot.continues).sampling.overlap_history}) or less")


def _copy_parent_shots(parent: Job, plan: FilmPlan, job_dir: Path, files: JobFiles) -> None:
    names = [name for s in plan.shots if s.id != job_dir.name
             for name in (f"{s.id}.mp4", f"{s.id}.json", f"{s.id}.tail.safetensors", f"{s.id}.safetensors")]
    (job_dir / "shots").mkdir(parents=True, exist_ok=True)
    files.fetch(parent.id, "shots", job_dir / "shots", names)


# ------------------------------------------------------------------------------------------------------- films


def admit_film(body: bytes, content_type: str, job_id: str, job_dir: Path, options: ServeOptions) -> Admitted:
    """Validate a storyboard sent as YAML or JSON; errors carry the storyboard's line numbers."""
    try:
        return _admit_film(body, content_type, job_id, job_dir, options)
    except RecursionError:  # YAML and JSON parsers recurse per nesting level
        raise Rejected(422, "the storyboard is nested too deeply") from None


def _admit_film(body: bytes, content_type: str, job_id: str, job_dir: Path, options: ServeOptions) -> Admitted:
    media = content_type.split(";")[0].strip().lower()
    if media not in YAML_TYPES + JSON_TYPES:
        raise Rejected(415, f"send the storyboard as application/json or application/x-yaml (text/yaml), "
                            f"not {media or 'no content type'}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(422, f"the storyboard is not UTF-8 text (byte {exc.start})") from None
    limits = input_limits(options)
    # Read once, within the limits (JSON is YAML too); errors carry the storyboard's line numbers.
    try:
        raw = read_storyboard(text, "storyboard", limits)
    except StoryboardError as err:
        raise Rejected(422, str(err)) from None
    film = raw.data
    if isinstance(film, dict):
        _check_no_files(film)
        if "model" in film:
            if not isinstance(film["model"], str):
                raise Rejected(422, f"model: expected a string, got {type(film['model']).__name__}")
            _served_model(film["model"], options)
        film = {**film, "model": film.get("model", options.default_model)}
    inputs = job_dir / "inputs"
    sb = _resolve(film, inputs, "storyboard", limits, raw)
    _check_limits(sb, {s.id for s in sb.shots}, options)
    plan = _plan(sb)
    return Admitted(job_id, "film", film["model"], film, "film.mp4", None,
                    sum(len(s.windows) for s in plan.shots), plan.frames)


def input_limits(options: ServeOptions) -> InputLimits:
    """What reading one request's storyboard may cost on this server."""
    return InputLimits(max_bytes=options.max_body_bytes, max_shots=options.max_shots,
                       max_nodes=NODES_PER_SHOT * (options.max_shots + 1), max_prompt_chars=options.max_prompt_chars)


def _check_no_files(raw: dict) -> None:
    shots = raw.get("shots")
    if not isinstance(shots, list):
        return
    for i, shot in enumerate(shots):
        if isinstance(shot, dict):
            for name in FILE_FIELDS:
                if name in shot:
                    label = f"shot '{shot['id']}'" if isinstance(shot.get("id"), str) else f"shots[{i}]"
                    raise Rejected(422, f"{label} field '{name}': storyboards sent over HTTP cannot reference "
                                        "files on the server; send the shot to POST /v1/shots with the image as "
                                        "base64")


# ----------------------------------------------------------------------------------------------------- shared


def _served_model(model: str | None, options: ServeOptions) -> str:
    if model is None:
        return options.default_model
    if model not in options.models:
        raise Rejected(422, f"model {model!r} is not served here (served: {', '.join(options.models)})")
    return model


def _resolve(film: Any, base_dir: Path, source: str, limits: InputLimits, raw: RawStoryboard | None = None,
             ) -> Storyboard:
    try:
        if raw is not None:
            return raw.validate(base_dir, film, limits)
        return storyboard_from_data(film, base_dir, source, limits=limits)
    except StoryboardError as err:
        raise Rejected(422, str(err)) from None


def _plan(sb) -> FilmPlan:
    try:
        return compile_plan(sb)
    except StoryboardError as err:
        raise Rejected(422, str(err)) from None


def _check_limits(sb: Storyboard, rendered: set[str], options: ServeOptions) -> None:
    """The server's limits, checked on the resolved storyboard: before planning, whose cost grows with them."""
    problems = []
    width, height = sb.width, sb.height
    if width > options.max_side or height > options.max_side or width * height > options.max_pixels:
        problems.append(f"resolution {width}x{height} is over this server's limit (at most "
                        f"{options.max_side} a side and {options.max_pixels} pixels)")
    shots = [i for i, s in enumerate(sb.shots) if s.id in rendered]
    if len(shots) > options.max_shots:
        problems.append(f"{len(shots)} shots; this server renders at most {options.max_shots} per job")
    frames = sum(sb.shots[i].frame_count for i in shots)
    if frames > options.max_frames:
        problems.append(f"{frames} frames to render; this server renders at most {options.max_frames} per job")
    for name in ("steps", "ar_step"):
        value = max(sb.setting(i, name) for i in shots)
        if value > options.max_steps:
            problems.append(f"{name} {value}; this server allows at most {options.max_steps}")
    if problems:
        raise Rejected(422, "; ".join(problems))


_DATA_URI = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def _write_image(data: str, name: str, inputs: Path, options: ServeOptions, stem: str | None = None) -> Path:
    """Decode a base64 image, check it, write it as ``inputs/<stem or name>.<ext>``; returns the path."""
    from PIL import Image, UnidentifiedImageError

    m = _DATA_URI.match(data)
    text = re.sub(r"\s+", "", data[m.end():] if m else data)
    if len(text) * 3 // 4 > options.max_image_bytes + 3:
        raise Rejected(413, f"{name}: the image is over {options.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(422, f"{name}: not valid base64") from None
    if len(raw) > options.max_image_bytes:
        raise Rejected(413, f"{name}: the image is {len(raw)} bytes, over the limit of {options.max_image_bytes}")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt, (w, h) = im.format, im.size
            if fmt not in IMAGE_FORMATS:
                raise Rejected(422, f"{name}: {fmt or 'unknown'} images are not accepted; send PNG, JPEG or WebP")
            if w * h > options.max_image_pixels:
                raise Rejected(413, f"{name}: {w}x{h} pixels is over the limit of {options.max_image_pixels}")
            im.verify()
        with Image.open(io.BytesIO(raw)) as im:
            im.load()  # verify() skips the pixel data; a truncated file fails only here
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Rejected(422, f"{name}: not a readable PNG, JPEG or WebP image ({exc.__class__.__name__})") from None
    inputs.mkdir(parents=True, exist_ok=True)
    path = inputs / f"{stem or name}.{IMAGE_FORMATS[fmt]}"
    path.write_bytes(raw)
    return path
