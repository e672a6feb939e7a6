"""The job store's ownership rules, without Ray, on SQLite and on a real PostgreSQL server (every test runs on
both): attempts, cancels, restarts, orphaned claims, retention and concurrent claimers."""

from __future__ import annotations

import threading
import time

import pytest

from skyray.serve.store import CANCELLED, DONE, FAILED, QUEUED, RUNNING, STALE, VERSION, JobStore


@pytest.fixture
def store(job_db):
    s = JobStore(job_db)
    yield s
    s.close()


def add(store: JobStore, job_id: str, owner: str = "a", frames: int = 9) -> None:
    store.add(job_id, owner, "shot", "tiny", {"title": "t"}, f"shots/{job_id}.mp4", frames=frames)


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
    assert [e.data.get("status") for e in store.events("j1", after=store.events("j1")[2].seq)] == [DONE]


def test_owner_scoping(store):
    add(store, "j1", owner="alice")
    assert store.get("j1", "alice") is not None
    assert store.get("j1", "bob") is None
    assert [j.id for j in store.list("alice")] == ["j1"] and store.list("bob") == []
    assert store.counts("alice")[QUEUED] == 1 and store.counts("bob")[QUEUED] == 0


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


def test_only_the_jobs_of_a_silent_dispatcher_are_released(store):
    for j in ("mine", "theirs", "unnamed"):
        add(store, j)
    store.heartbeat("live")
    store.heartbeat("dead")
    store.claim("mine", dispatcher="live")
    a = store.claim("theirs", dispatcher="dead")
    store.start("theirs", a)
    store.claim("unnamed")  # claimed by a dispatcher of the schema before names (or a test): an orphan at once
    time.sleep(0.3)
    store.heartbeat("live")
    assert sorted(store.release_orphans(lease_s=0.2)) == ["theirs", "unnamed"]
    assert store.get("mine").dispatched and store.get("mine").dispatcher == "live"
    assert store.get("theirs").status == QUEUED and store.should_stop("theirs", a)
    assert store.events("theirs")[-1].data == {"status": QUEUED, "requeued": "its ingress replica stopped"}
    assert store.claim("theirs", dispatcher="live") == a + 1
    assert store.release_orphans(lease_s=10) == []
    store.retire("live")
    assert sorted(store.release_orphans(lease_s=10)) == ["mine", "theirs"]


def test_claims_respect_slots_and_owner_limits(store):
    for i in range(3):
        add(store, f"a{i}", owner="alice")
    add(store, "b0", owner="bob")
    assert store.claim("a0", slots=2, owner_limit=1) == 1
    assert store.claim("a1", slots=2, owner_limit=1) is None  # alice already has one claimed
    assert store.claim("b0", slots=2, owner_limit=1) == 1
    assert store.claim("a2", slots=2) is None  # both slots of the model taken
    store.finish("a0", 1, DONE, None)
    assert store.claim("a1", slots=2, owner_limit=1) == 1


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


def test_two_connections_share_one_database(job_db):
    ingress, renderer = JobStore(job_db), JobStore(job_db)
    add(ingress, "j1")
    attempt = ingress.claim("j1")
    assert renderer.start("j1", attempt) == RUNNING
    assert ingress.get("j1").status == RUNNING
    ingress.close()
    renderer.close()


def test_jobs_for_models_no_longer_served_fail(store):
    add(store, "j1")
    store.add("j2", "a", "shot", "Skywork/SkyReels-V2-DF-14B-720P-Diffusers", {"title": "t"}, "film.mp4")
    assert store.fail_unserved(("tiny",)) == ["j2"]
    assert store.get("j2").status == FAILED and "no longer served" in store.get("j2").error
    assert store.get("j1").status == QUEUED


def test_finished_jobs_expire_rows_and_events_with_a_tombstone(job_db):
    store = JobStore(job_db, ttl_s=0.5)
    add(store, "old", owner="alice")
    add(store, "busy", owner="alice")
    a = store.claim("old")
    store.start("old", a)
    store.finish("old", a, DONE, None)
    store.claim("busy")
    job = store.get("old")
    assert job.expires_at == pytest.approx(job.finished + 0.5)
    assert store.expire() == [] and store.expired_at("old") is None
    time.sleep(0.6)
    assert store.get("old") is None  # past its time it is gone to readers, before the sweep deletes it
    assert store.expired_at("old", "alice") == pytest.approx(job.expires_at)
    assert store.expired_at("old", "bob") is None  # another owner's expired job stays a plain 404
    due = store.expire()
    assert [j.id for j in due] == ["old"]  # a running job never expires
    store.purge(due)
    assert store.events("old") == [] and store.expire() == []
    assert store.expired_at("old", "alice") == pytest.approx(job.expires_at)
    assert [(f) for _, f in store.frames_since("alice", time.time() - 60)] == [9, 9]  # usage outlives the row
    store.close()


def test_jobs_finished_before_retention_get_an_expiry(job_db):
    store = JobStore(job_db)
    add(store, "j1")
    store.request_cancel("j1")
    assert store.get("j1").expires_at is None
    store.close()
    store = JobStore(job_db, ttl_s=0.0)
    assert [j.id for j in store.expire()] == ["j1"]
    store.close()


