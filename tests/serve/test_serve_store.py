"""The job store's ownership rules, without Ray: attempts, cancels, restarts and recovery."""

from __future__ import annotations

import pytest

from skyray.serve.store import CANCELLED, DONE, FAILED, QUEUED, RUNNING, STALE, JobStore


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def add(store: JobStore, job_id: str, owner: str = "a") -> None:
    store.add(job_id, owner, "shot", "tiny", {"title": "t"}, f"shots/{job_id}.mp4")


def test_a_job_runs_once_per_attempt(store):
    add(store, "j1")
    assert store.queued()[0].id == "j1"
    attempt = store.claim("j1")
    assert attempt == 1 and store.claim("j1") is None  # claimed jobs are not handed out twice
    assert store.queued() == []
    assert store.start("j1", attempt) == RUNNING
    assert store.progress("j1", attempt, 1, 4, "j1", 3.0, ("window", {"window": 0}))
    assert store.finish("j1", attempt, DONE, None)
    job = store.get("j1")
    assert (job.status, job.windows_done, job.windows_total, job.eta) == (DONE, 4, 4, None)
    assert [e.type for e in store.events("j1")] == ["status", "status", "window", "status"]
    assert [e.data.get("status") for e in store.events("j1", after=3)] == [DONE]


def test_owner_scoping(store):
    add(store, "j1", owner="alice")
    assert store.get("j1", "alice") is not None
    assert store.get("j1", "bob") is None
    assert [j.id for j in store.list("alice")] == ["j1"] and store.list("bob") == []


def test_cancel_waiting_and_running(store):
    add(store, "waiting")
    assert store.request_cancel("waiting").status == CANCELLED  # nobody has it: cancelled at once
    add(store, "claimed")
    attempt = store.claim("claimed")
    assert store.request_cancel("claimed").status == QUEUED  # a renderer may be about to start it
    assert store.start("claimed", attempt) == CANCELLED
    add(store, "running")
    attempt = store.claim("running")
    store.start("running", attempt)
    assert not store.should_stop("running", attempt)
    store.request_cancel("running")
    assert store.should_stop("running", attempt)
    assert store.finish("running", attempt, CANCELLED, None)


def test_recover_hands_running_jobs_to_a_new_attempt(store):
    add(store, "j1")
    add(store, "j2")
    a1 = store.claim("j1")
    store.start("j1", a1)
    store.claim("j2")
    assert sorted(store.recover()) == ["j1", "j2"]
    assert {j.id for j in store.queued()} == {"j1", "j2"}
    a2 = store.claim("j1")
    assert a2 == a1 + 1
    assert store.should_stop("j1", a1)  # the old renderer, if still alive, stops at its next window
    assert store.start("j1", a1) == STALE
    assert store.start("j1", a2) == RUNNING
    assert not store.progress("j1", a1, 3, 4, None, None)  # writes of the old attempt are ignored
    assert not store.finish("j1", a1, FAILED, "old")
    assert store.finish("j1", a2, DONE, None)


def test_requeue_counts_only_crashes_while_rendering(store):
    add(store, "j1")
    attempt = store.claim("j1")
    assert store.requeue("j1", attempt, "no replica yet", max_restarts=1) == QUEUED  # never started: free
    assert store.get("j1").restarts == 0
    attempt = store.claim("j1")
    store.start("j1", attempt)
    assert store.requeue("j1", attempt, "stopped in order", max_restarts=None) == QUEUED
    assert store.get("j1").restarts == 0
    attempt = store.claim("j1")
    store.start("j1", attempt)
    assert store.requeue("j1", attempt, "crash 1", max_restarts=1) == QUEUED
    assert store.get("j1").restarts == 1
    attempt = store.claim("j1")
    store.start("j1", attempt)
    assert store.requeue("j1", attempt, "crash 2", max_restarts=1) == FAILED
    assert "crash 2" in store.get("j1").error
    assert store.requeue("j1", attempt, "late", max_restarts=1) is None


def test_queue_position_and_counts(store):
    for i in range(3):
        add(store, f"j{i}")
    assert [store.queue_position(store.get(f"j{i}")) for i in range(3)] == [0, 1, 2]
    store.request_cancel("j0")
    assert store.queue_position(store.get("j2")) == 1
    assert store.counts()[QUEUED] == 2 and store.counts()[CANCELLED] == 1


def test_two_connections_share_one_database(tmp_path):
    ingress, renderer = JobStore(tmp_path / "db.sqlite"), JobStore(tmp_path / "db.sqlite")
    add(ingress, "j1")
    attempt = ingress.claim("j1")
    assert renderer.start("j1", attempt) == RUNNING
    assert ingress.get("j1").status == RUNNING


def test_jobs_for_models_no_longer_served_fail(store):
    add(store, "j1")
    store.add("j2", "a", "shot", "Skywork/SkyReels-V2-DF-14B-720P-Diffusers", {"title": "t"}, "film.mp4")
    assert store.fail_unserved(("tiny",)) == ["j2"]
    assert store.get("j2").status == FAILED and "no longer served" in store.get("j2").error
    assert store.get("j1").status == QUEUED
