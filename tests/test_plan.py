"""The plan: chains, shots and windows worked out by hand, their cost, and the errors only the layout reveals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sample_film import FILM

from skyray.engine import schedule
from skyray.models import FAMILIES
from skyray.plan import compile_plan, format_plan
from skyray.storyboard import Storyboard, StoryboardError, load_storyboard, parse_storyboard

REPO = Path(__file__).resolve().parents[1]


def plan_of(folder: Path, text: str = FILM):
    return compile_plan(parse_storyboard(text, folder, "film.yaml"))


def layout(shot) -> list[tuple[int, int, int]]:
    return [(w.prefix, w.new, w.suffix) for w in shot.windows]


def test_shots_windows_and_chains_by_hand(folder: Path) -> None:
    plan = plan_of(folder)
    assert (plan.width, plan.height, plan.fps, plan.family) == (64, 64, 8, "tiny")
    open_, follow, portrait, branch = plan.shots

    assert (open_.frames, open_.first_prefix, open_.new_latents, open_.handoff_latents) == (25, 0, 7, 2)
    assert layout(open_) == [(0, 5, 0), (2, 2, 0)]
    assert [w.prompt for w in open_.windows] == ["dawn", "noon"]
    assert [(w.rows, w.forwards) for w in open_.windows] == [(3, 6), (3, 6)]  # sync: steps rows, CFG doubles
    assert open_.continues is None and open_.seed == 7 and open_.fade_in == 0.0

    assert (follow.continues, follow.frames, follow.first_prefix, follow.new_latents) == ("open", 16, 2, 4)
    assert layout(follow) == [(2, 3, 0), (2, 1, 0)]
    assert [w.prompt for w in follow.windows] == ["dusk", "dusk"]
    assert follow.sampling.steps == 2 and [w.forwards for w in follow.windows] == [4, 4]
    assert follow.seed == 8

    assert (portrait.frames, portrait.duration, portrait.first_prefix, portrait.new_latents) == (17, 2.0, 1, 4)
    assert layout(portrait) == [(1, 4, 1)]
    assert portrait.image == portrait.end_image == str((folder / "still.png").resolve())
    assert (portrait.seed, portrait.fade_in, portrait.continues) == (100, 0.5, None)

    assert (branch.continues, branch.frames, branch.new_latents) == ("open", 12, 3)
    assert layout(branch) == [(2, 3, 0)]
    # async: 3 blocks of 1 latent, each one step behind the last: 3 + 2 rows; guidance 1 means no CFG pass
    assert (branch.windows[0].rows, branch.forwards) == (5, 5)
    assert branch.sampling.guidance_scale == 1.0 and branch.sampling.ar_step == 1 and branch.sampling.shift == 8.0

    assert [c.shot_ids for c in plan.chains] == [("open", "follow", "branch"), ("portrait",)]
    assert plan.frames == 25 + 16 + 17 + 12 == sum(s.frames for s in plan.shots)
    assert plan.seconds == pytest.approx(70 / 8) and portrait.seconds == pytest.approx(17 / 8)
    assert plan.forwards == 12 + 8 + 6 + 5
    assert plan.shot("branch") is branch


def test_tflops_follow_the_window_tokens(folder: Path) -> None:
    plan = plan_of(folder)
    fam, w = FAMILIES["tiny"], plan.shot("portrait").windows[0]
    tokens = schedule.window_tokens(6, 64, 64)  # 1 image + 4 new + 1 end-image latents of 4x4 patches
    assert tokens == 6 * 16
    per_forward = schedule.transformer_flops(tokens, fam.text_len, fam.dim, fam.ffn_dim, fam.layers)
    assert w.tflops == pytest.approx(w.forwards * per_forward / 1e12)
    assert plan.tflops == pytest.approx(sum(w.tflops for s in plan.shots for w in s.windows))


def test_storyboard_hash_is_stable_and_tracks_changes(folder: Path) -> None:
    first, again = plan_of(folder), plan_of(folder)
    assert first.storyboard_hash == again.storyboard_hash and len(first.storyboard_hash) == 64
    assert plan_of(folder, FILM.replace("seed: 100", "seed: 101")).storyboard_hash != first.storyboard_hash


def test_format_plan_states_mfu_and_totals(folder: Path) -> None:
    text = format_plan(plan_of(folder), mfu=0.5, peak_tflops=1000)
    assert "50% MFU of 1000 TFLOP/s" in text
    assert "chain 0: open; open -> follow, open -> branch" in text and "chain 1: portrait" in text
    total = next(line for line in text.splitlines() if line.startswith("total"))
    assert total.split()[:5] == ["total", "70", "8.75", "6", "31"]
    assert "2 s asked -> 17 frames" in text


def test_more_prompts_than_windows(folder: Path) -> None:
    text = FILM.replace("prompt: a face", "prompt: [a face, a smile]")
    with pytest.raises(StoryboardError) as info:
        plan_of(folder, text)
    line = next(n for n, s in enumerate(text.splitlines(), 1) if "a smile" in s)
    assert str(info.value).startswith(
        f"film.yaml:{line}: shot 'portrait' field 'prompt': 2 prompts but the shot has only 1 window"
    )
    # 21 frames = 6 latents: the image, 4 in the first window, 1 in a second
    assert "at least 21 frames" in str(info.value)
    assert len(plan_of(folder, text.replace("duration: 2.0", "frames: 21")).shot("portrait").windows) == 2


def test_handoff_longer_than_the_continued_shot(folder: Path) -> None:
    text = FILM.replace("frames: 25", "frames: 1").replace("prompt: [dawn, noon]", "prompt: dawn")
    with pytest.raises(StoryboardError) as info:
        plan_of(folder, text)
    line = next(n for n, s in enumerate(text.splitlines(), 1) if "continue: true" in s)
    assert str(info.value).startswith(
        f"film.yaml:{line}: shot 'follow' field 'continue': needs the last 2 latents of 'open'"
    )


def test_unknown_model_names_its_line(folder: Path) -> None:
    text = FILM.replace("title: Test film\n", "title: Test film\nmodel: Someone/else\n")
    with pytest.raises(StoryboardError, match=r"^film.yaml:2: field 'model': cannot tell the model family"):
        plan_of(folder, text)


def test_unresolved_storyboard_is_refused() -> None:
    sb = Storyboard.model_validate({"title": "t", "shots": [{"id": "a", "prompt": "p", "frames": 5}]})
    with pytest.raises(ValueError, match="resolved storyboard"):
        compile_plan(sb)


def test_video_extension_takes_its_prefix_from_the_clip(folder: Path) -> None:
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(folder / "clip.mp4"), (64, 64), fps=8, macro_block_size=16)
    writer.send(None)
    for k in range(10):
        writer.send(np.full((64, 64, 3), 20 * k, np.uint8).tobytes())
    writer.close()
    text = FILM.replace("    image: still.png\n", "    video: clip.mp4\n").replace("duration: 2.0", "frames: 8")
    shot = plan_of(folder, text).shot("portrait")
    # 10 frames -> 9 usable (4k+1) -> min(overlap 5, 9) = 5 frames -> 2 clean latents, then 2 new latents
    assert (shot.video_frames, shot.first_prefix, shot.new_latents, shot.frames) == (10, 2, 2, 8)
    assert layout(shot) == [(2, 2, 1)]


def test_demo_film(folder: Path) -> None:
    plan = compile_plan(load_storyboard(REPO / "storyboards" / "demo.yaml"))
    assert (plan.width, plan.height, plan.fps, plan.seed, plan.model) == (64, 64, 8, 42, "tiny-trained")
    assert [s.id for s in plan.shots] == ["opening", "drift", "cut"]
    assert [layout(s) for s in plan.shots] == [[(0, 5, 0), (2, 2, 0)], [(2, 3, 0), (2, 1, 0)], [(0, 3, 0)]]
    assert len(set(w.prompt for w in plan.shot("opening").windows)) == 2
    assert plan.shot("drift").continues == "opening" and plan.shot("cut").fade_in == 0.25
    assert [c.shot_ids for c in plan.chains] == [("opening", "drift"), ("cut",)]
    assert plan.frames == 50 and all(s.sampling.steps == 10 for s in plan.shots)