def test_many_claimers_claim_each_job_once(job_db):
    """Eight replicas' worth of claimers (own connections) race over 150 jobs: each is claimed exactly once."""
    setup = JobStore(job_db)
    ids = [f"job{i:03d}" for i in range(150)]
    for j in ids:
        add(setup, j)
    claims: list[tuple[str, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def claimer(n: int) -> None:
        s = JobStore(job_db)
        try:
            barrier.wait()
            while batch := s.queued(limit=20):
                for job in reversed(batch) if n % 2 else batch:
                    attempt = s.claim(job.id, dispatcher=f"d{n}")
                    if attempt is not None:
                        with lock:
                            claims.append((job.id, n))
        except BaseException as exc:
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    claimed = [j for j, _ in claims]
    assert sorted(claimed) == ids  # every job once, none twice
    assert len({n for _, n in claims}) > 1  # the claimers really raced
    assert all(setup.get(j).attempt == 1 for j in ids)
    setup.close()


# The schema of the first release (skyray/serve/store.py before versions), written here the way that code wrote
# it, so the migration is tested against a real old file rather than against this code's idea of one.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, kind TEXT NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL,
    storyboard TEXT NOT NULL, video TEXT NOT NULL, parent TEXT, created REAL NOT NULL, started REAL,
    finished REAL, attempt INTEGER NOT NULL DEFAULT 0, dispatched INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
    windows_done INTEGER NOT NULL DEFAULT 0, windows_total INTEGER NOT NULL DEFAULT 0, shot TEXT, eta REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job, seq);
"""


def test_a_first_release_sqlite_file_migrates_without_losing_jobs(tmp_path):
    import json
    import sqlite3

    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(V1_SCHEMA)
    rows = [("done1", DONE, 0, 1, 100.0, 160.0), ("running1", RUNNING, 1, 2, 110.0, None),
            ("queued1", QUEUED, 0, 0, 120.0, None)]
    for job_id, status, dispatched, attempt, created, finished in rows:
        old.execute("INSERT INTO jobs (id, owner, kind, model, status, storyboard, video, created, finished, "
                    "attempt, dispatched, windows_done, windows_total) VALUES (?, 'alice', 'shot', 'tiny', ?, ?, "
                    "'shots/x.mp4', ?, ?, ?, ?, 2, 4)",
                    (job_id, status, json.dumps({"title": job_id}), created, finished, attempt, dispatched))
        old.execute("INSERT INTO events (job, type, data, ts) VALUES (?, 'status', ?, ?)",
                    (job_id, json.dumps({"status": status}), created))
    old.commit()
    old.close()

    store = JobStore(path)
    assert store.db.engine.connect().exec_driver_sql("SELECT version FROM schema_version").scalar() == VERSION
    assert {j.id: j.status for j in store.list("alice")} == {"done1": DONE, "running1": RUNNING, "queued1": QUEUED}
    assert store.get("done1").storyboard == {"title": "done1"} and store.get("done1").windows_done == 2
    assert [e.data for e in store.events("running1")] == [{"status": RUNNING}]
    assert store.release_orphans(lease_s=10) == ["running1"]  # its old ingress is gone: queued again
    assert store.claim("running1", dispatcher="new") == 3
    assert [j.id for j in store.queued()] == ["queued1"]
    seq_before = store.events("queued1")[-1].seq
    store.request_cancel("queued1")
    assert store.events("queued1")[-1].seq > seq_before  # AUTOINCREMENT keeps counting from the old events
    store.close()
    assert JobStore(path).counts()[DONE] == 1  # opening again is a no-op


def test_a_database_newer_than_this_code_is_refused(job_db):
    from skyray.serve.store import SchemaError

    JobStore(job_db).close()
    s = JobStore(job_db)
    with s.db.write() as c:
        c.exec_driver_sql(f"UPDATE schema_version SET version = {VERSION + 1}")
    s.close()
    with pytest.raises(SchemaError, match="newer than this"):
        JobStore(job_db)


def test_a_guarded_add_holds_its_limit_under_concurrent_submissions(job_db):
    """Ten submitters race to add with a guard allowing 3 queued jobs: exactly 3 get in (the API's queue and
    quota checks run as such a guard)."""
    stores = [JobStore(job_db) for _ in range(10)]
    barrier = threading.Barrier(10)
    results: list[str] = []

    class Full(Exception):
        pass

    def submit(n: int) -> None:
        s = stores[n]

        def guard() -> None:
            time.sleep(0.02)  # widen the window a check-then-insert race would need
            if s.counts()[QUEUED] >= 3:
                raise Full

        barrier.wait()
        try:
            s.add(f"j{n}", "a", "shot", "tiny", {}, "x.mp4", guard=guard)
            results.append("in")
        except Full:
            results.append("full")

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["full"] * 7 + ["in"] * 3
    assert stores[0].counts()[QUEUED] == 3
    for s in stores:
        s.close()
