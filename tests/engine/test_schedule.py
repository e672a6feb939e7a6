"""Frame arithmetic and the timestep matrix, on cases small enough to check by hand."""

from __future__ import annotations

import pytest
import torch

from skyray.engine import schedule as sch

T = [900, 600, 300]  # a 3-step template; 999 marks "not started", 0 "finished"


def test_latent_frame_arithmetic():
    assert sch.latent_frames(97) == 25
    assert sch.latent_frames(17) == 5
    assert sch.latent_frames(1) == 1
    assert sch.latent_frames(100) == 25  # not 4k+1: the last 3 frames are lost
    assert sch.video_frames(25) == 97
    assert sch.check_fresh_frames(121) == 31
    assert sch.check_added_frames(80) == 20


@pytest.mark.parametrize(
    "frames,windows,sizes",
    [
        (97, 1, [(0, 25)]),
        (257, 3, [(0, 25), (5, 20), (5, 20)]),  # 10 s at 24 fps
        (377, 5, None),  # 15 s
        (737, 9, None),  # 30 s
        (1457, 18, None),  # 60 s
        (101, 2, [(0, 25), (5, 1)]),  # a short last window
    ],
)
def test_windows_match_reference_count(frames, windows, sizes):
    total = sch.latent_frames(frames)
    ws = sch.shot_windows(total, 25, sch.prefix_latents(17, 1))
    assert len(ws) == windows == sch.reference_window_count(total, 25, 5)
    assert sum(w.new for w in ws) == total
    assert all(w.total <= 25 for w in ws)
    if sizes:
        assert [(w.prefix, w.new) for w in ws] == sizes


def test_each_full_window_adds_base_minus_overlap_frames():
    ws = sch.shot_windows(sch.latent_frames(97 + 3 * 80), 25, 5)
    assert [4 * w.new for w in ws[1:]] == [97 - 17] * 3


def test_windows_with_first_prefix_and_suffix():
    ws = sch.shot_windows(30, 25, 5, first_prefix=1, suffix=1)
    assert [(w.prefix, w.new, w.suffix) for w in ws] == [(1, 24, 0), (5, 6, 1)]


def test_prefix_rounds_down_to_whole_blocks():
    assert sch.prefix_latents(17, 1) == 5
    assert sch.prefix_latents(17, 2) == 4
    assert sch.prefix_latents(17, 5) == 5
    with pytest.raises(ValueError, match="overlap_history=5 covers 2 latents"):
        sch.prefix_latents(5, 5)


def test_sync_matrix():
    m = sch.step_matrix(T, prefix=0, new=2)
    assert m.timesteps == [[900, 900], [600, 600], [300, 300]]
    assert m.update == [[True, True]] * 3
    assert m.groups == [(0, 2)]


def test_async_matrix_by_hand():
    m = sch.step_matrix(T, prefix=1, new=3, ar_step=1)
    assert m.timesteps == [
        [0, 900, 999, 999],
        [0, 600, 900, 999],
        [0, 300, 600, 900],
        [0, 0, 300, 600],
        [0, 0, 0, 300],
    ]
    assert m.update == [
        [False, True, False, False],
        [False, True, True, False],
        [False, True, True, True],
        [False, False, True, True],
        [False, False, False, True],
    ]
    assert m.groups == [(1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("steps,blocks,ar", [(30, 5, 5), (10, 4, 2), (4, 3, 1), (6, 2, 10)])
def test_async_row_count(steps, blocks, ar):
    m = sch.step_matrix(list(range(steps, 0, -1)), prefix=0, new=blocks * 5, ar_step=ar, causal_block_size=5)
    # a block cannot wait longer than its predecessor takes to finish
    assert m.rows == steps + (blocks - 1) * min(ar, steps)


def test_prefix_and_suffix_are_never_updated():
    m = sch.step_matrix(T, prefix=2, new=3, suffix=1, ar_step=2, causal_block_size=2)
    for t_row, u_row in zip(m.timesteps, m.update):
        assert t_row[:2] == [0, 0] and t_row[-1] == 0
        assert not any(u_row[:2]) and not u_row[-1]
    # every new frame takes exactly `steps` updates, the partial last block included
    for f in range(2, 5):
        assert sum(u[f] for u in m.update) == len(T)


def test_partial_last_block_is_scheduled():
    m = sch.step_matrix(T, prefix=0, new=7, ar_step=1, causal_block_size=3)
    assert m.groups == [(0, 3), (3, 6), (6, 7)]
    assert m.rows == 3 + 2 * 1


def _reference_matrix(frames, steps, base, ar, prefix, cbs):
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    ref = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix
    return ref(None, frames, torch.tensor(steps), base, ar, prefix, cbs)


@pytest.mark.parametrize(
    "prefix,new,ar,cbs",
    [(0, 5, 0, 1), (0, 6, 2, 2), (5, 20, 5, 5), (4, 4, 1, 2), (1, 4, 3, 1), (0, 25, 5, 5)],
)
def test_matches_reference_when_blocks_align(prefix, new, ar, cbs):
    steps = [999, 937, 833, 625, 200][: 4 if ar else 5]
    ref_t, _, ref_u, _ = _reference_matrix(prefix + new, steps, prefix + new, ar, prefix, cbs)
    m = sch.step_matrix(steps, prefix, new, ar_step=ar, causal_block_size=cbs)
    assert m.timesteps == ref_t.tolist()
    assert m.update == ref_u.tolist()


def test_ar_step_too_small_for_a_window_longer_than_base():
    with pytest.raises(ValueError, match="ar_step=1 is too small"):
        sch.step_matrix(list(range(30, 0, -1)), 0, 50, ar_step=1, causal_block_size=5, base_latents=25)


def test_bad_sizes_and_frames():
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        sch.check_size(100, 64)
    with pytest.raises(ValueError, match="try 49 or 53"):
        sch.check_fresh_frames(50)
    with pytest.raises(ValueError, match="steps of 4"):
        sch.check_added_frames(10)


def test_flops_of_a_540p_window_are_in_the_published_range():
    tokens = sch.window_tokens(25, 544, 960)
    assert tokens == 51_000
    f13 = sch.transformer_flops(tokens, 512, 1536, 8960, 30)
    f14 = sch.transformer_flops(tokens, 512, 5120, 13824, 40)
    assert 0.4e15 < f13 < 0.8e15
    assert 2.5e15 < f14 < 4.5e15
