"""The prompt enhancer stage, on a tiny random chat LM built offline and loaded from a folder like a real one."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from tiny_llm import save_tiny_llm

from skyray.cli import main
from skyray.enhance import (
    ACTOR_PREFIX,
    SYSTEM_PROMPT,
    Enhancer,
    EnhancerModel,
    EnhancerModelNotFound,
    PromptCache,
    cache_key,
    enhance_storyboard,
    model_fingerprint,
    needs_enhancement,
    run_enhancer,
    wants_enhance,
)
from skyray.executors.local import LocalExecutor
from skyray.plan import compile_plan
from skyray.render import render_film
from skyray.storyboard import load_storyboard, parse_storyboard

FILM = """\
title: enhanced
model: tiny
resolution: 32x32
fps: 8
seed: 5
enhancer: {model: llm, max_new_tokens: 6}
defaults: {steps: 2, base_num_frames: 17, overlap_history: 5, enhance: true}
shots:
  - id: travel
    prompt: [a lighthouse at dawn, a boat in the harbor]
    frames: 25
  - id: still
    prompt: a harbor at night
    image: still.png
    frames: 9
  - id: asked
    prompt: a fox in the snow
    image: still.png
    enhance: true
    frames: 9
  - id: after
    continue: true
    prompt: a lighthouse at dawn
    frames: 8
  - id: manual
    prompt: a quiet street
    enhance: false
    frames: 9
"""


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("llm"), [SYSTEM_PROMPT, FILM])


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SKYRAY_CACHE_DIR", str(root))
    return root / "enhance"


def film(tmp_path: Path, llm: Path, text: str = FILM) -> Path:
    folder = tmp_path / "film"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32), (40, 90, 160)).save(folder / "still.png")
    path = folder / "film.yaml"
    path.write_text(text.replace("model: llm", f"model: {llm}"))
    return path


def test_stage_writes_a_storyboard_that_loads(llm, tmp_path):
    src = film(tmp_path, llm)
    out = tmp_path / "elsewhere" / "film.enhanced.yaml"  # another folder: relative paths must be re-pointed
    result = enhance_storyboard(src, out)

    originals = ["a lighthouse at dawn", "a boat in the harbor", "a fox in the snow"]
    assert list(result.prompts) == originals and result.generated == 3 and result.cached == 0
    assert all(result.prompts[p] and result.prompts[p] != p for p in originals)
    # Image shots only when they ask themselves; a shot saying enhance: false keeps its prompt.
    assert result.shots == ("travel", "asked", "after")

    sb = load_storyboard(out)
    by_id = {s.id: s for s in sb.shots}
    assert by_id["travel"].prompt == [result.prompts[p] for p in originals[:2]]  # prompt travel, element-wise
    assert by_id["travel"].original_prompt == originals[:2]
    assert by_id["asked"].original_prompt == ["a fox in the snow"]
    assert by_id["after"].prompt == [result.prompts["a lighthouse at dawn"]]
    for sid, prompt in (("still", "a harbor at night"), ("manual", "a quiet street")):
        assert by_id[sid].prompt == [prompt] and by_id[sid].original_prompt is None
    assert by_id["still"].image == str((src.parent / "still.png").resolve())
    assert not needs_enhancement(sb) and not needs_enhancement(sb, all_shots=True)  # never enhanced twice
    assert [s.prompt for s in sb.shots] == [s.prompt for s in result.storyboard.shots]
    assert "original_prompt" in out.read_text() and out.read_text().startswith("# Enhanced by `skyray enhance`")

    # Storyboard text (as posted to a server) goes the same way; everything comes from the cache now.
    again = enhance_storyboard(src.read_text(), tmp_path / "again.yaml", base_dir=src.parent)
    assert (again.generated, again.cached) == (0, 3)
    assert [s.prompt for s in load_storyboard(tmp_path / "again.yaml").shots] == [s.prompt for s in sb.shots]


def test_which_shots(llm, tmp_path):
    text = FILM.replace("enhance: true}", "enhance: false}")
    sb = parse_storyboard(text.replace("model: llm", f"model: {llm}"), film(tmp_path, llm).parent)
    assert [wants_enhance(sb, i) for i in range(5)] == [False, False, True, False, False]
    # --all: every shot that does not opt out, and image shots still only when they ask.
    assert [wants_enhance(sb, i, all_shots=True) for i in range(5)] == [True, False, True, True, False]


def test_deterministic_and_cached(llm, tmp_path, cache_root):
    sb = load_storyboard(film(tmp_path, llm))
    loads = EnhancerModel.loads
    first = run_enhancer(sb)
    again = run_enhancer(sb, cache=PromptCache(tmp_path / "other-cache"))  # a fresh cache: generated again
    assert EnhancerModel.loads == loads + 2 and again.generated == 3
    assert again.prompts == first.prompts

    rerun = run_enhancer(sb)
    assert EnhancerModel.loads == loads + 2  # no model loaded, nothing generated
    assert (rerun.generated, rerun.cached) == (0, 3) and rerun.prompts == first.prompts
    assert len(list(cache_root.rglob("*.json"))) == 3

    sampled = replace(Enhancer.from_storyboard(sb), temperature=1.0, seed=7)
    one = run_enhancer(sb, config=sampled, cache=PromptCache(tmp_path / "s1")).prompts
    two = run_enhancer(sb, config=sampled, cache=PromptCache(tmp_path / "s2")).prompts
    other = run_enhancer(sb, config=replace(sampled, seed=8), cache=PromptCache(tmp_path / "s3")).prompts
    assert one == two and one != other


def test_cache_key_tracks_what_decides_the_text(llm, tmp_path):
    cfg = Enhancer(model=str(llm), max_new_tokens=6)
    fp = model_fingerprint(cfg.model)
    key = cache_key(cfg, fp, "a boat")
    assert key == cache_key(cfg, model_fingerprint(cfg.model), "a boat")
    assert key != cache_key(cfg, fp, "a boat at night")
    assert key != cache_key(replace(cfg, max_new_tokens=7), fp, "a boat")
    assert key != cache_key(replace(cfg, temperature=0.5), fp, "a boat")
    assert cache_key(cfg, fp, "a boat") == cache_key(replace(cfg, seed=9), fp, "a boat")  # greedy: seed is moot
    copy = tmp_path / "llm-copy"
    copy.mkdir()
    for f in llm.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert model_fingerprint(str(copy)) == fp
    template = copy / "chat_template.jinja"
    template.write_text(template.read_text() + " ")
    assert model_fingerprint(str(copy)) != fp


def test_missing_model_is_named(llm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = film(tmp_path, llm, FILM.replace("model: llm", "model: nobody/no-such-llm"))
    with pytest.raises(EnhancerModelNotFound, match=r"'nobody/no-such-llm' not found.*hf download nobody/no-such-llm"):
        run_enhancer(load_storyboard(src))
    src.write_text(FILM.replace("model: llm", "model: ./models/llm"))
    with pytest.raises(EnhancerModelNotFound, match=r"'./models/llm' not found: no such folder.*enhance: false"):
        run_enhancer(load_storyboard(src))
    assert main(["enhance", str(src), "-q"]) == 2
    assert "error: prompt enhancer model './models/llm' not found" in capsys.readouterr().err


def test_render_records_original_and_enhanced_prompts(llm, tmp_path):
    text = """\
