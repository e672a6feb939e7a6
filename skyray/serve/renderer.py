"""The renderer: one Serve replica = one GPU group holding one warm model, rendering one job at a time.

A job renders through the same path as ``skyray render``: ``storyboard_from_data`` -> ``compile_plan`` ->
``render_film`` into ``<outputs>/<id>/`` (a folder or an object-store URI).  Progress goes straight into the job store (window i of n, ETA,
a preview per window); ``should_stop`` reads the store, so a cancel or a newer attempt stops the render at the
next window boundary.  Because ``render_film`` keeps finished shots and per-window checkpoints, running a job
again in the same folder (after a replica or ingress restart) resumes it from its last finished window.

Preview frames: the last latent of each finished window decoded on its own by the replica's VAE (one frame, no
causal context, so colours can differ slightly from the final clip), as a small JPEG.  Decoding one latent is
cheap next to a window's sampling.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import serve

from skyray.serve.files import JobFiles
from skyray.serve.options import ServeOptions
from skyray.serve.store import CANCELLED, DONE, FAILED, INTERRUPTED, RUNNING, STALE, JobStore
from skyray.session import RenderSession, SessionConfig

log = logging.getLogger("skyray.serve")
WINDOW_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640]


def replica_session(model: str, ranks: int, use_gpu: bool, device: str | None) -> RenderSession:
    """A replica's render session: in-process for one GPU; for a group of several, rank actors in the replica's
    own placement group (one per bundle) split every forward (CFG and/or Ulysses)."""
    if ranks <= 1:
        return RenderSession(SessionConfig(model, executor="local", device=device, progress=False))
    from ray.util import get_current_placement_group

    from skyray.engine.parallel import ParallelConfig
    from skyray.models import family_of

    layout = ParallelConfig.auto(ranks, family_of(model).heads, guidance=True)
    return RenderSession(SessionConfig(model, executor="ray", groups=1, gpus_per_group=ranks, layout=layout,
                                       writers=1, progress=False, use_gpu=use_gpu,
                                       placement_group=get_current_placement_group()))


class JobProgress:
    """Window i of n across a film, and an ETA from this run's window times."""

    def __init__(self, plan) -> None:
        self.windows = {s.id: len(s.windows) for s in plan.shots}
        self.done: dict[str, int] = dict.fromkeys(self.windows, 0)
        self.seconds: list[float] = []
        self.shot: str | None = None

    @property
    def total(self) -> int:
        return sum(self.windows.values())

    @property
    def finished(self) -> int:
        return sum(self.done.values())

    def eta(self) -> float | None:
        if not self.seconds:
            return None
        recent = self.seconds[-8:]
        return round(sum(recent) / len(recent) * (self.total - self.finished), 2)

    def update(self, event: dict) -> None:
        kind = event["type"]
        if kind == "plan":
            for sid in event["reused"]:
                self.done[sid] = self.windows[sid]
        elif kind == "shot_start":
            self.shot = event["shot"]
        elif kind == "window":
            self.done[event["shot"]] = max(self.done[event["shot"]], event["window"] + 1)
            self.seconds.append(float(event["seconds"]))
        elif kind == "shot_done":
            self.done[event["shot"]] = self.windows[event["shot"]]


def run_job(store: JobStore, job_id: str, attempt: int, session: RenderSession, jobs_dir: Path | str | JobFiles,
            preview_size: int = 256, metrics: dict[str, Any] | None = None,
            stopping: Callable[[], bool] = lambda: False) -> str:
    """Render one attempt of a job; returns its final status ('done', 'failed', 'cancelled'), 'stale' (a newer
    attempt owns the job) or 'interrupted' (``stopping()``: this replica is shutting down; the job stays running
    until the dispatcher, or a restarted ingress, queues it again).  ``jobs_dir``: where job folders live (a
    folder, a URI, or the app's ``JobFiles``)."""
    from skyray.plan import compile_plan
    from skyray.storyboard import storyboard_from_data

    job = store.get(job_id)
    if job is None:
        return STALE
    started = store.start(job_id, attempt)
    if started != RUNNING:
        return started
    files = jobs_dir if isinstance(jobs_dir, JobFiles) else JobFiles(jobs_dir)
    out = files.job_target(job_id)
    with contextlib.ExitStack() as cleanup:
        if files.remote:
            # The storyboard checks its input files as local paths, and the render reads their bytes from there.
            inputs = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix=f"skyray-{job_id}-")))
        else:
            inputs = Path(out) / "inputs"
        try:
            if files.remote:
                files.fetch(job_id, "inputs", inputs)
            sb = storyboard_from_data(job.storyboard, inputs, f"job {job_id}")
            plan = compile_plan(sb)
        except Exception as exc:  # the store outlived the inputs, or a new version validates differently
            store.finish(job_id, attempt, FAILED, f"cannot plan the job: {exc}")
            return FAILED
        return _render_job(store, job, attempt, session, out, sb, plan, preview_size, metrics, stopping)


