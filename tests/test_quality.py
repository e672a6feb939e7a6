"""skyray.quality on constructed clips: procedural scenes whose truth is known (a jump, a drift, a turn)."""

from __future__ import annotations

import numpy as np
import pytest

from skyray import quality
from skyray.training.scenes import BACKGROUNDS, Scene, random_scene, render_clip


def scene(**kw) -> Scene:
    base = dict(colour="red", shape="square", background="black", direction="right", x=20.0, y=30.0)
    return Scene(**{**base, **kw})


def test_a_smooth_clip_has_no_seam_and_a_cut_is_a_large_one():
    frames, _ = render_clip(scene(), 29)
    smooth = quality.seam_score(frames, [17])
    assert smooth.ratios == pytest.approx([1.0], abs=0.15)

    other, _ = render_clip(scene(colour="yellow", background="purple", direction="up"), 12)
    cut = quality.seam_score(np.concatenate([frames[:17], other]), [17])
    assert cut.worst > 10
    assert cut.within == pytest.approx(smooth.within)


def test_a_known_jump_is_found_at_its_join_only():
    frames, _ = render_clip(scene(), 41)
    jumped = frames.copy()
    jumped[29:] = np.roll(frames[29:], 12, axis=2)  # the object jumps 12 px right at frame 29
    report = quality.seam_score(jumped, [17, 29])
    assert report.ratios[0] == pytest.approx(1.0, abs=0.15)
    assert report.ratios[1] > 3
    assert report.joins == [17, 29]


def test_seam_rejects_a_join_outside_the_clip():
    frames, _ = render_clip(scene(), 9)
    with pytest.raises(ValueError, match="join at frame 9"):
        quality.seam_score(frames, [9])


def test_window_joins_are_cumulative_frame_counts():
    assert quality.window_joins([17, 12, 12]) == [17, 29]


def test_a_known_colour_drift_is_measured():
    frames, _ = render_clip(scene(background="grey"), 17 + 12 * 3)
    steady = quality.drift(frames, [17, 12, 12, 12])
    assert steady.object_drift < 2 and steady.background_drift < 2 and steady.area_drift < 0.1

    drifted = frames.astype(np.int16)
    for lo in (17, 29, 41):
        drifted[lo:] += 10  # every window 10 levels brighter than the one before
    drifted = np.clip(drifted, 0, 255).astype(np.uint8)
    report = quality.drift(drifted, [17, 12, 12, 12])
    # Three steps of +10 on every channel: sqrt(3) * 30 for the background (the red object's R is clipped).
    assert report.background_drift == pytest.approx(np.sqrt(3) * 30, abs=1.0)
    assert 30 < report.object_drift < np.sqrt(3) * 30 + 1
    assert np.diff([b[1] for b in report.background_rgb]) == pytest.approx([10, 10, 10], abs=0.5)


def test_drift_checks_the_window_sizes_add_up():
    frames, _ = render_clip(scene(), 17)
    with pytest.raises(ValueError, match="cover 18 frames"):
        quality.drift(frames, [9, 9])


def test_the_detector_reads_every_procedural_scene_right():
    rng = np.random.default_rng(0)
    for _ in range(30):
        s = random_scene(rng)
        frames, _ = render_clip(s, 17)
        a = quality.adherence(frames, s.caption())
        assert a.matches == {"colour": True, "background": True, "direction": True}, (s, a.detected)
        assert a.score == 1.0


def test_the_detector_follows_an_object_across_the_wrap_around():
    frames, _ = render_clip(scene(direction="left", x=3.0), 9)  # leaves at the left edge, comes back right
    det = quality.detect(frames)
    assert det.direction == "left"
    assert det.velocity[0] == pytest.approx(-2.0, abs=0.2) and abs(det.velocity[1]) < 0.2


def test_adherence_scores_a_wrong_prompt_low():
    frames, _ = render_clip(scene(), 17)
    a = quality.adherence(frames, "a blue circle moving up on a brown background")
    assert a.score == 0.0
    assert quality.adherence(frames, "a red circle moving up on a brown background").score == pytest.approx(1 / 3)


def test_a_still_or_empty_clip_has_no_direction_or_colour():
    bg = np.array(BACKGROUNDS["grey"], dtype=np.uint8)
    empty = np.broadcast_to(bg, (5, 64, 64, 3)).copy()
    det = quality.detect(empty)
    assert det.colour is None and det.direction is None and det.background == "grey"
    still = np.repeat(render_clip(scene(), 1)[0], 5, axis=0)
    assert quality.detect(still).direction is None
