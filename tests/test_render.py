"""The one-machine render path: storyboard -> plan -> local executor -> clips, film, contact sheet, manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from skyray.cli import main
from skyray.executors.local import LocalExecutor
from skyray.output.encode import probe
from skyray.plan import compile_plan
from skyray.render import RenderCancelled, render_film
from skyray.storyboard import load_storyboard, parse_storyboard

ROOT = Path(__file__).resolve().parents[1]

SMALL = """
title: small
model: tiny
resolution: 32x32
fps: 8
seed: 3
defaults: {steps: 3, base_num_frames: 17, overlap_history: 5, addnoise_condition: 20}
shots:
  - id: a
    prompt: [a lighthouse at dawn, a beam over the sea]
    frames: 25
  - id: b
    continue: true
    prompt: a boat
    frames: 8
  - id: c
    prompt: a harbor
    frames: 9
"""


@pytest.fixture(scope="module")
def executor():
    return LocalExecutor("tiny", "cpu")


def small_plan(tmp_path: Path, text: str = SMALL):
    return compile_plan(parse_storyboard(text, tmp_path, "small.yaml"))


def test_demo_film_outputs(executor, tmp_path):
    plan = compile_plan(load_storyboard(ROOT / "storyboards" / "demo.yaml"))
    out = tmp_path / "demo"
    manifest = render_film(plan, out, executor, save_latents=True)
    info = probe(out / "film.mp4")
    assert info.codec == "h264" and info.pix_fmt == "yuv420p"
    assert info.frames == sum(s["frames"] for s in manifest["shots"]) == plan.frames
    assert info.fps == plan.fps
    assert [s["id"] for s in manifest["shots"]] == [s.id for s in plan.shots]
    for s in manifest["shots"]:
        clip = probe(out / s["path"])
        assert clip.frames == s["frames"]
        assert len(s["windows"]) == len(plan.shot(s["id"]).windows)
        lat = load_file(out / s["latents"])["latents"]
        assert lat.dtype == torch.float32 and lat.shape[:2] == (16, s["frames"] // 4 + (s["continues"] is None))
    with Image.open(out / "contact_sheet.png") as im:
        assert im.format == "PNG" and im.height > im.width / 6 * len(plan.shots) * 0.5
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["storyboard_hash"] == plan.storyboard_hash and on_disk["versions"]["torch"]


def test_single_shot_latents_equal_reference(executor, tiny, tmp_path):
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    text = """
title: one
model: tiny
resolution: 32x32
fps: 24
seed: 11
defaults: {steps: 4, guidance_scale: 6.0, shift: 8.0, addnoise_condition: 0, negative_prompt: "blurry"}
shots:
  - {id: only, prompt: a red fox in the snow, frames: 17}
