"""Settings of the Serve app: where jobs live, who may submit, what a request may ask for, how replicas scale.

Every field can be set from the environment as ``SKYRAY_<FIELD>`` (``SKYRAY_MAX_FRAMES=257``); lists are
comma-separated.  ``SKYRAY_API_TOKEN`` holds the bearer token(s).  The app refuses to start without a token
unless ``insecure_no_auth`` is set on purpose.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path


class OptionsError(ValueError):
    pass


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds (``skyray serve`` only; ``serve run`` takes its own)."""
    port: int = 8000
    models: tuple[str, ...] = ("tiny",)
    """Models served, one Renderer deployment each; the first is used when a request names none."""
    device: str | None = None
    """torch device of the renderers (default: cuda when available)."""
    data_dir: str = "skyray-data"
    """Job outputs go to ``<data_dir>/jobs/<id>/``; must be shared by the ingress and every renderer replica."""
    outputs: str | None = dataclasses.field(default=None, repr=False)
    """Where job files live (uploaded inputs, shots, films, manifests): a folder or a ``pyarrow.fs`` URI
    (``s3://KEY:SECRET@bucket/prefix?endpoint_override=...``) that the ingress and every renderer reach; default
    ``<data_dir>/jobs``.  Shown only with its credentials removed."""
    job_db: str | None = None
    """SQLite job database (default ``<data_dir>/jobs.sqlite``); for one node only, never on a network filesystem."""
    database_url: str | None = dataclasses.field(default=None, repr=False)
    """PostgreSQL job database (``postgresql://user:pass@host/db``), shared by every ingress replica and renderer;
    replaces ``job_db``.  Needs the ``postgres`` extra (psycopg)."""
    tokens: tuple[str, ...] = ()
    """Accepted bearer tokens (``SKYRAY_API_TOKEN``, comma-separated); only their SHA-256 reaches the replicas."""
    insecure_no_auth: bool = False
    """Accept requests without a token (every caller then sees every job)."""

    max_frames: int = 1457
    """Frames one job may render in total (60 s at 24 fps)."""
    max_pixels: int = 1280 * 720
    """Largest width x height of a frame."""
    max_side: int = 1280
    """Largest width or height."""
    max_steps: int = 100
    """Denoising steps (and ar_step) a shot may ask for."""
    max_shots: int = 64
    max_prompt_chars: int = 4000
    """Characters of one prompt (the text encoder reads 512 tokens, about 2000 characters of English)."""
    max_body_bytes: int = 24 << 20
    """Request body cap (two base64 images of max_image_bytes fit)."""
    max_image_bytes: int = 8 << 20
    max_image_pixels: int = 4096 * 4096
    """Decoded size cap of an uploaded image (guards against decompression bombs)."""
    max_queue: int = 64
    """Jobs that may wait; beyond that a submission gets 429 with Retry-After."""
    max_restarts: int = 3
    """Renderer deaths one job survives before it is marked failed."""
    job_ttl_s: float = 7 * 86400.0
    """Finished jobs (done, failed, cancelled) are deleted, files and record, this long after they end (0: kept)."""
    quota_queued: int = 0
    """Jobs one token may have waiting (0: no limit beyond max_queue)."""
    quota_running: int = 0
    """Jobs of one token rendering at once; more wait in the queue, and a submission past it gets 429 (0: none)."""
    quota_frames_per_day: int = 0
    """Frames one token may submit in any 24 hours (0: no limit)."""

    ingress_replicas: int = 1
    """Ingress replicas (API + dispatcher); more than one needs a database_url, or all on one node with SQLite."""
    dispatcher_lease_s: float = 10.0
    """A dispatcher silent this long is presumed dead: another replica queues the jobs it was watching again."""

    min_replicas: int = 1
    max_replicas: int = 1
    """Renderer replicas per model (autoscaled on queue depth between min and max)."""
    gpus_per_replica: int = 1
    """GPUs in one renderer's placement group (STRICT_PACK on one node); 0 reserves CPU bundles only."""
    cpus_per_replica: float = 1.0
    """CPUs in each bundle of a renderer's placement group."""
    emulated_ranks: int = 0
    """With ``gpus_per_replica`` 0: CPU-emulated ranks per renderer (>= 2 runs the group path on CPUs, for tests)."""
    graceful_shutdown_s: float = 60.0
    """How long a renderer being stopped may finish its job before it is killed (the job resumes either way)."""
    preview_size: int = 256
    """Longest side of the per-window JPEG preview (0: no previews)."""

    def __post_init__(self) -> None:
        if not self.models:
            raise OptionsError("serve at least one model")
        ints = ("max_frames", "max_pixels", "max_side", "max_steps", "max_shots", "max_prompt_chars", "max_body_bytes",
                "max_image_bytes", "max_image_pixels", "max_queue", "max_replicas", "ingress_replicas")
        for name in ints:
            if getattr(self, name) < 1:
                raise OptionsError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise OptionsError(f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        for name in ("quota_queued", "quota_running", "quota_frames_per_day", "job_ttl_s"):
            if getattr(self, name) < 0:
                raise OptionsError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if self.dispatcher_lease_s <= 0:
            raise OptionsError(f"dispatcher_lease_s must be > 0, got {self.dispatcher_lease_s}")
        if self.database_url is not None and not self.database_url.startswith(("postgresql://", "postgres://",
                                                                                 "postgresql+psycopg://")):
            raise OptionsError("database_url must be a postgresql:// DSN (SQLite is job_db)")
        if self.emulated_ranks and self.gpus_per_replica:
            raise OptionsError("emulated_ranks is for CPU-only renderers (gpus_per_replica 0)")
        if self.gpus_per_replica < 0 or self.cpus_per_replica <= 0 or self.preview_size < 0 or self.max_restarts < 0:
            raise OptionsError("gpus_per_replica, max_restarts and preview_size must be >= 0, cpus_per_replica > 0")

    @property
    def ranks_per_replica(self) -> int:
        """Ranks of one renderer's group: its GPUs, or its emulated CPU ranks; 1 means the replica renders itself."""
        return self.gpus_per_replica or self.emulated_ranks or 1

    @property
    def default_model(self) -> str:
        return self.models[0]

    @property
    def jobs_dir(self) -> Path:
        return Path(self.data_dir).expanduser().resolve() / "jobs"

    @property
    def outputs_target(self) -> str:
        """The location of job folders: ``outputs`` (a URI as given, a folder made absolute) or ``jobs_dir``."""
        if not self.outputs:
            return str(self.jobs_dir)
        return self.outputs if "://" in self.outputs else str(Path(self.outputs).expanduser().resolve())

    @property
    def db_path(self) -> Path:
        return Path(self.job_db).expanduser().resolve() if self.job_db else self.jobs_dir.parent / "jobs.sqlite"

    @property
    def store_target(self) -> str:
        """What ``JobStore`` opens: the PostgreSQL DSN, else the SQLite file."""
        return self.database_url or str(self.db_path)

    @property
    def ttl_s(self) -> float | None:
        return self.job_ttl_s or None

    @property
    def token_hashes(self) -> tuple[str, ...]:
        return tuple(token_hash(t) for t in self.tokens)

    def check_auth(self) -> None:
        """Refuse to run open to anyone by accident."""
        if not self.tokens and not self.insecure_no_auth:
            raise OptionsError(
                "refusing to start without an API token: set SKYRAY_API_TOKEN (one or more comma-separated "
                "tokens), or pass --insecure-no-auth (SKYRAY_INSECURE_NO_AUTH=1) to accept anyone"
            )
        for t in self.tokens:
            if len(t) < 16 or not re.fullmatch(r"[\x21-\x7e]+", t):
                raise OptionsError("API tokens must be at least 16 printable characters without spaces")

    def for_replicas(self) -> ServeOptions:
        """These options with tokens removed (replicas get ``token_hashes``) and paths made absolute."""
        return dataclasses.replace(self, tokens=(), data_dir=str(self.jobs_dir.parent), job_db=str(self.db_path),
                                   outputs=self.outputs_target)

    @classmethod
    def from_env(cls, environ: typing.Mapping[str, str] | None = None, **overrides) -> ServeOptions:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            raw = env.get(f"SKYRAY_{f.name.upper()}")
            if f.name == "tokens":
                raw = env.get("SKYRAY_API_TOKEN")
            elif f.name == "models" and raw is None:
                raw = env.get("SKYRAY_MODEL")
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, hints[f.name], raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _parse(name: str, hint: object, raw: str) -> object:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is tuple:
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    target = args[0] if origin is not None and args else hint
    try:
        if target is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if target is int:
            return int(raw)
        if target is float:
            return float(raw)
    except ValueError:
        raise OptionsError(f"SKYRAY_{name.upper()}={raw!r} is not a valid {getattr(target, '__name__', target)}") from None
    return raw


