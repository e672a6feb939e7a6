"""What the HTTP API accepts and returns (pydantic models; FastAPI turns them into ``/openapi.json``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


class ShotRequest(BaseModel):
    """One shot, rendered as a one-shot film (or, with ``continue_from``, as the next shot of an earlier job)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str] = Field(description="A prompt, or one per window (prompt travel).")
    frames: int | None = Field(None, ge=1, le=1_000_000, description="4k+1 for a fresh shot, a multiple of 4 "
                               "for a continuation; or give duration.")
    duration: float | None = Field(None, gt=0, le=86_400, description="Seconds instead of frames.")
    resolution: str | None = Field(None, max_length=32, description="'540p', '720p' or 'WxH' (multiples of 16).")
    fps: int | None = Field(None, ge=1, le=240)
    seed: int | None = Field(None, ge=0, lt=2**63)
    model: str | None = Field(None, max_length=512, description="One of the served models (default: the first).")
    title: str | None = Field(None, max_length=200)

    steps: int | None = Field(None, ge=1, le=10_000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    shift: float | None = Field(None, gt=0, le=100)
    base_num_frames: int | None = Field(None, ge=5, le=100_000)
    overlap_history: int | None = Field(None, ge=1, le=100_000)
    addnoise_condition: float | None = Field(None, ge=0, le=1000)
    ar_step: int | None = Field(None, ge=0, le=1000)
    causal_block_size: int | None = Field(None, ge=1, le=1000)
    negative_prompt: str | None = Field(None, max_length=10_000)
    causal_attention: bool | None = Field(None, description="Block-causal attention (the released weights lack it).")
    cfg_batch: bool | None = Field(None, description="Conditional and unconditional passes in one batch-2 forward.")
    teacache: dict[str, float] | None = Field(None, description="{'threshold': t}: skip forwards whose input "
                                              "changed little (0: off).")
    enhance: bool | None = Field(None, description="Rewrite the prompt with the server's prompt enhancer first.")

    image: str | None = Field(None, description="First frame: base64 (or a data: URI) of a PNG, JPEG or WebP.")
    end_image: str | None = Field(None, description="Last frame to arrive at: base64 PNG, JPEG or WebP.")
    continue_from: str | None = Field(None, pattern=JOB_ID_PATTERN,
                                      description="A finished job of yours: this shot continues its last shot.")


SAMPLING_FIELDS = ("steps", "guidance_scale", "shift", "base_num_frames", "overlap_history", "addnoise_condition",
                   "ar_step", "causal_block_size", "negative_prompt", "causal_attention", "cfg_batch", "teacache", "enhance")


class JobAccepted(BaseModel):
    id: str
    status: JobStatus


class Progress(BaseModel):
    windows_done: int
    windows_total: int
    shot: str | None = None
    fraction: float


class JobView(BaseModel):
    id: str
    kind: Literal["shot", "film"]
    model: str
    status: JobStatus
    created: float
    started: float | None = None
    finished: float | None = None
    progress: Progress
    eta_seconds: float | None = Field(None, description="Estimated seconds left (from this run's window times).")
    queue_position: int | None = Field(None, description="Queued jobs ahead of this one.")
    cancel_requested: bool = False
    restarts: int = 0
    error: str | None = None
    parent: str | None = None
    video_url: str | None = None
    manifest_url: str | None = None
    expires_at: float | None = Field(None, description="When a finished job's files and record are deleted.")


class JobList(BaseModel):
    jobs: list[JobView]


class Problem(BaseModel):
    detail: str | list


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    queued: int
    running: int
    dispatcher: bool