title: one
model: tiny
resolution: 32x32
fps: 8
seed: 2
enhancer: {model: llm, max_new_tokens: 6}
defaults: {steps: 2, base_num_frames: 17, overlap_history: 5, guidance_scale: 1.0}
shots:
  - {id: fox, prompt: a fox in the snow, frames: 9, enhance: true}
  - {id: sea, prompt: the open sea, frames: 9}
"""
    src = film(tmp_path, llm, text)
    out = tmp_path / "render"
    # `skyray render` runs the stage itself (after validation, before the video model loads).
    assert main(["render", str(src), "--executor", "local", "--device", "cpu", "--out", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    fox, sea = manifest["shots"]
    enhanced = run_enhancer(load_storyboard(src)).prompts["a fox in the snow"]  # from the cache
    assert fox["prompts"] == [enhanced] != ["a fox in the snow"] and fox["original_prompts"] == ["a fox in the snow"]
    assert [w["prompt"] for w in fox["windows"]] == [enhanced]
    assert sea["prompts"] == ["the open sea"] and sea["original_prompts"] is None

    # The written file renders the same shots: the worker gets the enhanced prompt, and the hashes match, so a
    # render into the same folder reuses both shots.
    enhance_storyboard(src, src.with_name("one.enhanced.yaml"))
    plan = compile_plan(load_storyboard(src.with_name("one.enhanced.yaml")))
    executor = LocalExecutor("tiny", "cpu")
    seen: list[str] = []
    submit = executor.submit
    executor.submit = lambda group, job, handoff: seen.append(job.prompt) or submit(group, job, handoff)
    again = render_film(plan, tmp_path / "render2", executor)
    assert seen == [enhanced, "the open sea"]
    assert again["shots"][0]["original_prompts"] == ["a fox in the snow"]
    assert [s["hash"] for s in again["shots"]] == [s["hash"] for s in manifest["shots"]]


@pytest.mark.ray
def test_ray_actor_matches_in_process(llm, tmp_path, ray_session):
    sb = load_storyboard(film(tmp_path, llm))
    local = run_enhancer(sb, cache=PromptCache(tmp_path / "local"))
    loads = EnhancerModel.loads
    remote = run_enhancer(sb, use_ray=True)
    assert EnhancerModel.loads == loads  # loaded in the actor's process, not here
    assert remote.prompts == local.prompts and remote.generated == 3
    # The actor is gone once the stage returns: nothing holds the LLM while the video model renders.
    deadline = time.monotonic() + 10
    while [a for a in ray_session.util.list_named_actors() if a.startswith(ACTOR_PREFIX)]:
        assert time.monotonic() < deadline, "the enhancer actor outlived the stage"
        time.sleep(0.1)