def _render_job(store: JobStore, job, attempt: int, session: RenderSession, out, sb, plan, preview_size: int,
                metrics: dict[str, Any] | None, stopping: Callable[[], bool]) -> str:
    from skyray.render import RenderCancelled

    job_id = job.id
    try:
        # Shots asking for it get their prompts rewritten first, by an enhancer actor of its own (cached).
        sb, plan = session.prepare(sb, plan)
    except Exception as exc:
        store.finish(job_id, attempt, FAILED, f"prompt enhancer: {exc}")
        return FAILED
    progress = JobProgress(plan)
    store.progress(job_id, attempt, 0, progress.total, None, None)

    def on_event(event: dict) -> None:
        progress.update(event)
        kind = event["type"]
        data: dict[str, Any] | None = None
        if kind == "window":
            data = {"shot": event["shot"], "window": event["window"], "windows": event["windows"],
                    "seconds": round(float(event["seconds"]), 3)}
            if metrics:
                metrics["window_seconds"].observe(float(event["seconds"]))
            try:
                jpeg = session.preview(preview_size)
            except Exception:  # a preview is a nicety; never fail a render for it
                log.exception("preview failed for job %s", job_id)
                jpeg = None
            if jpeg:
                data["preview"] = {"format": "jpeg", "base64": jpeg}
        elif kind == "shot_start":
            data = {"shot": event["shot"], "windows": event["windows"]}
        elif kind == "shot_done":
            data = {"shot": event["shot"], "frames": event["frames"]}
        elif kind == "retry":
            data = {"shot": event["shot"], "window": event["window"], "error": event["error"]}
        elif kind == "plan":
            data = {"shots": event["shots"], "windows": event["windows"], "reused": event["reused"]}
        if data is not None:
            data.update(windows_done=progress.finished, windows_total=progress.total)
        store.progress(job_id, attempt, progress.finished, progress.total, progress.shot, progress.eta(),
                       (kind, data) if data is not None else None)

    t0 = time.perf_counter()
    try:
        # Every shot keeps its decode history: a later job may continue any of them exactly.
        session.render(plan, out, on_event=on_event, keep_history=True,
                       should_stop=lambda: stopping() or store.should_stop(job_id, attempt))
    except RenderCancelled:
        if stopping():
            return INTERRUPTED
        now = store.get(job_id)
        if now is None or now.attempt != attempt or not now.cancel_requested:
            return STALE  # handed back to the queue (a restarted ingress) or to a newer attempt: not cancelled
        status, error = CANCELLED, None
    except Exception as exc:
        if stopping():  # a replica being stopped loses its ffmpeg children first: not the job's fault
            log.warning("job %s interrupted by shutdown: %s", job_id, exc)
            return INTERRUPTED
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        status, error = FAILED, f"{exc.__class__.__name__}: {exc}"
    else:
        status, error = DONE, None
    log.info("job %s attempt %d: %s in %.1f s", job_id, attempt, status, time.perf_counter() - t0)
    if not store.finish(job_id, attempt, status, error):
        return STALE
    if metrics:
        metrics["jobs_finished"].inc(tags={"status": status})
    return status


@serve.deployment(name="Renderer", max_ongoing_requests=1)
class Renderer:
    """A model replica; the ingress's dispatcher calls ``render(job_id, attempt)`` once per job."""

    def __init__(self, options: ServeOptions, model: str) -> None:
        from ray.util import metrics

        self.options = options
        if options.ranks_per_replica == 1 and options.gpus_per_replica and options.device is None:
            import torch

            if not torch.cuda.is_available():
                # Serve gives the replica a GPU only through ray_actor_options.num_gpus; a config that overrides
                # those options without it would otherwise render on the CPU, thousands of times slower.
                raise RuntimeError(
                    "this Renderer replica sees no GPU although gpus_per_replica="
                    f"{options.gpus_per_replica}: give the deployment ray_actor_options num_gpus: 1 "
                    "(a one-GPU replica renders on its own GPU), or set SKYRAY_GPUS_PER_REPLICA=0 to render on CPU")
        self.store = JobStore(options.store_target, ttl_s=options.ttl_s)
        self.files = JobFiles(options.outputs_target)
        self._stopping = threading.Event()
        # Loaded once, reused by every job.
        self.session = replica_session(model, options.ranks_per_replica, options.gpus_per_replica > 0, options.device)
        self.session.executor  # noqa: B018 - load the model now, not on the first job
        tags = {"model": model}
        self.metrics = {
            "window_seconds": metrics.Histogram(
                "skyray_window_seconds", "Seconds to sample one window", boundaries=WINDOW_BUCKETS,
                tag_keys=("model",)),
            "jobs_finished": metrics.Counter(
                "skyray_jobs_finished", "Jobs finished, by final status", tag_keys=("model", "status")),
        }
        for m in self.metrics.values():
            m.set_default_tags(tags)

    def render(self, job_id: str, attempt: int) -> str:
        return run_job(self.store, job_id, attempt, self.session, self.files, self.options.preview_size,
                       self.metrics, self._stopping.is_set)

    def __del__(self) -> None:
        # Serve calls this when the replica is being stopped, after the grace period for the running job: stop
        # it at the next window boundary, leaving its checkpoints for whichever replica picks it up again.
        self._stopping.set()
