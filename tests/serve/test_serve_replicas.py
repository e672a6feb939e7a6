"""Two ingress replicas behind Serve's proxy, sharing one real PostgreSQL job store.

Either replica accepts, shows, streams and cancels any job; both dispatchers claim from the store and each job
is claimed (and rendered) exactly once; killing the replica that dispatched a running job loses nothing: the
other queues it again once the dead one's lease runs out, and it resumes from its window checkpoints.
Every response names its replica (``X-Skyray-Replica``), which is how the tests know who answered.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import APP, LONG, SMALL, follow, video_frames, wait_for

from skyray.serve.ingress import REPLICA_HEADER

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPLICATED = "skyray-replicated"
# 64x64, 577 frames = 145 latents: 48 windows of 10 steps (~0.2 s each here), long enough to outlast the dead
# replica's lease (3 s) by several seconds.
LONGEST = {**SMALL, "resolution": "64x64", "steps": 10, "frames": 577}


@pytest.fixture(scope="module")
def replicated(serve_env, postgres):
    """The session's Serve instance with the shared-DB app in place of the default one (restored after)."""
    from ray import serve

    from skyray.serve import build_app

    dsn = postgres.new_database()
    options = dataclasses.replace(serve_env.options, database_url=dsn, ingress_replicas=2, dispatcher_lease_s=3.0,
                                  max_queue=32, max_frames=600)
    serve.delete(APP)
    serve.run(build_app(options), name=REPLICATED, route_prefix="/")
    yield dsn
    serve.delete(REPLICATED)
    serve_env.deploy()


def submit(client, **body) -> tuple[str, str]:
    r = client.post("/v1/shots", json={"prompt": "rain over a harbour", **SMALL, "frames": 9, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"], r.headers[REPLICA_HEADER]


def from_other(call, replica: str, tries: int = 60):
    """Repeat an idempotent request until a replica other than ``replica`` answers it."""
    for _ in range(tries):
        r = call()
        if r.headers.get(REPLICA_HEADER) != replica:
            return r
    raise AssertionError(f"only replica {replica} answered {tries} requests")


def ingress_actors() -> dict[str, object]:
    import ray

    prefix = f"SERVE_REPLICA::{REPLICATED}#Ingress#"
    return {a["name"][len(prefix):]: a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)}


def test_a_job_is_seen_followed_and_cancelled_from_the_other_replica(replicated, client, tmp_path):
    assert len(ingress_actors()) == 2
    job_id, accepted_by = submit(client)
    r = from_other(lambda: client.get(f"/v1/jobs/{job_id}"), accepted_by)
    assert r.status_code == 200 and r.json()["id"] == job_id

    wait_for(client, job_id, {"done"})
    for _ in range(60):  # an SSE stream served by the other replica replays the whole job
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as s:
            if s.headers[REPLICA_HEADER] != accepted_by:
                break
    else:
        raise AssertionError("no SSE stream from the other replica")
    events = follow(client, job_id)
    assert [d["status"] for k, d in events if k == "status"] == ["queued", "running", "done"]
    assert video_frames(client, job_id, tmp_path) == 9

    # Cancel long jobs: whichever replica takes the DELETE, the one rendering or holding the job obeys.
    jobs = [submit(client, **LONG, seed=i) for i in range(6)]
    crossed = 0
    for job, accepted in jobs:
        r = client.delete(f"/v1/jobs/{job}")
        assert r.status_code in (200, 202), r.text
        crossed += r.headers[REPLICA_HEADER] != accepted
    assert crossed, "every DELETE landed on the accepting replica; rerun"  # 1 in 64 by chance
    for job, _ in jobs:
        assert wait_for(client, job, {"cancelled"})["status"] == "cancelled"


def test_two_dispatchers_claim_each_job_once_under_load(replicated, client, tmp_path):
    from skyray.serve.store import JobStore

    with ThreadPoolExecutor(8) as pool:
        submitted = list(pool.map(lambda i: submit(client, seed=i, frames=5 + 4 * (i % 3)), range(16)))
    assert len({replica for _, replica in submitted}) == 2  # both replicas accepted jobs
    for job_id, _ in submitted:
        wait_for(client, job_id, {"done"}, timeout=180)
    store = JobStore(replicated)
    try:
        dispatchers = set()
        for job_id, _ in submitted:
            job = store.get(job_id)
            runs = [e.data for e in store.events(job_id) if e.type == "status" and e.data["status"] == "running"]
            assert (job.attempt, job.restarts, runs) == (1, 0, [{"status": "running", "attempt": 1}]), job_id
            dispatchers.add(job.dispatcher)
        assert None not in dispatchers  # (which of the two claims what is up to timing)
    finally:
        store.close()


def test_killing_the_dispatching_replica_loses_nothing(replicated, client, tmp_path):
    import ray

    from skyray.serve.store import JobStore

    long_job, _ = submit(client, **LONGEST)
    waiting = {submit(client, seed=3)[0]: 9, submit(client, frames=13)[0]: 13}
    wait_for(client, long_job, {"running"},
             check=lambda j: 2 <= j["progress"]["windows_done"] <= 6)
    store = JobStore(replicated)
    try:
        holder = store.get(long_job).dispatcher
        actors = ingress_actors()
        assert holder in actors, (holder, actors)
        ray.kill(ray.get_actor(actors[holder], namespace="serve"), no_restart=True)
        t_killed = time.monotonic()

        for job_id, frames in {long_job: 577, **waiting}.items():
            wait_for(client, job_id, {"done"}, timeout=180)
            assert video_frames(client, job_id, tmp_path) == frames, job_id
        job = store.get(long_job)
        assert job.attempt >= 2 and job.dispatcher != holder and job.restarts == 0  # not the renderer's fault
        requeued = [e.data for e in store.events(long_job) if e.data.get("requeued")]
        assert requeued and requeued[0]["requeued"] == "its ingress replica stopped"
        manifest = client.get(f"/v1/jobs/{long_job}/manifest").json()
        assert sum(1 for w in manifest["shots"][0]["windows"] if w.get("resumed")) >= 2
        assert time.monotonic() - t_killed < 170
        deadline = time.monotonic() + 60
        while len(ingress_actors()) < 2:  # Serve replaces the killed replica
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        store.close()
