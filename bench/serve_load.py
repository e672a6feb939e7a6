"""Load on the Serve app: N concurrent clients submit shots, follow them over SSE and download the videos,
against 2 ingress replicas sharing a PostgreSQL job store on 127.0.0.1; one ingress replica is killed halfway
and one renderer replica at three quarters.

Prints requests per second, p50/p99 latency of each kind of API call, jobs accepted against jobs finished (they
must be equal: nothing accepted is lost), and the memory of the server's processes (Ray's and PostgreSQL's)
before and after.  Clients retry what the dead replica dropped, as a real client would: reads and the SSE
stream (resumed from Last-Event-ID) at once; a submission only counts as accepted once its 202 arrives.

    python bench/serve_load.py --clients 8 --jobs 2          # 16 jobs of 9 frames at 32x32, 2 steps
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil

TOKEN = "bench-token-0123456789abcdef"
APP = "skyray-load"
SHOT = {"prompt": "waves on a rocky shore", "resolution": "32x32", "fps": 8, "steps": 2, "base_num_frames": 17,
        "overlap_history": 5, "frames": 9}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """PostgreSQL 16 from the pgserver wheel, listening on 127.0.0.1 (pgserver itself only opens a socket)."""

    def __init__(self, folder: Path) -> None:
        import pgserver
        from pgserver import _commands

        server = pgserver.get_server(folder, cleanup_mode=None)  # initdb + a socket-only start
        self._user = server.system_user
        self._ctl = _commands.pg_ctl
        self.folder = folder
        self._ctl(["-w", "stop"], pgdata=folder, user=self._user)
        self.port = free_port()
        self._ctl(["-w", "-o", f"-h 127.0.0.1 -p {self.port} -k {folder}", "-l", str(folder / "tcp.log"), "start"],
                  pgdata=folder, user=self._user, timeout=60)
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        self._ctl(["-w", "-m", "fast", "stop"], pgdata=self.folder, user=self._user)


def server_rss_mib(pg: Postgres) -> float:
    """Resident memory of this run's server: the Ray processes this driver started (GCS, raylet, Serve controller
    and proxy, replicas: all its descendants) and this run's PostgreSQL (postmaster and backends)."""
    procs = psutil.Process().children(recursive=True)
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "postgres" and str(pg.folder) in " ".join(p.info["cmdline"] or []):
            procs += [p, *p.children(recursive=True)]
    total = 0
    for p in {p.pid: p for p in procs}.values():
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.retries: dict[str, int] = defaultdict(int)
        self.accepted: list[str] = []
        self.finished: list[str] = []
        self.failed: list[str] = []

    def timed(self, kind: str, request, *args, **kwargs) -> httpx.Response:
        """Send ``request(*args, **kwargs)`` until an answer that is not the dead replica's comes; time each."""
        for attempt in range(30):
            t0 = time.perf_counter()
            try:
                r = request(*args, **kwargs)
            except (httpx.TransportError, httpx.RemoteProtocolError):
                r = None
            took = time.perf_counter() - t0
            if r is not None and r.status_code < 500:
                with self.lock:
                    self.latency[kind].append(took)
                return r
            with self.lock:
                self.retries[kind] += 1
            time.sleep(min(2.0, 0.1 * 2 ** attempt))
        raise RuntimeError(f"{kind}: no answer after 30 tries")


def follow(client: httpx.Client, stats: Stats, job_id: str) -> str:
    """Read the job's SSE stream to its end, reconnecting (Last-Event-ID) when a replica drops it."""
    last, status = 0, None
    for _ in range(60):
        t0 = time.perf_counter()
        try:
            headers = {"Last-Event-ID": str(last)} if last else {}
            with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=300) as r:
                if r.status_code >= 500:
                    raise httpx.RemoteProtocolError(f"{r.status_code}")
                with stats.lock:
                    stats.latency["events (first byte)"].append(time.perf_counter() - t0)
                kind = None
                for line in r.iter_lines():
                    if line.startswith("id:"):
                        last = int(line[3:])
                    elif line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:") and kind == "status":
                        status = json.loads(line[5:])["status"]
            if status in ("done", "failed", "cancelled"):
                return status
        except (httpx.TransportError, httpx.RemoteProtocolError):
            with stats.lock:
                stats.retries["events"] += 1
            time.sleep(0.5)
    raise RuntimeError(f"job {job_id}: the event stream never ended")


def client_run(base: str, stats: Stats, jobs: int, seed: int, halfway: threading.Event,
               three_quarters: threading.Event, total: int) -> None:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        for j in range(jobs):
            r = stats.timed("submit", c.post, "/v1/shots", json={**SHOT, "seed": seed * 100 + j})
            if r.status_code != 202:
                raise RuntimeError(f"submit: {r.status_code} {r.text}")
            job_id = r.json()["id"]
            with stats.lock:
                stats.accepted.append(job_id)
            status = follow(c, stats, job_id)
            view = stats.timed("get job", c.get, f"/v1/jobs/{job_id}").json()
            if status == "done" and view["status"] == "done":
                video = stats.timed("download", c.get, f"/v1/jobs/{job_id}/video")
                ok = video.status_code == 200 and video.content[4:8] == b"ftyp"
                with stats.lock:
                    (stats.finished if ok else stats.failed).append(job_id)
                    if len(stats.finished) >= total // 2:
                        halfway.set()
                    if len(stats.finished) >= (3 * total) // 4:
                        three_quarters.set()
            else:
                with stats.lock:
                    stats.failed.append(job_id)


