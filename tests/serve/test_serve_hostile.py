"""Hostile bodies against the real Serve app (issue 13): each gets its 4xx within a second, the ingress replica's
memory stays within +300 MB while they arrive, and a normal film renders afterwards.

The session's app caps bodies at 64 KiB, which would answer most of these 413 before any parser ran; so a second
app of the same options but the default 24 MiB body cap is deployed at ``/hostile`` on the same Serve instance.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import TOKEN_A, video_frames, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the hostile storyboards the CLI tests use
from hostile_storyboards import (  # noqa: E402
    alias_bomb,
    deep_json,
    deep_nesting,
    long_prompt,
    many_shots,
    many_shots_yaml,
    merge_bomb,
    not_utf8,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "skyray-hostile"
MAX_ANSWER_S = 1.0
MAX_GROWTH_MB = 300
YAML = {"Content-Type": "application/x-yaml"}
JSON = {"Content-Type": "application/json"}

# (route, body, headers, status, what the answer must say)
HOSTILE = [
    ("films", alias_bomb(), YAML, 422, "expands to more than"),
    ("films", merge_bomb(), YAML, 422, "expands to more than"),
    ("films", deep_nesting(), YAML, 422, "nested too deeply"),
    ("films", deep_nesting(300), YAML, 422, "nested too deeply"),
    ("films", deep_json(), JSON, 422, "nested too deeply"),
    ("films", many_shots(), JSON, 422, "more than 64 shots"),
    ("films", many_shots_yaml(), YAML, 422, "more than 64 shots"),
    ("films", long_prompt(), YAML, 422, "storyboard:5: shot 'harbor' field 'prompt': 1000000 characters"),
    ("films", not_utf8(), YAML, 422, "not UTF-8"),
    ("shots", json.dumps({"prompt": "x" * 1_000_000, "frames": 9}), JSON, 422, "field 'prompt': 1000000 characters"),
    ("shots", json.dumps({"prompt": ["x"] * 10 + ["y" * 1_000_000], "frames": 9}), JSON, 422,
     "field 'prompt[10]': 1000000 characters"),
    ("shots", b'{"prompt": "caf\xe9", "frames": 9}', JSON, 422, "not UTF-8"),
    ("shots", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", JSON, 400, "error parsing the body"),
]
NORMAL_FILM = {
    "title": "after the storm", "resolution": "32x32", "fps": 8,
    "defaults": {"steps": 2, "base_num_frames": 17, "overlap_history": 5},
    "shots": [{"id": "calm", "prompt": "a calm harbor", "frames": 9}],
}


@pytest.fixture(scope="module")
def hostile(serve_env, tmp_path_factory):
    from ray import serve

    from skyray.serve import ServeOptions, build_app

    options = dataclasses.replace(
        serve_env.options, data_dir=str(tmp_path_factory.mktemp("hostile-data")),
        max_body_bytes=ServeOptions().max_body_bytes, cpus_per_replica=0.25,
    )
    serve.run(build_app(options), name=APP, route_prefix="/hostile")
    try:
        with httpx.Client(base_url=f"{serve_env.base_url}/hostile", timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN_A}"}) as client:
            yield client
    finally:
        serve.delete(APP)


def ingress_processes():
    """The ingress replicas of the hostile app (Ray titles an actor's process after its class)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(f"ServeReplica:{APP}:Ingress" in part for part in p.info["cmdline"] or ()):
            found.append(p)
    return found


class PeakRss:
    """Samples the summed RSS of ``processes`` every 10 ms while in a ``with`` block."""

    def __init__(self, processes) -> None:
        self.processes, self.peak, self._stop = processes, 0, threading.Event()

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.processes)

    def __enter__(self) -> PeakRss:
        self.start = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def test_hostile_bodies_get_4xx_fast_in_bounded_memory_then_a_film_renders(hostile, tmp_path):
    processes = ingress_processes()
    assert processes, "no ingress replica process of the hostile app found"
    # Warm the replica up (imports, first request) so that its baseline is the steady state.
    assert hostile.post("/v1/films", content=not_utf8(), headers=YAML).status_code == 422
    answers = []
    with PeakRss(processes) as rss:
        for route, body, headers, status, needle in HOSTILE:
            t0 = time.perf_counter()
            r = hostile.post(f"/v1/{route}", content=body, headers=headers)
            seconds = time.perf_counter() - t0
            answers.append((route, needle, r.status_code, round(seconds, 3)))
            assert r.status_code == status, (needle, r.text[:500])
            assert needle in r.json()["detail"], r.text[:500]
            assert len(r.text) < 2000  # the answer names the problem; it does not echo the body
            assert seconds < MAX_ANSWER_S, (needle, seconds)
    growth_mb = (rss.peak - rss.start) / 2**20
    print(f"ingress RSS {rss.start / 2**20:.0f} MB, peak +{growth_mb:.0f} MB; answers: {answers}")
    assert growth_mb < MAX_GROWTH_MB
    assert all(p.is_running() for p in processes)

    r = hostile.post("/v1/films", json=NORMAL_FILM)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_for(hostile, job_id, {"done"})
    assert video_frames(hostile, job_id, tmp_path) == 9
