"""The Ray executor against the local one: same latents, hand-off by reference, survival of a killed actor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from skyray.executors.local import LocalExecutor
from skyray.plan import compile_plan
from skyray.render import render_film
from skyray.storyboard import parse_storyboard

pytestmark = pytest.mark.ray

FILM = """
title: chains
model: tiny
resolution: 32x32
fps: 8
seed: 5
defaults: {steps: 3, base_num_frames: 17, overlap_history: 5, addnoise_condition: 20}
shots:
  - {id: a, prompt: [a lighthouse, a beam], frames: 25}
  - {id: b, continue: true, prompt: a boat, frames: 8}
  - {id: c, prompt: a harbor, frames: 17}
  - {id: d, continue_from: a, prompt: a storm, frames: 4}
  - {id: e, prompt: a market, frames: 9}
"""


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return compile_plan(parse_storyboard(FILM, tmp_path_factory.mktemp("sb"), "chains.yaml"))


@pytest.fixture(scope="module")
def reference(plan, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    render_film(plan, out, LocalExecutor("tiny", "cpu"), save_latents=True)
    return out


@pytest.fixture(scope="module")
def two_groups(ray_session):
    from skyray.executors.ray import RayExecutor

    ex = RayExecutor("tiny", groups=2)
    yield ex
    ex.shutdown()


def assert_same_film(plan, a: Path, b: Path, tol: float = 1e-6):
    for s in plan.shots:
        la = load_file(a / "shots" / f"{s.id}.safetensors")["latents"]
        lb = load_file(b / "shots" / f"{s.id}.safetensors")["latents"]
        assert la.shape == lb.shape, s.id
        assert (la - lb).abs().max().item() <= tol, s.id


def render_killing(plan, out: Path, ex, rank: int | None) -> dict:
    """Render with ``ex``; if ``rank`` is given, kill that rank of group 0 after shot a's first window."""
    import ray

    killed = {"done": rank is None}

    def on_event(e):
        if e["type"] == "window" and e["shot"] == "a" and not killed["done"]:
            ray.kill(ex.actors(0)[rank])
            killed["done"] = True

    try:
        return render_film(plan, out, ex, save_latents=True, on_event=on_event)
    finally:
        ex.shutdown()


def test_one_group_equals_local(plan, reference, ray_session, tmp_path):
    from skyray.executors.ray import RayExecutor

    ex = RayExecutor("tiny", groups=1)
    try:
        manifest = render_film(plan, tmp_path, ex, save_latents=True)
    finally:
        ex.shutdown()
    assert_same_film(plan, reference, tmp_path)
    assert manifest["film"]["frames"] == plan.frames


def test_two_groups_equal_local_and_hand_off_by_reference(plan, reference, two_groups, tmp_path, monkeypatch):
    import skyray.executors.ray as ray_exec
    from skyray.engine.handoff import Handoff, WindowOutput

    fetched = []
    real_get = ray_exec.ray.get

    def spy_get(refs, *a, **kw):
        value = real_get(refs, *a, **kw)
        fetched.extend(value if isinstance(value, list) else [value])
        return value

    monkeypatch.setattr(ray_exec.ray, "get", spy_get)
    manifest = render_film(plan, tmp_path, two_groups, save_latents=True)
    monkeypatch.undo()
    assert_same_film(plan, reference, tmp_path)
    # The driver fetched metadata and shot results only: never a window's latents or hand-off.
    assert fetched
    assert not [v for v in fetched if isinstance(v, (torch.Tensor, WindowOutput, Handoff, tuple))]
    workers = {w["worker"].split("/")[0] for s in manifest["shots"] for w in s["windows"]}
    assert len(workers) == 2  # both groups took windows


def test_killed_actor_mid_shot_render_completes_identically(plan, reference, ray_session, tmp_path):

    from skyray.executors.ray import RayExecutor

    ex = RayExecutor("tiny", groups=1)
    manifest = render_killing(plan, tmp_path, ex, rank=0)
    assert ex.recoveries == 1
    assert_same_film(plan, reference, tmp_path)
    retried = [w for s in manifest["shots"] for w in s["windows"] if w.get("retries")]
    assert retried and retried[0]["index"] == 1


@pytest.mark.parametrize("ulysses,cfg", [(1, True), (2, False)])
def test_group_of_two_ranks_equals_local_and_survives_a_dead_rank(plan, reference, ray_session, tmp_path, ulysses, cfg):
    """Two emulated GPUs per group: CFG-parallel or Ulysses-2; weights read by rank 0 and broadcast. Killing
    rank 1 mid-shot recreates the whole group (a process group does not survive a member) and the film is the
    same."""

    from skyray.engine.parallel import ParallelConfig
    from skyray.executors.ray import RayExecutor

    ex = RayExecutor("tiny", groups=1, gpus_per_group=2, parallel=ParallelConfig(ulysses=ulysses, cfg=cfg),
                     collective_timeout_s=30)
    # Kill rank 1 in only one of the two layouts, to keep the test short.
    manifest = render_killing(plan, tmp_path, ex, rank=1 if cfg else None)
    # Splitting forwards over ranks changes the summation order: equal within 1e-5, not bit for bit.
    assert_same_film(plan, reference, tmp_path, tol=1e-5)
    assert manifest["film"]["frames"] == plan.frames
    if cfg:
        assert ex.recoveries == 1


def test_an_error_that_recurs_fails_at_once_without_rebuilding_the_group(plan, ray_session):
    from skyray.executors.base import WindowError
    from skyray.executors.ray import RayExecutor
    from skyray.render import shot_jobs
    from skyray.scheduler import Failure

    ex = RayExecutor("tiny", groups=1, progress=False)
    try:
        job = shot_jobs(plan, plan.shot("b"), 2)[0]  # b continues a: its first window needs a hand-off...
        h = ex.submit(0, job, None)  # ...and gets none: the worker refuses, and would every time
        with pytest.raises(WindowError) as err:
            while ex.wait_any([h], timeout=5) is None:
                pass
        assert err.value.failure is Failure.FATAL
        assert "handed-off latents" in str(err.value.cause)
        assert ex.recoveries == 0 and ex.ready_groups() == []
        assert ex.wait_any([ex.submit(0, shot_jobs(plan, plan.shot("c"), 2)[0], None)], timeout=300)  # still alive
    finally:
        ex.shutdown()
