"""Plan-time checks: hand-off lengths, parallel degrees against heads and tokens, and the per-GPU memory fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from skyray.cli import main
from skyray.plan import compile_plan, fit_memory
from skyray.storyboard import StoryboardError, parse_storyboard

REPO = Path(__file__).resolve().parents[1]
M14 = "Skywork/SkyReels-V2-DF-14B-720P-Diffusers"


def _line(text: str, needle: str) -> int:
    return next(n for n, s in enumerate(text.splitlines(), 1) if needle in s)


def test_child_needing_more_than_the_parents_last_window(tmp_path: Path) -> None:
    # The example: 101 frames = 26 latents, base 97 (25), overlap 17 (5): windows [0+25] [5+1], so the
    # last window holds 6 latents; a child at overlap_history 37 needs 10. The shot holds 26, so the old check
    # (against the whole shot) passed it and the worker refused it mid-render.
    text = (
        "title: t\nmodel: tiny\nresolution: 64x64\nshots:\n"
        "  - {id: a, prompt: p, frames: 101}\n"
        "  - id: b\n    continue: true\n    prompt: q\n    frames: 8\n    overlap_history: 37\n"
    )
    with pytest.raises(StoryboardError) as info:
        compile_plan(parse_storyboard(text, tmp_path, "film.yaml"))
    msg = str(info.value)
    assert msg.startswith(f"film.yaml:{_line(text, 'overlap_history: 37')}: shot 'b' field 'overlap_history':")
    assert "needs the last 10 latents of 'a', but its last window holds only 6 (5 prefix + 1 new)" in msg
    assert "at most 21 frames" in msg
    # 21 frames = 6 latents: exactly what the last window holds.
    plan = compile_plan(parse_storyboard(text.replace("overlap_history: 37", "overlap_history: 21"), tmp_path, "f"))
    assert plan.shot("b").first_prefix == 6 == plan.shot("a").last_window_latents


def _plan(tmp_path: Path, text: str, *flags: str) -> int:
    path = tmp_path / "film.yaml"
    path.write_text(text)
    return main(["plan", str(path), *flags])


def test_sequence_degree_must_divide_the_tokens_per_frame(tmp_path: Path, capsys) -> None:
    # 48x48 pixels = 3x3 = 9 tokens per latent frame; 4 GPUs are laid out as CFG 2 x ulysses 2, and 2 divides
    # the tiny model's 4 heads but not 9.
    film = "title: t\nmodel: tiny\nresolution: 48x48\nshots:\n  - {id: a, prompt: p, frames: 9}\n"
    # `skyray plan` and `skyray render` (also --dry-run) validate the layout through the same cli.group_layout.
    with pytest.raises(SystemExit) as info:
        _plan(tmp_path, film, "--gpus-per-group", "4")
    assert "ulysses 2 x ring 1) must divide the 9 tokens of each latent frame at 48x48" in str(info.value)
    # 64x64 = 16 tokens per frame: the same layout is fine, and the plan says so before anything loads.
    assert _plan(tmp_path, film.replace("48x48", "64x64"), "--gpus-per-group", "4") == 0
    assert "cfg 2 x ulysses 2 x ring 1" in capsys.readouterr().out


def test_ulysses_degree_must_divide_the_heads(tmp_path: Path) -> None:
    film = (
        f"title: t\nmodel: {M14}\nresolution: 720p\nparallel: {{ulysses: 3, cfg: false}}\n"
        "shots:\n  - {id: a, prompt: p, frames: 121}\n"
    )
    with pytest.raises(SystemExit, match="ulysses degree 3 must divide the model's 40 attention heads"):
        _plan(tmp_path, film, "--gpus-per-group", "3")


def _example(tmp_path: Path, name: str) -> Path:
    """A copy of storyboards/<name> with its assets (a short clip is made for the video extension)."""
    shutil.copytree(REPO / "storyboards" / "assets", tmp_path / "assets", dirs_exist_ok=True)
    clip = tmp_path / "assets" / "waves.mp4"
    if not clip.exists():
        import imageio_ffmpeg

        writer = imageio_ffmpeg.write_frames(str(clip), (64, 64), fps=24, macro_block_size=16)
        writer.send(None)
        for k in range(40):
            writer.send(np.full((64, 64, 3), 5 * k, np.uint8).tobytes())
        writer.close()
    shutil.copy(REPO / "storyboards" / name, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "storyboards").glob("*.yaml")))
def test_every_example_film_plans_with_a_memory_line(tmp_path: Path, name: str, capsys) -> None:
    assert main(["plan", str(_example(tmp_path, name))]) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("memory per GPU"))
    assert "GiB each): peak" in line and "activations" in line and "text encoder" in line
    assert any(f"CFG {mode}" in out for mode in ("batched", "sequential", "parallel"))  # every example is guided


FILM_14B = f"""\
title: t
model: {M14}
resolution: 720p
defaults: {{base_num_frames: 121, overlap_history: 17}}
shots:
  - id: a
    prompt: p
    frames: 121
"""


def _fit(tmp_path: Path, text: str, gib: float):
    sb = parse_storyboard(text, tmp_path, "film.yaml")
    return fit_memory(sb, compile_plan(sb), None, gib)


def test_cfg_mode_is_chosen_by_what_fits(tmp_path: Path) -> None:
    # One GPU, 14B at 720p, 31 latents = 111,600 tokens: batch 2 needs ~57 GiB, sequential ~46 GiB (its decode
    # phase), so 80 GiB batches, 50 GiB runs the branches one after the other.
    roomy, tight = _fit(tmp_path, FILM_14B, 80), _fit(tmp_path, FILM_14B, 50)
    assert roomy.shot("a").sampling.cfg_batch and roomy.memory.sequential_cfg == ()
    assert not tight.shot("a").sampling.cfg_batch and tight.memory.sequential_cfg == ("a",)
    (_, batched), (_, alone) = roomy.memory.peak, tight.memory.peak
    assert (batched.batch, alone.batch) == (2, 1) and batched.activations == 2 * alone.activations
    assert alone.peak <= 50 * 2**30 < batched.peak


def test_explicit_cfg_batch_that_cannot_fit_is_an_error(tmp_path: Path) -> None:
    text = FILM_14B.replace("overlap_history: 17}", "overlap_history: 17, cfg_batch: true}")
    with pytest.raises(StoryboardError) as info:
        _fit(tmp_path, text, 50)
    msg = str(info.value)
    assert msg.startswith("film.yaml:4: field 'defaults.cfg_batch': cfg_batch: true runs both CFG branches")
    assert "more than the 50.0 GiB available" in msg and "set cfg_batch: false" in msg
    assert _fit(tmp_path, text, 80).shot("a").sampling.cfg_batch  # it fits in 80


def test_a_film_that_cannot_fit_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(StoryboardError, match=r"field 'defaults.base_num_frames': shot 'a' cannot fit in 40.0 GiB .*\(batch 1\)"):
        _fit(tmp_path, FILM_14B, 40)
    with pytest.raises(StoryboardError, match=r"field 'model': .*the weights alone do not fit"):
        _fit(tmp_path, FILM_14B, 24)
    path = tmp_path / "film.yaml"
    path.write_text(FILM_14B)
    assert main(["plan", str(path), "--gpu-memory", "40"]) == 2  # the CLI reports it as a storyboard error
