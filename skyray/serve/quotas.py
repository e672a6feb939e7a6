"""Per-token limits: jobs waiting, jobs rendering, frames submitted in any 24 hours.

Each refusal is a 429 whose Retry-After says when the limit frees: for the frame budget exactly (when enough of
the token's submissions of the last day age out of the window), for waiting and running jobs an estimate (the
soonest ETA of the token's running jobs, else the recent mean job time).
"""

from __future__ import annotations

import math
import time

from skyray.serve.admission import Rejected
from skyray.serve.options import ServeOptions
from skyray.serve.store import QUEUED, RUNNING, JobStore
from skyray.serve.store.jobs import DAY_S

DEFAULT_JOB_S = 30.0


def frames_free_in(submitted: list[tuple[float, int]], frames: int, quota: int, now: float) -> float | None:
    """Seconds until ``frames`` more fit in ``quota`` per day, given the (time, frames) of the submissions of the
    last day, oldest first; 0 if they fit now, None if they never will (more than the whole quota)."""
    if frames > quota:
        return None
    used = sum(f for _, f in submitted)
    for ts, f in submitted:
        if used + frames <= quota:
            break
        used -= f
        wait = ts + DAY_S - now
        if used + frames <= quota:
            return max(0.0, wait)
    return 0.0


def check_quota(store: JobStore, owner: str, options: ServeOptions, frames: int = 0,
                now: float | None = None) -> None:
    """Raise ``Rejected(429)`` (or 422 for a job larger than the whole daily budget) when ``owner`` may not
    submit a job of ``frames`` frames now."""
    now = time.time() if now is None else now
    if options.quota_queued or options.quota_running:
        counts = store.counts(owner)
        if options.quota_queued and counts[QUEUED] >= options.quota_queued:
            wait = _job_wait(store, owner)
            raise _too_many(f"this token has {counts[QUEUED]} jobs waiting, its limit (quota_queued "
                            f"{options.quota_queued}); one frees when the next starts, in about {wait} s", wait)
        if options.quota_running and counts[RUNNING] >= options.quota_running:
            wait = _job_wait(store, owner)
            raise _too_many(f"this token has {counts[RUNNING]} jobs rendering, its limit (quota_running "
                            f"{options.quota_running}); the next to finish is due in about {wait} s", wait)
    quota = options.quota_frames_per_day
    if quota:
        submitted = store.frames_since(owner, now - DAY_S)
        free_in = frames_free_in(submitted, frames, quota, now)
        if free_in is None:
            raise Rejected(422, f"frames: this job renders {frames} frames, more than the whole daily budget of a "
                                f"token (quota_frames_per_day {quota})")
        if free_in > 0:
            used = sum(f for _, f in submitted)
            wait = max(1, math.ceil(free_in))
            raise _too_many(f"this token submitted {used} frames in the last 24 hours; {frames} more would pass its "
                            f"limit (quota_frames_per_day {quota}); they fit again in {wait} s", wait)


def _job_wait(store: JobStore, owner: str) -> int:
    etas = [e for e in store.running_etas(owner) if e is not None]
    if etas:
        return max(1, math.ceil(min(etas)))
    avg = store.recent_job_seconds()
    return int(min(3600, max(1, math.ceil(avg if avg is not None else DEFAULT_JOB_S))))


def _too_many(detail: str, retry_after: int) -> Rejected:
    return Rejected(429, detail, {"Retry-After": str(retry_after)})
