"""The storyboard: a film as YAML (or JSON), validated before any model is loaded.

A storyboard is a list of shots.  A shot either *cuts* (starts fresh, optionally from a first-frame image) or
*continues* the final latents of another shot (``continue: true`` for the previous one, ``continue_from: <id>``
for any other), or *extends* a video clip.  Every error names the YAML line it comes from, the shot and the field,
and says what would be valid, so a typo costs seconds instead of a model load.

Loading is two passes: pydantic checks types and unknown fields, then :func:`_resolve` checks what spans fields and
shots (the frame grid, references, files) and fills in what the plan needs (seeds, absolute paths, snapped frame
counts).  Only a resolved storyboard can be planned.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
import yaml.composer
import yaml.constructor
import yaml.parser
import yaml.reader
import yaml.resolver
import yaml.scanner
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from skyray.engine import schedule

SHOT_ID = re.compile(r"[A-Za-z0-9_-]+")
RESOLUTIONS = {"540p": (544, 960), "720p": (720, 1280)}  # (height, width)
# The reference CLI caps addnoise_condition at 50; much beyond that the prefix is too noisy to hold a shot together.
ADDNOISE_WARN = 60
MAX_SEED = 2**63


# ------------------------------------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Issue:
    """One problem in a storyboard, located as precisely as the YAML allows."""

    source: str
    line: int | None
    column: int | None
    shot: str | None  # "shot 'harbor'" or "shots[3]" when the id itself is unusable
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        what = " ".join(p for p in (self.shot, f"field '{self.field}'" if self.field else None) if p)
        return f"{where}: {what}: {self.message}" if what else f"{where}: {self.message}"


class StoryboardError(ValueError):
    """A storyboard that cannot be rendered; ``issues`` lists every problem found, one line each."""

    def __init__(self, issues: list[Issue]):
        self.issues = sorted(issues, key=lambda i: i.line or 0)
        super().__init__("\n".join(str(i) for i in self.issues))


@dataclass
class _Node:
    """Line and column (1-based) of a YAML node, its keys and its children: a map from pydantic ``loc`` to lines."""

    line: int
    column: int
    end_line: int
    keys: dict[Any, tuple[int, int]] = field(default_factory=dict)
    children: dict[Any, _Node] = field(default_factory=dict)  # by mapping key or sequence index


# ------------------------------------------------------------------------------------------------------- schema


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


def _check_grid_setting(value: int | None, name: str) -> int | None:
    if value is not None and (value - 1) % schedule.TEMPORAL_STRIDE:
        lo = (value - 1) // 4 * 4 + 1
        raise ValueError(
            f"{name} must be 4k+1 frames (one latent per 4 frames plus the first), got {value} (try {lo} or {lo + 4})"
        )
    return value


class TeaCacheSettings(_Model):
    threshold: float = Field(ge=0)
    """Accumulated rescaled change of the time embedding under which a row reuses the cached block residual
    (SkyReels-V2 suggests 0.1 to 0.3; 0: off)."""


class Defaults(_Model):
    """Sampling settings every shot inherits; each can be overridden on the shot itself."""

    steps: int = Field(30, ge=1)
    """Denoising steps per window."""
    guidance_scale: float = Field(6.0, ge=0)
    """Classifier-free guidance; above 1 every schedule row runs the model twice."""
    shift: float = Field(8.0, gt=0)
    """Flow shift of the UniPC scheduler (the reference uses 8 for text-to-video, 5 for image-to-video)."""
    base_num_frames: int = Field(97, ge=5)
    """Frames the model sees at once (a window, prefix included): 97 at 540p, 121 at 720p."""
    overlap_history: int = Field(17, ge=1)
    """Frames handed from one window (or shot) to the next as clean prefix."""
    addnoise_condition: float = Field(20.0, ge=0, le=1000)
    """Noise mixed into the prefix copy the model sees (0..1000); steadies long videos, >60 loses detail."""
    ar_step: int = Field(0, ge=0)
    """0: synchronous diffusion forcing; >0: each causal block lags its predecessor by this many steps."""
    causal_block_size: int = Field(1, ge=1)
    """Latents per causal block (the reference uses 5 with ar_step 5)."""
    causal_attention: bool = False
    """Block-causal attention mask (the released weights were not trained with it)."""
    negative_prompt: str = ""
    enhance: bool = False
    """Rewrite the prompts with the prompt enhancer before encoding."""
    cfg_batch: bool = True
    """Run the conditional and unconditional passes as one batch-2 forward (equal to two forwards within 1e-5)."""
    teacache: TeaCacheSettings | None = None
    """Skip transformer blocks on rows whose timesteps barely moved (TeaCache); absent or threshold 0: off."""
    compile: bool = False
    """torch.compile the transformer blocks (slow first window, faster after; worth it on GPUs)."""
    attention: Literal["sdpa", "flash", "xfuser"] = "sdpa"
    """Attention kernel: sdpa (torch chooses), flash (CUDA flash-attention only), xfuser (sequence-parallel groups)."""
    offload: bool = False
    """Move the text encoder and transformer to the CPU between stages (GPUs too small to hold every model)."""

    @field_validator("base_num_frames", "overlap_history")
    @classmethod
    def _grid(cls, v: int, info: Any) -> int:
        return _check_grid_setting(v, info.field_name)


SAMPLING_FIELDS: tuple[str, ...] = tuple(Defaults.model_fields)


class Transition(_Model):
    fade: float = Field(ge=0)
    """Seconds of fade into this shot (cuts only)."""


class Shot(_Model):
    """One shot.  Unset sampling fields fall back to the film's ``defaults``."""

    id: str
    """Unique name; becomes a file name, so letters, digits, '_' and '-' only."""
    prompt: list[str] = Field(min_length=1)
    """A prompt, or one prompt per window ("prompt travel"; the last one holds for any further windows)."""
    original_prompt: list[str] | None = Field(None, min_length=1)
    """The prompt as written, kept by the prompt enhancer when it rewrote ``prompt`` (recorded, never rendered)."""
    frames: int | None = Field(None, ge=1)
    """Frames this shot adds to the film: 4k+1 for a fresh shot, a multiple of 4 for a continuation or extension."""
    duration: float | None = Field(None, gt=0)
    """Seconds instead of ``frames``; snapped to the frame grid."""
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    """Default: the film seed plus the shot's index (from 0)."""
    image: str | None = None
    """First frame (a fresh shot that starts from a picture)."""
    end_image: str | None = None
    """Last frame the shot should arrive at."""
    video: str | None = None
    """A clip to extend: its last frames become the prefix."""
    continue_: bool = Field(False, alias="continue")
    """Start from the previous shot's final latents."""
    continue_from: str | None = None
    """Start from the final latents of the named shot."""
    transition: Transition | None = None

    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    shift: float | None = Field(None, gt=0)
    base_num_frames: int | None = Field(None, ge=5)
    overlap_history: int | None = Field(None, ge=1)
    addnoise_condition: float | None = Field(None, ge=0, le=1000)
    ar_step: int | None = Field(None, ge=0)
    causal_block_size: int | None = Field(None, ge=1)
    causal_attention: bool | None = None
    negative_prompt: str | None = None
    enhance: bool | None = None
    cfg_batch: bool | None = None
    teacache: TeaCacheSettings | None = None
    compile: bool | None = None
    attention: Literal["sdpa", "flash", "xfuser"] | None = None
    offload: bool | None = None

    _frames: int | None = PrivateAttr(None)
    _video_frames: int | None = PrivateAttr(None)

    @field_validator("prompt", "original_prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("base_num_frames", "overlap_history")
    @classmethod
    def _grid(cls, v: int | None, info: Any) -> int | None:
        return _check_grid_setting(v, info.field_name)

    @property
    def continues(self) -> bool:
        return self.continue_ or self.continue_from is not None

    @property
    def fresh(self) -> bool:
        """Starts from nothing (or a first-frame image): its frame count is 4k+1."""
        return not self.continues and self.video is None

    @property
    def frame_count(self) -> int:
        """Frames this shot adds (``frames``, or ``duration`` snapped to the grid)."""
        if self._frames is None:
            raise RuntimeError("storyboard not resolved: build it with load_storyboard or parse_storyboard")
        return self._frames

    @property
    def video_frames(self) -> int | None:
        """Frames of the clip to extend, counted when the storyboard was loaded."""
        return self._video_frames


class Cluster(_Model):
    groups: int = Field(1, ge=1)
    """Model replicas rendering chains in parallel."""
    gpus_per_group: int = Field(1, ge=1)
    """GPUs sharing one replica (sequence / CFG parallel)."""


class Parallel(_Model):
    ulysses: int | None = Field(None, ge=1)
    """Ulysses sequence-parallel degree (None: choose from the group size)."""
    ring: int = Field(1, ge=1)
    cfg: bool | None = None
    """Run the conditional and unconditional passes on different GPUs (None: when the group allows)."""


class Enhancer(_Model):
    model: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    seed: int | None = None


class Storyboard(_Model):
    """A film: settings, defaults for every shot, and the shots in the order they are edited together."""

    title: str
    model: str = "tiny"
    """'tiny' (built in), a diffusers folder, or a hub id such as Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers."""
    resolution: str = "540p"
    """'540p' (544x960), '720p' (720x1280) or 'WxH' (width x height, both multiples of 16)."""
    fps: int = Field(24, ge=1)
    seed: int = Field(0, ge=0, lt=MAX_SEED)
    defaults: Defaults = Field(default_factory=Defaults)
    cluster: Cluster | None = None
    parallel: Parallel | None = None
    enhancer: Enhancer | None = None
    shots: list[Shot] = Field(min_length=1)

    _source: str = PrivateAttr("<string>")
    _lines: _Node | None = PrivateAttr(None)
    _warnings: list[str] = PrivateAttr(default_factory=list)
    _resolved: bool = PrivateAttr(False)

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: str) -> str:
        parse_resolution(v)
        return v

    @property
    def height(self) -> int:
        return parse_resolution(self.resolution)[0]

    @property
    def width(self) -> int:
        return parse_resolution(self.resolution)[1]

    @property
    def source(self) -> str:
        return self._source

    @property
    def resolved(self) -> bool:
        return self._resolved

    @property
    def warnings(self) -> tuple[str, ...]:
        """Things that render but are probably not meant (one line each, located like errors)."""
        return tuple(self._warnings)

    def setting(self, index: int, name: str) -> Any:
        """Shot ``index``'s value of the sampling field ``name`` (its override, else the film default)."""
        value = getattr(self.shots[index], name)
        return getattr(self.defaults, name) if value is None else value

    def setting_loc(self, index: int, name: str) -> tuple[Any, ...]:
        """Where shot ``index``'s value of ``name`` was written (the shot, or ``defaults``)."""
        if getattr(self.shots[index], name) is not None:
            return ("shots", index, name)
        return ("defaults", name)

    def continued_index(self, index: int) -> int | None:
        """Index of the shot whose final latents open shot ``index`` (None for a cut or a video extension)."""
        shot = self.shots[index]
        if shot.continue_:
            return index - 1
        if shot.continue_from is not None:
            return next(i for i, s in enumerate(self.shots) if s.id == shot.continue_from)
        return None

    def canonical_json(self) -> str:
        """The resolved storyboard as compact, key-sorted JSON (what the storyboard hash is taken of)."""
        data = self.model_dump(mode="json", by_alias=True)
        for shot, raw in zip(self.shots, data["shots"]):
            raw["frames"] = shot._frames if self._resolved else raw["frames"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def error(self, loc: tuple[Any, ...], message: str) -> StoryboardError:
        """A :class:`StoryboardError` located at ``loc`` (a path into the YAML, e.g. ``("shots", 2, "prompt")``)."""
        return StoryboardError([_issue(self._source, self._lines, loc, message, self._shot_ids())])

    def _shot_ids(self) -> list[Any]:
        return [s.id for s in self.shots]


def parse_resolution(text: str) -> tuple[int, int]:
    """``'540p'``, ``'720p'`` or ``'WxH'`` -> (height, width)."""
    if text in RESOLUTIONS:
        return RESOLUTIONS[text]
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"resolution {text!r} is not '540p', '720p' or 'WxH' (width x height, e.g. '960x544')")
    width, height = int(m[1]), int(m[2])
    if width < 16 or height < 16 or width % 16 or height % 16:

        def near(v: int) -> str:
            lo = max(16, v // 16 * 16)
            return f"{lo}" if lo == v or v < 16 else f"{lo} or {lo + 16}"

        raise ValueError(
            f"resolution {text!r}: width and height must be positive multiples of 16 "
            f"(the VAE downsamples by 8 and the transformer patches by 2); try width {near(width)}, height {near(height)}"
        )
    return height, width


def snap_duration(seconds: float, fps: int, fresh: bool, min_frames: int = 1) -> int:
    """Frames closest to ``seconds`` on the grid: 4k+1 for a fresh shot, a multiple of 4 for a continuation."""
    x = seconds * fps
    if fresh:
        return max(min_frames, 4 * math.floor((x - 1) / 4 + 0.5) + 1)
    return max(4, 4 * math.floor(x / 4 + 0.5))


def video_prefix_latents(video_frames: int, overlap_history: int, causal_block_size: int) -> int:
    """Clean latents a clip opens its extension with: its last ``overlap_history`` frames, in whole blocks."""
    if video_frames < 1:
        raise ValueError("the clip has no frames")
    usable = (video_frames - 1) // 4 * 4 + 1
    return schedule.prefix_latents(min(overlap_history, usable), causal_block_size)


# ------------------------------------------------------------------------------------------------------ limits


@dataclass(frozen=True)
class InputLimits:
    """What reading one storyboard may cost, enforced on every path that reads one (CLI, Serve, batch) before
    pydantic sees it, so that hostile input is refused within milliseconds and in bounded memory.

    YAML is held to these while it is composed: an alias bomb or merge keys that copy each other are refused before
    anything is expanded.  Data given as a dict (JSON, a Serve request, a batch line) is held to the same limits.
    """

    max_bytes: int = 16 << 20
    """Length of the storyboard text."""
    max_nodes: int = 50_000
    """Values (mappings, lists, keys and scalars) once aliases and merge keys are expanded, each alias counting its
    whole target again; a 2000-shot film written out in full takes about 30,000."""
    max_depth: int = 12
    """Levels of nesting, scalars included (a storyboard needs 5: film, shots, shot, prompt list, prompt)."""
    max_shots: int = 2000
    max_prompt_chars: int = 4000
    """Characters of one prompt or negative prompt.  The text encoder reads 512 tokens (about 2000 characters of
    English); the rest is room for the prompt enhancer's rewrites.  The plan warns when a prompt will be cut."""
    max_string_chars: int = 4096
    """Characters of any other string (a title, an id, a path)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"InputLimits.{f.name} must be >= 1, got {getattr(self, f.name)}")


PROMPT_FIELDS = ("prompt", "original_prompt", "negative_prompt")
ENCODER_TOKENS = 512  # engine.text.MAX_TEXT_TOKENS, not imported: it pulls in torch
CHARS_PER_TOKEN = 4  # UMT5's sentencepiece on English prose; a rough figure, used only to warn
MAX_KEY_CHARS = 256
MAX_NUMBER_CHARS = 64
_MAX_ISSUES = 20


def _check_bounds(data: dict, limits: InputLimits, lines: _Node | None, source: str) -> None:
    """Refuse data over ``limits`` before pydantic walks it (and walks each shared alias once per use)."""
    shots = data.get("shots")
    if isinstance(shots, list) and len(shots) > limits.max_shots:
        message = f"{len(shots)} shots, over the limit of {limits.max_shots}; split the film into several storyboards"
        raise StoryboardError([_issue(source, lines, ("shots",), message, [])])
    ids = _raw_ids(data)
    issues: list[Issue] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    count = 1
    while stack and len(issues) < _MAX_ISSUES:
        loc, value = stack.pop()
        if len(loc) + 1 > limits.max_depth:
            message = f"nested too deeply: more than {limits.max_depth} levels (a storyboard needs 5)"
            raise StoryboardError([_issue(source, lines, loc, message, ids)])
        if isinstance(value, str):
            prompt = bool(loc) and (loc[-1] in PROMPT_FIELDS or (len(loc) > 1 and loc[-2] in PROMPT_FIELDS))
            limit = limits.max_prompt_chars if prompt else limits.max_string_chars
            if len(value) > limit:
                hint = (
                    " (the text encoder reads 512 tokens, about 2000 characters; shorten it, or give one prompt per "
                    "window as a list)"
                    if prompt
                    else ""
                )
                issues.append(
                    _issue(source, lines, loc, f"{len(value)} characters, over the limit of {limit}{hint}", ids)
                )
            continue
        if isinstance(value, dict):
            children: Any = value.items()
        elif isinstance(value, (list, tuple)):
            children = enumerate(value)
        else:
            continue
        count += len(value)
        if count > limits.max_nodes:
            message = f"the storyboard holds more than {limits.max_nodes} values (each alias counts its target again)"
            raise StoryboardError([_issue(source, lines, loc, message, ids)])
        for key, child in children:
            if isinstance(key, str) and len(key) > MAX_KEY_CHARS:
                issues.append(
                    _issue(source, lines, loc, f"a key of {len(key)} characters (at most {MAX_KEY_CHARS})", ids)
                )
                continue
            stack.append(((*loc, key), child))
    if issues:
        raise StoryboardError(issues)


# ----------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class RawStoryboard:
    """Storyboard text read within the input limits but not yet validated: plain data, and where it was written."""

    data: Any
    source: str
    lines: _Node | None

    def validate(self, base_dir: str | Path, data: Any = None, limits: InputLimits | None = None) -> Storyboard:
        """Validate and resolve ``data`` (default: what was read), located by the lines of the text."""
        return storyboard_from_data(
            self.data if data is None else data, base_dir, self.source, limits=limits, _lines=self.lines
        )


def load_storyboard(path: str | Path, limits: InputLimits | None = None) -> Storyboard:
    """Read, validate and resolve a storyboard file (YAML or JSON); relative paths resolve against its folder."""
    path, limits = Path(path), limits or InputLimits()
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise StoryboardError(
                [
                    Issue(
                        str(path),
                        None,
                        None,
                        None,
                        None,
                        f"the storyboard is {size} bytes, over the limit of {limits.max_bytes}",
                    )
                ]
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise StoryboardError(
            [Issue(str(path), None, None, None, None, f"cannot read storyboard: {exc.strerror}")]
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        message = f"not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be decoded (save the file as UTF-8)"
        raise StoryboardError([Issue(str(path), line, None, None, None, message)]) from None
    return parse_storyboard(text, path.parent, source_name=str(path), limits=limits)


def parse_storyboard(
    text: str, base_dir: str | Path, source_name: str = "<string>", limits: InputLimits | None = None
) -> Storyboard:
    """Validate and resolve a storyboard given as YAML or JSON text."""
    limits = limits or InputLimits()
    return read_storyboard(text, source_name, limits).validate(base_dir, limits=limits)


def read_storyboard(text: str, source_name: str = "<string>", limits: InputLimits | None = None) -> RawStoryboard:
    """Parse YAML or JSON text within ``limits``; raises :class:`StoryboardError` (with lines) on unreadable or
    oversized text and on keys repeated within one mapping."""
    limits = limits or InputLimits()
    if len(text) > limits.max_bytes:
        raise StoryboardError(
            [
                Issue(
                    source_name,
                    None,
                    None,
                    None,
                    None,
                    f"the storyboard is {len(text)} characters, over the limit of {limits.max_bytes}",
                )
            ]
        )
    try:
        node, data, duplicates = _compose(text, limits)
    except _Refused as exc:
        raise StoryboardError([Issue(source_name, exc.line, exc.column, None, None, exc.message)]) from None
    except yaml.MarkedYAMLError as exc:
        if "\t" not in text or not _is_json(text):
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            column = mark.column + 1 if mark else None
            detail = " ".join(p for p in (exc.context, exc.problem) if p)
            message = f"not valid YAML: {detail}"
            if "maximum nesting depth" in detail:  # libyaml's own limit, met before ours on long runs of brackets
                message = f"nested too deeply: more than {limits.max_depth} levels (a storyboard needs 5)"
            raise StoryboardError([Issue(source_name, line, column, None, None, message)]) from None
        # Valid JSON that YAML rejects is JSON indented with tabs; JSON strings cannot hold a raw tab, so
        # spaces in their place change nothing but let YAML keep the line numbers.
        try:
            node, data, duplicates = _compose(text.replace("\t", " "), limits)
        except _Refused as refused:
            issue = Issue(source_name, refused.line, refused.column, None, None, refused.message)
            raise StoryboardError([issue]) from None
    except ValueError as exc:  # a scalar YAML resolves but Python cannot convert (a date like 2024-02-30)
        raise StoryboardError([Issue(source_name, None, None, None, None, f"not valid YAML: {exc}")]) from None
    lines = _node_lines(node) if node is not None else None
    issues = []
    for key, first, line, col in duplicates:
        shot = _shot_at_line(lines, line)
        loc = ("shots", shot, key) if shot is not None else (key,)
        message = f"'{key}' appears twice in one mapping (first on line {first}); YAML would keep only the last"
        issues.append(_issue(source_name, lines, loc, message, _raw_ids(data), line=line, column=col))
    if issues:
        raise StoryboardError(issues)
    return RawStoryboard(data, source_name, lines)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # the C decoder recurses per nesting level
        return False
    return True


def _compose(text: str, limits: InputLimits) -> tuple[yaml.Node | None, Any, list[tuple[str, int, int, int]]]:
    loader = _LineLoader(text, limits)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data, loader.duplicates


def storyboard_from_data(
    data: Any,
    base_dir: str | Path,
    source_name: str = "<data>",
    *,
    limits: InputLimits | None = None,
    _lines: _Node | None = None,
) -> Storyboard:
    """Validate and resolve an already-parsed storyboard (a dict as from ``yaml.safe_load`` or ``json.loads``)."""
    if not isinstance(data, dict):
        raise StoryboardError(
            [
                Issue(
                    source_name,
                    1,
                    1,
                    None,
                    None,
                    "a storyboard is a mapping with 'title', 'shots' and optional film settings, "
                    f"got {type(data).__name__}",
                )
            ]
        )
    _check_bounds(data, limits or InputLimits(), _lines, source_name)
    try:
        sb = Storyboard.model_validate(data)
    except ValidationError as exc:
        raise StoryboardError(_pydantic_issues(exc, data, _lines, source_name)) from None
    sb._source = source_name
    sb._lines = _lines
    _resolve(sb, Path(base_dir).expanduser())
    return sb


class _Refused(Exception):
    """YAML over the input limits, refused where it was being read."""

    def __init__(self, mark: Any, message: str) -> None:
        super().__init__(message)
        self.line, self.column, self.message = mark.line + 1, mark.column + 1, message


try:  # libyaml scans in C: a megabyte-long scalar costs milliseconds instead of a second
    from yaml.cyaml import CParser as _EventParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml

    class _EventParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _LineLoader(_EventParser, yaml.composer.Composer, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """A SafeLoader held to :class:`InputLimits` that also reports keys repeated within one mapping (plain YAML
    keeps the last silently).

    The expanded size is counted as the document is composed: a new node counts 1, an alias the whole expanded
    size of its target.  So the count is exact and refused the moment it passes the budget, before anything is
    copied (SafeConstructor copies merge keys' pairs; pydantic and the line map walk each alias once per use).
    """

    # The Python composer (with the hooks below), fed by the event parser.
    get_single_node = yaml.composer.Composer.get_single_node
    get_node = yaml.composer.Composer.get_node
    check_node = yaml.composer.Composer.check_node

    def __init__(self, stream: str, limits: InputLimits):
        _EventParser.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self.limits = limits
        self.duplicates: list[tuple[str, int, int, int]] = []
        self._expanded = 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
        self._path: list[Any] = []  # keys (or indices) from the root to the node being composed

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        limits = self.limits
        mark = self.peek_event().start_mark
        key = index.value if isinstance(index, yaml.ScalarNode) else index
        depth = len(self._path) + 1
        if depth > limits.max_depth:
            raise _Refused(mark, f"nested too deeply: more than {limits.max_depth} levels (a storyboard needs 5)")
        if depth == 3 and self._path[1] == "shots" and isinstance(key, int) and key >= limits.max_shots:
            raise _Refused(
                mark,
                f"more than {limits.max_shots} shots, over the limit of {limits.max_shots}; split "
                "the film into several storyboards",
            )
        alias = self.check_event(yaml.AliasEvent)
        before = self._expanded
        if not alias:
            self._count(1, mark)
        self._path.append(key)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._path.pop()
        if alias:
            measured = self._measured.get(id(node))
            if measured is None:
                raise _Refused(mark, "an alias inside the very mapping or list it names (a recursive alias)")
            size, height = measured
            self._count(size, mark)
        else:
            size, height = self._expanded - before, self._height(node)
            self._measured[id(node)] = (size, height)
            if isinstance(node, yaml.ScalarNode) and node.tag in _NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
                raise _Refused(mark, f"a number of {len(node.value)} characters")
        # A merged mapping's pairs are spliced into the mapping that merges it: only that mapping's height (see
        # _height) says how deep they reach.
        merged = key == "<<" or (isinstance(key, int) and self._path[-1:] == ["<<"])
        if depth + height - 1 > limits.max_depth and not merged:
            raise _Refused(
                mark,
                f"nested too deeply: its YAML aliases reach more than {limits.max_depth} levels (a storyboard needs 5)",
            )
        return node

    def _count(self, nodes: int, mark: Any) -> None:
        self._expanded += nodes
        if self._expanded > self.limits.max_nodes:
            raise _Refused(
                mark,
                f"the storyboard expands to more than {self.limits.max_nodes} YAML nodes (its YAML aliases and "
                "merge keys count their target again at each use); write it out with fewer aliases",
            )

    def _height(self, node: yaml.Node) -> int:
        """Levels of ``node`` once aliases are expanded and merge keys applied."""
        if isinstance(node, yaml.SequenceNode):
            return 1 + max((self._measured[id(c)][1] for c in node.value), default=0)
        if not isinstance(node, yaml.MappingNode):
            return 1
        tallest = 0
        for key, value in node.value:
            if key.tag == _MERGE_TAG:  # the merged mappings' pairs become this mapping's own
                merged = value.value if isinstance(value, yaml.SequenceNode) else [value]
                tallest = max([tallest, *(self._measured[id(m)][1] - 1 for m in merged)])
            else:
                tallest = max(tallest, self._measured[id(key)][1], self._measured[id(value)][1])
        return 1 + tallest

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                if key.value in seen:
                    self.duplicates.append(
                        (key.value, seen[key.value], key.start_mark.line + 1, key.start_mark.column + 1)
                    )
                else:
                    seen[key.value] = key.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _node_lines(node: yaml.Node) -> _Node:
    out = _Node(node.start_mark.line + 1, node.start_mark.column + 1, node.end_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            out.keys[name] = (key.start_mark.line + 1, key.start_mark.column + 1)
            out.children[name] = _node_lines(value)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            out.children[i] = _node_lines(value)
    return out


def _position(lines: _Node | None, loc: tuple[Any, ...]) -> tuple[int | None, int | None]:
    """The deepest written position along ``loc``: a key's own line, else its enclosing mapping's."""
    if lines is None:
        return None, None
    node, pos = lines, (lines.line, lines.column)
    for part in loc:
        child = node.children.get(part)
        if child is None:
            break
        pos = node.keys.get(part, (child.line, child.column))
        node = child
    return pos


def _shot_at_line(lines: _Node | None, line: int) -> int | None:
    shots = lines.children.get("shots") if lines else None
    if shots is None or not shots.line <= line <= shots.end_line:
        return None
    starts = [(n.line, i) for i, n in shots.children.items() if n.line <= line]
    return max(starts)[1] if starts else None


def _raw_ids(data: Any) -> list[Any]:
    shots = data.get("shots") if isinstance(data, dict) else None
    return [s.get("id") if isinstance(s, dict) else None for s in shots] if isinstance(shots, list) else []


def _shot_label(index: int, ids: list[Any]) -> str:
    sid = ids[index] if index < len(ids) else None
    unique = isinstance(sid, str) and SHOT_ID.fullmatch(sid) and ids.count(sid) == 1
    return f"shot '{sid}'" if unique else f"shots[{index}]"


def _issue(
    source: str,
    lines: _Node | None,
    loc: tuple[Any, ...],
    message: str,
    ids: list[Any],
    *,
    line: int | None = None,
    column: int | None = None,
) -> Issue:
    if line is None:
        line, column = _position(lines, loc)
    shot, rest = None, loc
    if len(loc) >= 2 and loc[0] == "shots" and isinstance(loc[1], int):
        shot, rest = loc[1], loc[2:]
    name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest).lstrip(".") or None
    label = _shot_label(shot, ids) if shot is not None else None
    return Issue(source, line, column, label, name, message)


# -------------------------------------------------------------------------------------------- pydantic errors


def _field_names(model: type[BaseModel]) -> dict[str, Any]:
    return {(f.alias or name): f for name, f in model.model_fields.items()}


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            inner = _inner_model(arg)
            if inner is not None:
                return inner
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = Storyboard
    for part in loc:
        if isinstance(part, int):
            continue
        f = _field_names(model).get(part)
        inner = _inner_model(f.annotation) if f is not None else None
        if inner is None:
            break
        model = inner
    return model


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pydantic_message(err: Any) -> str:
    kind, loc, value = err["type"], err["loc"], err.get("input")
    if kind == "extra_forbidden":
        known = list(_field_names(_model_at(loc[:-1])))
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown field '{loc[-1]}' ({hint}known fields: {', '.join(known)})"
    if kind == "missing":
        if loc and loc[-1] == "prompt":
            return "required: a prompt, or a list of prompts (one per window)"
        return "required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "list_type" and loc and loc[-1] == "prompt":
        msg = "expected a prompt (a string) or a list of prompts"
    if kind.endswith("_type") or kind in (
        "greater_than_equal",
        "greater_than",
        "less_than",
        "less_than_equal",
        "too_short",
        "int_from_float",
        "literal_error",
    ):
        return f"{msg[0].lower()}{msg[1:]}, got {_describe(value)}"
    return msg


def _pydantic_issues(exc: ValidationError, data: Any, lines: _Node | None, source: str) -> list[Issue]:
    ids, issues, seen = _raw_ids(data), [], set()
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        issue = _issue(source, lines, loc, _pydantic_message(err), ids)
        if (issue.shot, issue.field) not in seen:  # a union reports each alternative; one line is enough
            seen.add((issue.shot, issue.field))
            issues.append(issue)
    return issues


# ----------------------------------------------------------------------------------------------------- resolve


def _resolve(sb: Storyboard, base_dir: Path) -> None:
    """Check what spans fields and shots, fill in seeds, absolute paths and frame counts; raise every problem."""
    issues: list[Issue] = []
    reported: set[tuple[Any, ...]] = set()
    ids = sb._shot_ids()

    def add(loc: tuple[Any, ...], message: str) -> None:
        if (loc, message) not in reported:
            reported.add((loc, message))
            issues.append(_issue(sb._source, sb._lines, loc, message, ids))

    def warn(loc: tuple[Any, ...], message: str) -> None:
        text = str(_issue(sb._source, sb._lines, loc, message, ids))
        if text not in sb._warnings:
            sb._warnings.append(text)

    if sb.model != "tiny":
        local = (base_dir / sb.model).expanduser()
        if local.exists():
            sb.model = str(local.resolve())
    if sb.enhancer is not None and sb.enhancer.model is not None:
        local = (base_dir / sb.enhancer.model).expanduser()
        if local.exists():
            sb.enhancer.model = str(local.resolve())

    first_use: dict[str, int] = {}
    for i, shot in enumerate(sb.shots):
        if not SHOT_ID.fullmatch(shot.id):
            add(
                ("shots", i, "id"),
                f"{shot.id!r} is not a valid id: use letters, digits, '_' and '-' only (it becomes a file name)",
            )
        elif shot.id in first_use:
            j = first_use[shot.id]
            line = _position(sb._lines, ("shots", j, "id"))[0]
            add(
                ("shots", i, "id"),
                f"duplicate id {shot.id!r}, already used by shots[{j}]"
                + (f" on line {line}" if line else "")
                + "; ids must be unique",
            )
        else:
            first_use[shot.id] = i

    for i, shot in enumerate(sb.shots):
        here = ("shots", i)
        if shot.seed is None:
            shot.seed = (sb.seed + i) % MAX_SEED
        _check_links(sb, i, first_use, add)
        _check_settings(sb, i, add, warn)
        _check_prompt_length(sb, i, warn)
        for name in ("image", "end_image", "video"):
            raw = getattr(shot, name)
            if raw is not None:
                path = _check_file(sb, i, name, base_dir, add)
                setattr(shot, name, str(path) if path else raw)
        _check_frames(sb, i, add)
        if shot.transition is not None:
            if shot.continues:
                add(
                    here + ("transition",),
                    "a transition is only allowed on a cut; this shot continues "
                    f"{shot.continue_from or 'the previous shot'!r} (remove 'transition', or "
                    "make the shot a cut)",
                )
            elif shot._frames and shot.transition.fade > shot._frames / sb.fps:
                add(
                    here + ("transition", "fade"),
                    f"a fade of {shot.transition.fade} s is longer than the shot ({shot._frames / sb.fps:.3g} s)",
                )
    _check_cycles(sb, add)
    if issues:
        raise StoryboardError(issues)
    sb._resolved = True


def _check_links(sb: Storyboard, i: int, first_use: dict[str, int], add: Any) -> None:
    shot, here = sb.shots[i], ("shots", i)
    if shot.continue_ and shot.continue_from is not None:
        add(
            here + ("continue_from",),
            "use either 'continue: true' (the previous shot) or 'continue_from: <id>', not both",
        )
    elif shot.continue_ and i == 0:
        add(
            here + ("continue",),
            "the first shot has no previous shot to continue; remove 'continue' or name a shot with 'continue_from'",
        )
    elif shot.continue_from is not None:
        if shot.continue_from == shot.id:
            add(here + ("continue_from",), "a shot cannot continue itself; name another shot's id")
        elif shot.continue_from not in first_use:
            close = difflib.get_close_matches(shot.continue_from, list(first_use), n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            add(here + ("continue_from",), f"no shot has id {shot.continue_from!r} ({hint}ids: {', '.join(first_use)})")
    if shot.image is not None and shot.continues:
        add(
            here + ("image",),
            "a first-frame image cannot open a shot that continues another; drop 'image', or "
            "drop 'continue'/'continue_from' to start fresh from the image",
        )
    if shot.image is not None and shot.video is not None:
        add(here + ("image",), "a shot extends either a video or an image, not both; drop one")
    if shot.video is not None and shot.continues:
        add(
            here + ("video",),
            "a shot extends either a video or another shot, not both; drop 'video' or 'continue'/'continue_from'",
        )


def _check_settings(sb: Storyboard, i: int, add: Any, warn: Any) -> None:
    base = schedule.latent_frames(sb.setting(i, "base_num_frames"))
    overlap, block = sb.setting(i, "overlap_history"), sb.setting(i, "causal_block_size")
    # Blame the shot's own override if it has one, else the film default.
    locs = [sb.setting_loc(i, n) for n in ("overlap_history", "causal_block_size", "base_num_frames")]
    where = next((loc for loc in locs if loc[0] == "shots"), locs[0])
    try:
        handoff = schedule.prefix_latents(overlap, block)
    except ValueError as exc:
        add(where, str(exc))
    else:
        if handoff >= base:
            add(
                where,
                f"overlap_history {overlap} hands over {handoff} latents, which leaves no room in a window of "
                f"base_num_frames {sb.setting(i, 'base_num_frames')} ({base} latents); lower overlap_history "
                "or raise base_num_frames",
            )
    noise = sb.setting(i, "addnoise_condition")
    if noise > ADDNOISE_WARN:
        warn(
            sb.setting_loc(i, "addnoise_condition"),
            f"addnoise_condition {noise:g} is high (reference default 20, suggested <= 50): prefixes lose detail",
        )


def _check_prompt_length(sb: Storyboard, i: int, warn: Any) -> None:
    """Warn where the text encoder will cut a prompt: exactly for the built-in tiny model, whose tokenizer reads one
    token per character, and from a rough characters-per-token figure for the others (the real count is known
    only once the tokenizer is loaded; the worker logs it)."""
    shot = sb.shots[i]
    texts = [
        (("shots", i, "prompt", j) if len(shot.prompt) > 1 else ("shots", i, "prompt"), p)
        for j, p in enumerate(shot.prompt)
    ]
    texts.append((sb.setting_loc(i, "negative_prompt"), sb.setting(i, "negative_prompt")))
    for loc, text in texts:
        chars = len(" ".join(text.split()))  # the encoder collapses whitespace first
        if sb.model == "tiny":
            tokens = chars + 1  # one per character, and the end-of-text token
            if tokens > ENCODER_TOKENS:
                warn(
                    loc,
                    f"the prompt is {tokens} tokens; the text encoder reads the first {ENCODER_TOKENS} "
                    "and drops the rest",
                )
        elif chars > ENCODER_TOKENS * CHARS_PER_TOKEN:
            warn(
                loc,
                f"the prompt is {chars} characters, probably over the text encoder's {ENCODER_TOKENS} tokens "
                f"(about {ENCODER_TOKENS * CHARS_PER_TOKEN} characters of English): the rest would be dropped",
            )


def _check_file(sb: Storyboard, i: int, name: str, base_dir: Path, add: Any) -> Path | None:
    raw, loc = getattr(sb.shots[i], name), ("shots", i, name)
    path = Path(raw).expanduser()
    path = (path if path.is_absolute() else base_dir / path).resolve()
    if not path.is_file():
        add(loc, f"file not found: {raw!r} (looked for {path}; relative paths start at the storyboard's folder)")
        return None
    if name == "video":
        import imageio_ffmpeg

        try:
            count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
        except Exception as exc:  # ffmpeg's reasons are varied; the user needs only that it is not a clip
            add(loc, f"cannot read {raw!r} as a video ({exc.__class__.__name__}); give a clip ffmpeg can decode")
            return None
        if count < 1:
            add(loc, f"video {raw!r} has no frames")
            return None
        try:
            video_prefix_latents(count, sb.setting(i, "overlap_history"), sb.setting(i, "causal_block_size"))
        except ValueError as exc:
            add(loc, f"video {raw!r} has {count} frames, too few to extend: {exc}")
            return None
        sb.shots[i]._video_frames = count
        return path
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        add(loc, f"cannot read {raw!r} as an image ({exc.__class__.__name__}); give a PNG, JPEG or WebP file")
        return None
    return path


def _check_frames(sb: Storyboard, i: int, add: Any) -> None:
    shot, here = sb.shots[i], ("shots", i)
    min_frames = 5 if shot.image is not None else 1
    if shot.frames is not None and shot.duration is not None:
        add(here + ("duration",), f"give either 'frames' ({shot.frames}) or 'duration' ({shot.duration} s), not both")
        return
    if shot.frames is None and shot.duration is None:
        add(here + ("frames",), "missing: give 'frames' (a count) or 'duration' (seconds)")
        return
    if shot.duration is not None:
        shot._frames = snap_duration(shot.duration, sb.fps, shot.fresh, min_frames)
        return
    frames = shot.frames
    try:
        if shot.fresh:
            schedule.check_fresh_frames(frames)
        else:
            schedule.check_added_frames(frames)
    except ValueError as exc:
        why = "" if shot.fresh else " (count only the new frames: the overlap with what it continues is not repeated)"
        add(here + ("frames",), f"{frames} frames do not fit the frame grid: {exc}{why}")
        return
    if frames < min_frames:
        add(
            here + ("frames",),
            f"a shot that opens with an image needs at least {min_frames} frames "
            "(the image is frame 1; 4 more frames per latent)",
        )
        return
    shot._frames = frames


def _check_cycles(sb: Storyboard, add: Any) -> None:
    index = {s.id: i for i, s in enumerate(sb.shots)}
    parent = {i: i - 1 if s.continue_ and i else index.get(s.continue_from) for i, s in enumerate(sb.shots)}
    done: set[int] = set()
    for start in range(len(sb.shots)):
        path: list[int] = []
        node: int | None = start
        while node is not None and node not in done:
            if node in path:
                cycle = path[path.index(node) :]
                first = min(cycle)
                k = cycle.index(first)
                cycle = cycle[k:] + cycle[:k]
                names = " -> ".join(f"'{sb.shots[j].id}'" for j in [*cycle, first])
                key = "continue" if sb.shots[first].continue_ else "continue_from"
                add(
                    ("shots", first, key),
                    f"continuation cycle {names} (a -> b: a continues b); every shot needs "
                    "the final latents of the one it continues, so make one of them a cut",
                )
                break
            path.append(node)
            node = parent[node]
        done.update(path)