def replica_actors(deployment: str = "Ingress") -> dict[str, str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return {a["name"][len(prefix):]: a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2, help="jobs each client submits, one after another")
    ap.add_argument("--renderers", type=int, default=2, help="renderer replicas (tiny model, CPU)")
    ap.add_argument("--no-kill", action="store_true", help="kill no replica (a baseline)")
    args = ap.parse_args()

    import ray
    from ray import serve

    from skyray.executors.ray import EMULATED_SLOT
    from skyray.serve import ServeOptions, build_app

    work = Path(tempfile.mkdtemp(prefix="skyray-load-"))
    work.chmod(0o755)  # PostgreSQL runs as its own user and must reach its folder
    pg = Postgres(work / "pg")
    total = args.clients * args.jobs
    options = ServeOptions(models=("tiny",), device="cpu", data_dir=str(work / "data"), tokens=(TOKEN,),
                           database_url=pg.dsn, ingress_replicas=2, gpus_per_replica=0, min_replicas=args.renderers,
                           max_replicas=args.renderers, max_queue=total + 8, preview_size=32, dispatcher_lease_s=3.0,
                           graceful_shutdown_s=0.5)
    port = free_port()
    try:
        ray.init(address="local", num_cpus=2 + args.renderers, include_dashboard=False, log_to_driver=False,
                 resources={EMULATED_SLOT: 64}, object_store_memory=200 << 20)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t_deploy = time.perf_counter()
        serve.run(build_app(options), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        print(f"deployed 2 ingress + {args.renderers} renderer replicas in {time.perf_counter() - t_deploy:.1f} s; "
              f"PostgreSQL on 127.0.0.1:{pg.port}")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as warm:
            r = warm.post("/v1/shots", json={**SHOT, "seed": 999999})  # first render loads the model
            warm_id = r.json()["id"]
            while warm.get(f"/v1/jobs/{warm_id}").json()["status"] not in ("done", "failed"):
                time.sleep(0.2)
        mem_before = server_rss_mib(pg)

        stats, halfway, three_quarters = Stats(), threading.Event(), threading.Event()
        threads = [threading.Thread(target=client_run, args=(base, stats, args.jobs, i, halfway, three_quarters,
                                                             total))
                   for i in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        killed = None
        if not args.no_kill:
            halfway.wait()
            actors = replica_actors()
            killed = sorted(actors)[0]
            ray.kill(ray.get_actor(actors[killed], namespace="serve"), no_restart=True)
            print(f"killed ingress replica {killed} with {len(stats.finished)} of {total} jobs finished, "
                  f"{len(stats.accepted) - len(stats.finished)} in flight ({time.perf_counter() - t0:.1f} s in)")
            three_quarters.wait()
            renderers = replica_actors("Renderer")
            victim = sorted(renderers)[0]
            ray.kill(ray.get_actor(renderers[victim], namespace="serve"), no_restart=True)
            print(f"killed renderer replica {victim} with {len(stats.finished)} of {total} jobs finished, "
                  f"{len(stats.accepted) - len(stats.finished)} in flight ({time.perf_counter() - t0:.1f} s in)")
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        deadline = time.monotonic() + 60
        while killed and time.monotonic() < deadline and (  # Serve replaces what was killed
                len(replica_actors()) < 2 or len(replica_actors("Renderer")) < args.renderers):
            time.sleep(0.5)
        time.sleep(2)
        mem_after = server_rss_mib(pg)
        replicas_after = f"{len(replica_actors())} ingress + {len(replica_actors('Renderer'))} renderer replicas"

        from skyray.serve.store import JobStore

        store = JobStore(pg.dsn)
        rows = {jid: store.get(jid) for jid in stats.accepted}
        store.close()
        done_in_db = sum(1 for j in rows.values() if j is not None and j.status == "done")
        calls = sum(len(v) for v in stats.latency.values())
        print()
        print(f"clients {args.clients} x {args.jobs} jobs, {args.renderers} renderers, wall {wall:.1f} s")
        print(f"API requests {calls} ({sum(stats.retries.values())} retried after the kill): "
              f"{calls / wall:.1f} req/s")
        print(f"{'call':<22}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}")
        everything = []
        for kind, values in sorted(stats.latency.items()):
            everything += values
            print(f"{kind:<22}{len(values):>6}{pct(values, 0.5) * 1e3:>10.1f}{pct(values, 0.99) * 1e3:>10.1f}")
        print(f"{'all':<22}{len(everything):>6}{pct(everything, 0.5) * 1e3:>10.1f}{pct(everything, 0.99) * 1e3:>10.1f}")
        print(f"jobs accepted {len(stats.accepted)}, finished {len(stats.finished)} (done in the store: "
              f"{done_in_db}), failed {len(stats.failed)}")
        print(f"server memory (Ray + PostgreSQL RSS): before {mem_before:.0f} MiB, after {mem_after:.0f} MiB "
              f"({mem_after - mem_before:+.0f} MiB; {replicas_after} up after)")
        ok = len(stats.accepted) == len(stats.finished) == total and not stats.failed
        print("accepted == finished" if ok else "LOST JOBS: accepted != finished")
        return 0 if ok else 1
    finally:
        try:
            serve.shutdown()
        except Exception:
            pass
        if ray.is_initialized():
            ray.shutdown()
        pg.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main())
