"""One renderer replica's job loop without Ray: the tiny model, a real store, real renders and clips.

The store is the only channel between ingress and renderer, so each scenario drives it the way the other side
would: a cancel, an ingress restart that hands the job back to the queue, a replica being stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_helpers import SMALL

from skyray.output.encode import probe
from skyray.serve.admission import admit_shot
from skyray.serve.options import ServeOptions
from skyray.serve.renderer import replica_session, run_job
from skyray.serve.schema import ShotRequest
from skyray.serve.store import CANCELLED, DONE, INTERRUPTED, QUEUED, RUNNING, STALE, JobStore


@pytest.fixture(scope="module")
def executor():
    return replica_session("tiny", 1, False, "cpu")


class HookedStore(JobStore):
    """A real store that runs ``hook(job_id)`` after the first window's progress is written."""

    hook = None

    def progress(self, job_id, attempt, windows_done, windows_total, shot, eta, event=None):
        ok = super().progress(job_id, attempt, windows_done, windows_total, shot, eta, event)
        if event is not None and event[0] == "window" and self.hook is not None:
            hook, self.hook = self.hook, None
            hook(job_id)
        return ok


@pytest.fixture
def setup(tmp_path):
    options = ServeOptions(data_dir=str(tmp_path), tokens=("x" * 20,))
    store = HookedStore(options.db_path)
    yield options, store
    store.close()


def queue_shot(options: ServeOptions, store: JobStore, job_id: str, frames: int, steps: int = 2) -> int:
    req = ShotRequest(prompt="a quiet bay", frames=frames, **{**SMALL, "steps": steps})
    admitted = admit_shot(req, job_id, options.jobs_dir / job_id, options, None)
    store.add(job_id, "owner", "shot", "tiny", admitted.storyboard, admitted.video)
    return store.claim(job_id)


def leftovers(options: ServeOptions, job_id: str) -> list[Path]:
    return [p for p in (options.jobs_dir / job_id).rglob("*.part")]


def test_a_job_renders_with_progress_and_previews(executor, setup):
    options, store = setup
    attempt = queue_shot(options, store, "a" * 32, frames=25)
    assert run_job(store, "a" * 32, attempt, executor, options.jobs_dir, preview_size=32) == DONE
    job = store.get("a" * 32)
    assert (job.status, job.windows_done, job.windows_total) == (DONE, 2, 2)
    windows = [e.data for e in store.events(job.id) if e.type == "window"]
    assert [w["windows_done"] for w in windows] == [1, 2] and all("preview" in w for w in windows)
    assert probe(options.jobs_dir / job.id / job.video).frames == 25


def test_cancel_stops_at_a_window_and_closes_the_clip(executor, setup):
    options, store = setup
    job_id = "b" * 32
    attempt = queue_shot(options, store, job_id, frames=49)
    store.hook = store.request_cancel
    assert run_job(store, job_id, attempt, executor, options.jobs_dir) == CANCELLED
    job = store.get(job_id)
    assert job.status == CANCELLED and job.windows_done == 1
    assert not leftovers(options, job_id)  # the half-written clip and its ffmpeg are gone
    assert not (options.jobs_dir / job_id / job.video).exists()


def test_a_job_handed_back_by_a_restarted_ingress_is_not_cancelled_and_resumes(executor, setup):
    options, store = setup
    job_id = "c" * 32
    first = queue_shot(options, store, job_id, frames=49)
    store.hook = lambda _: store.recover()  # what a restarted ingress does with a job it finds running
    assert run_job(store, job_id, first, executor, options.jobs_dir) == STALE
    assert store.get(job_id).status == QUEUED
    second = store.claim(job_id)
    assert run_job(store, job_id, second, executor, options.jobs_dir) == DONE
    manifest = json.loads((options.jobs_dir / job_id / "manifest.json").read_text())
    resumed = [w.get("resumed", False) for w in manifest["shots"][0]["windows"]]
    assert resumed[:1] == [True] and not any(resumed[2:])  # the first window came from its checkpoint
    assert probe(options.jobs_dir / job_id / store.get(job_id).video).frames == 49


def test_a_stopping_replica_leaves_the_job_to_be_requeued(executor, setup):
    options, store = setup
    job_id = "d" * 32
    attempt = queue_shot(options, store, job_id, frames=49)
    stop = []
    store.hook = lambda _: stop.append(True)
    assert run_job(store, job_id, attempt, executor, options.jobs_dir, stopping=lambda: bool(stop)) == INTERRUPTED
    assert store.get(job_id).status == RUNNING  # nothing recorded: whoever notices re-queues it
    assert store.requeue(job_id, attempt, "renderer stopped", max_restarts=None) == QUEUED
    assert store.get(job_id).restarts == 0
    assert not leftovers(options, job_id)