"""
    plan = small_plan(tmp_path, text)
    render_film(plan, tmp_path / "out", executor, save_latents=True)
    ours = load_file(tmp_path / "out" / "shots" / "only.safetensors")["latents"]
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, transformer=tiny.transformer, vae=tiny.vae,
        scheduler=tiny.scheduler_for(8.0),
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        prompt="a red fox in the snow", negative_prompt="blurry", height=32, width=32, num_frames=17,
        num_inference_steps=4, guidance_scale=6.0, fps=24, output_type="latent",
        generator=torch.Generator("cpu").manual_seed(11),
    ).frames[0]
    assert (ours - ref).abs().max().item() <= 1e-4


def _events(store):
    return lambda e: store.append(e)


def test_interrupted_render_reuses_finished_shots(executor, tmp_path):
    plan = small_plan(tmp_path)
    out = tmp_path / "film"
    events: list[dict] = []
    stop = {"now": False}

    def on_event(e):
        events.append(e)
        if e["type"] == "shot_done" and e["shot"] == "a":
            stop["now"] = True

    with pytest.raises(RenderCancelled):
        render_film(plan, out, executor, on_event=on_event, should_stop=lambda: stop["now"])
    assert (out / "shots" / "a.mp4").is_file() and not (out / "film.mp4").exists()

    rerun: list[dict] = []
    manifest = render_film(plan, out, executor, on_event=_events(rerun))
    assert rerun[0]["reused"] == ["a"]
    assert not [e for e in rerun if e["type"] == "window" and e["shot"] == "a"]
    assert {e["shot"] for e in rerun if e["type"] == "window"} == {"b", "c"}
    assert manifest["shots"][0]["reused"] is True
    assert probe(out / "film.mp4").frames == plan.frames

    again: list[dict] = []
    render_film(plan, out, executor, on_event=_events(again))
    assert sorted(again[0]["reused"]) == ["a", "b", "c"]
    assert not [e for e in again if e["type"] == "window"]


def test_changed_shot_is_rendered_again_with_its_continuation(executor, tmp_path):
    plan = small_plan(tmp_path)
    out = tmp_path / "film"
    render_film(plan, out, executor)
    changed = small_plan(tmp_path, SMALL.replace("prompt: a boat", "prompt: a red boat"))
    events: list[dict] = []
    render_film(changed, out, executor, on_event=_events(events))
    assert sorted(events[0]["reused"]) == ["a", "c"]


def test_resume_mid_shot_from_window_checkpoint(executor, tmp_path):
    plan = small_plan(tmp_path)
    whole = tmp_path / "whole"
    render_film(plan, whole, executor, save_latents=True)

    out = tmp_path / "cut"
    seen = {"windows": 0}

    def on_event(e):
        if e["type"] == "window":
            seen["windows"] += 1

    with pytest.raises(RenderCancelled):
        render_film(plan, out, executor, save_latents=True, on_event=on_event, should_stop=lambda: seen["windows"] >= 1)
    assert (out / "checkpoints" / "a" / "w0000.safetensors").is_file()
    # The clip that was being written is dropped whole: no partial mp4, no temp file, no ffmpeg left behind.
    shots = out / "shots"
    assert not shots.exists() or (not list(shots.glob("*a*.mp4*")) and not [p for p in shots.iterdir() if p.name.startswith(".")])
    manifest = render_film(plan, out, executor, save_latents=True)
    assert manifest["shots"][0]["windows"][0].get("resumed") is True
    for sid in ("a", "b", "c"):
        a = load_file(whole / "shots" / f"{sid}.safetensors")["latents"]
        b = load_file(out / "shots" / f"{sid}.safetensors")["latents"]
        assert torch.equal(a, b), sid


def test_invalid_storyboard_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMALL.replace("frames: 9", "frames: 10"))
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["render", str(bad), "--out", str(out), "--executor", "local", "-q"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "'c'" in err and "frames" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(["render", str(bad), "--out", str(tmp_path / "new"), "--executor", "local", "-q"]) == 2
    assert not (tmp_path / "new").exists()


def test_plan_command_prints_table(capsys):
    assert main(["plan", str(ROOT / "storyboards" / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "opening" in out and "drift" in out and "TFLOP" in out.upper()


def test_bad_parallel_degree_fails_before_loading(tmp_path, capsys):
    sb = tmp_path / "par.yaml"
    sb.write_text(SMALL.replace("defaults:", "cluster: {groups: 1, gpus_per_group: 3}\nparallel: {ulysses: 3, cfg: false}\ndefaults:"))
    with pytest.raises(SystemExit, match="ulysses degree 3 must divide the model's 4 attention heads"):
        main(["render", str(sb), "--out", str(tmp_path / "o"), "--executor", "local", "-q"])
    assert not (tmp_path / "o").exists()


def test_output_to_a_pyarrow_uri(executor, tmp_path):
    plan = small_plan(tmp_path)
    remote = tmp_path / "bucket" / "films" / "small"
    uri = f"file://{remote}"
    manifest = render_film(plan, uri, executor)
    assert manifest["location"] == uri
    for rel in ("film.mp4", "manifest.json", "contact_sheet.png", "shots/a.mp4", "shots/b.json", "shots/c.mp4"):
        assert (remote / rel).is_file(), rel
    assert probe(remote / "film.mp4").frames == plan.frames
    assert not (remote / "checkpoints").exists()  # nothing half-done is left at the location
    # A rerun reads the finished shots from the location itself and renders nothing.
    events: list[dict] = []
    render_film(plan, uri, executor, on_event=_events(events))
    assert sorted(events[0]["reused"]) == ["a", "b", "c"]


def test_repeated_failure_stops_with_a_clear_error_and_keeps_finished_shots(executor, tmp_path):
    from skyray.executors.base import WindowError
    from skyray.render import RenderFailed
    from skyray.scheduler import Failure

    class Flaky:
        """The module's executor, but every window of shot 'c' fails (as a dying group would)."""

        def __init__(self, inner):
            self.inner, self.groups, self.recovered = inner, inner.groups, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def wait_any(self, handles, timeout=None):
            h = self.inner.wait_any(handles, timeout)
            if h.meta.shot_id == "c":
                raise WindowError(h, RuntimeError("GPU fell off the bus"), Failure.GROUP_LOST)
            return h

        def recover(self, group, error):
            self.recovered += 1
            self.replaced = [group]
            return True

        def ready_groups(self):
            ready, self.replaced = getattr(self, "replaced", []), []
            return ready

    plan = small_plan(tmp_path)
    flaky = Flaky(executor)
    with pytest.raises(RenderFailed, match=r"shot 'c' window 0 failed 3 time\(s\): GPU fell off the bus"):
        render_film(plan, tmp_path / "out", flaky)
    assert flaky.recovered == 2
    shots = tmp_path / "out" / "shots"
    assert (shots / "a.mp4").is_file() and (shots / "b.mp4").is_file() and not (shots / "c.mp4").exists()


def test_killed_render_process_reruns_no_finished_shot(tmp_path):
    """SIGKILL the real `skyray render` process once its first shot is recorded; the rerun renders only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sb = tmp_path / "film.yaml"
    sb.write_text(SMALL.replace("frames: 9", "frames: 97"))  # a long last shot keeps the process busy
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "skyray.cli", "render", str(sb), "--out", str(out), "--executor", "local", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "shots" / "a.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "render ended before its first shot"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "film.mp4").exists()
    first = json.loads((out / "shots" / "a.json").read_text())

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    shots = {s["id"]: s for s in manifest["shots"]}
    assert shots["a"]["reused"] is True and shots["c"]["reused"] is False
    assert json.loads((out / "shots" / "a.json").read_text()) == first  # the finished shot was not touched
    assert probe(out / "film.mp4").frames == sum(s["frames"] for s in manifest["shots"])
