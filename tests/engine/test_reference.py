"""Our sampler against diffusers' SkyReels-V2 diffusion-forcing pipelines on the tiny model.

Same components, seed and settings; the reference runs with output_type="latent". Where the reference is wrong
(three documented bugs), the tests show the reference's behaviour and ours side by side.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from skyray.engine import sampler as S
from skyray.engine.conditioning import encode_image, encode_video_tail
from skyray.engine.schedule import latent_frames, prefix_latents, shot_windows
from skyray.engine.text import PromptCache

H = W = 32
HW = (H // 8, W // 8)
SEED = 7
PROMPT, NEG = "a red fox runs through snow", "blurry, low quality"
TOL = 1e-4


@pytest.fixture
def pipes(tiny):
    from diffusers import (
        SkyReelsV2DiffusionForcingImageToVideoPipeline,
        SkyReelsV2DiffusionForcingPipeline,
        SkyReelsV2DiffusionForcingVideoToVideoPipeline,
    )

    parts = dict(
        tokenizer=tiny.tokenizer,
        text_encoder=tiny.text_encoder,
        transformer=tiny.transformer,
        vae=tiny.vae,
        scheduler=tiny.scheduler_for(8.0),
    )
    out = {
        "t2v": SkyReelsV2DiffusionForcingPipeline(**parts),
        "i2v": SkyReelsV2DiffusionForcingImageToVideoPipeline(**parts),
        "v2v": SkyReelsV2DiffusionForcingVideoToVideoPipeline(**parts),
    }
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    yield out
    # The reference switches the shared transformer's causal mask on and never off (a quirk we do not copy).
    tiny.transformer.register_to_config(num_frame_per_block=1)


def ref_kwargs(frames, base=97, overlap=None, steps=4, ar_step=0, cbs=None, addnoise=0):
    return dict(
        prompt=PROMPT,
        negative_prompt=NEG,
        height=H,
        width=W,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=6.0,
        base_num_frames=base,
        overlap_history=overlap,
        ar_step=ar_step,
        causal_block_size=cbs,
        addnoise_condition=addnoise,
        fps=24,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(SEED),
    )


def ours(tiny, windows, steps=4, ar_step=0, cbs=1, addnoise=0, first_prefix=None, suffix=None, causal=None, **kw):
    cfg = S.SamplerConfig(
        steps=steps,
        guidance_scale=6.0,
        ar_step=ar_step,
        causal_block_size=cbs,
        addnoise_condition=addnoise,
        fps=24,
        causal_attention=cbs > 1 if causal is None else causal,
        **kw,
    )
    text = PromptCache(tiny.tokenizer, tiny.text_encoder).embeds(PROMPT, NEG, True)
    gen = torch.Generator("cpu").manual_seed(SEED)
    return S.sample_shot(
        S.NoisePredictor(tiny.transformer, cfg), tiny.scheduler_for(8.0), [text], windows, HW, gen, first_prefix, suffix
    )


def fresh_windows(frames, base, overlap, cbs=1, first_prefix=0):
    total = latent_frames(frames)
    b = latent_frames(base) if frames > base else total
    handoff = prefix_latents(overlap, cbs) if frames > base else 0
    return shot_windows(total - first_prefix, b, handoff, first_prefix)


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_t2v_short_sync(tiny, pipes):
    ref = pipes["t2v"](**ref_kwargs(17)).frames
    assert max_diff(ref, ours(tiny, fresh_windows(17, 97, 17))) <= TOL


def test_t2v_short_sequential_cfg_matches_too(tiny, pipes):
    ref = pipes["t2v"](**ref_kwargs(17)).frames
    assert max_diff(ref, ours(tiny, fresh_windows(17, 97, 17), batched_cfg=False)) <= TOL


def test_t2v_long_three_windows(tiny, pipes):
    windows = fresh_windows(49, 17, 5)
    assert len(windows) >= 3
    ref = pipes["t2v"](**ref_kwargs(49, base=17, overlap=5)).frames
    assert max_diff(ref, ours(tiny, windows)) <= TOL


def test_t2v_long_with_addnoise(tiny, pipes, monkeypatch):
    # The reference draws addnoise noise from the global RNG; route it through the pipeline's generator so both
    # consume one stream in the same order (ours never touches the global RNG).
    kw = ref_kwargs(41, base=17, overlap=5, addnoise=20)
    gen = kw["generator"]
    monkeypatch.setattr(torch, "randn_like", lambda x, **_: torch.randn(x.shape, generator=gen, dtype=x.dtype))
    ref = pipes["t2v"](**kw).frames
    monkeypatch.undo()
    assert max_diff(ref, ours(tiny, fresh_windows(41, 17, 5), addnoise=20)) <= TOL


def test_async_causal_blocks(tiny, pipes):
    # 16 latents, windows of 8, overlap 4, blocks of 2: aligned, so the reference is right here.
    windows = fresh_windows(61, 29, 13, cbs=2)
    assert len(windows) == 3
    ref = pipes["t2v"](**ref_kwargs(61, base=29, overlap=13, ar_step=2, cbs=2)).frames
    assert max_diff(ref, ours(tiny, windows, ar_step=2, cbs=2)) <= TOL


def _image(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))


def test_i2v(tiny, pipes):
    img = _image(1)
    ref = pipes["i2v"](image=img, **ref_kwargs(17)).frames
    first = encode_image(tiny.vae, img, H, W)
    assert max_diff(ref, ours(tiny, fresh_windows(17, 97, 17, first_prefix=1), first_prefix=first)) <= TOL


def test_i2v_long(tiny, pipes):
    img = _image(1)
    ref = pipes["i2v"](image=img, **ref_kwargs(41, base=17, overlap=5)).frames
    first = encode_image(tiny.vae, img, H, W)
    got = ours(tiny, fresh_windows(41, 17, 5, first_prefix=1), first_prefix=first)
    assert max_diff(ref, got) <= TOL


def test_first_and_last_frame(tiny, pipes):
    first_img, last_img = _image(1), _image(2)
    ref = pipes["i2v"](image=first_img, last_image=last_img, **ref_kwargs(17)).frames
    first = encode_image(tiny.vae, first_img, H, W)
    last = encode_image(tiny.vae, last_img, H, W)
    windows = shot_windows(4, 5, 0, first_prefix=1)
    windows[-1] = S.WindowShape(windows[-1].index, windows[-1].prefix, windows[-1].new, 1)
    # With output_type="latent" the reference keeps the end image's latent at the end; we drop it (it is not a
    # generated frame and must not be decoded into the shot).
    assert max_diff(ref[:, :, -1:], last) <= TOL
    assert max_diff(ref[:, :, :-1], ours(tiny, windows, first_prefix=first, suffix=last)) <= TOL


def test_video_extension(tiny, pipes):
    clip = [_image(10 + i) for i in range(21)]
    ref = pipes["v2v"](video=clip, **ref_kwargs(41, base=29, overlap=17)).frames
    prefix = prefix_latents(17, 1)
    tail = encode_video_tail(tiny.vae, clip, 17, prefix, H, W)
    windows = shot_windows(latent_frames(41) - prefix, latent_frames(29), prefix, first_prefix=prefix)
    got = ours(tiny, windows, first_prefix=tail)
    # The reference returns the clip's tail latents followed by the extension; so do we.
    assert max_diff(ref, got) <= TOL


# ------------------------------------------------------------------------------------ the reference's bugs


def test_bug_partial_last_block_left_as_noise(tiny, pipes):
    # 7 latents in blocks of 3: the reference floors to 2 blocks and returns latent 6 as its initial noise.
    ref = pipes["t2v"](**ref_kwargs(25, ar_step=1, cbs=3)).frames
    noise = torch.randn((1, 16, 7, *HW), generator=torch.Generator("cpu").manual_seed(SEED))
    assert torch.equal(ref[:, :, 6], noise[:, :, 6])
    got = ours(tiny, fresh_windows(25, 97, 17, cbs=3), ar_step=1, cbs=3)
    assert got.shape == ref.shape
    # Ours denoises the partial block: far from its starting noise, in the same range as the other latents.
    assert (got[:, :, 6] - noise[:, :, 6]).abs().mean() > 0.1
    assert got[:, :, 6].std() < 3 * got[:, :, :6].std()


def test_bug_explicit_latents_crash(tiny, pipes):
    noise = torch.randn((1, 16, 5, *HW), generator=torch.Generator("cpu").manual_seed(123))
    with pytest.raises((ValueError, TypeError)):
        pipes["t2v"](latents=noise, **ref_kwargs(17))
    cfg = S.SamplerConfig(steps=4)
    text = PromptCache(tiny.tokenizer, tiny.text_encoder).embeds(PROMPT, NEG, True)
    w = shot_windows(5, 5, 0)[0]
    pred = S.NoisePredictor(tiny.transformer, cfg)
    explicit = S.denoise_window(pred, tiny.scheduler_for(8.0), text, w, HW, torch.Generator(), noise=noise)
    drawn = S.denoise_window(pred, tiny.scheduler_for(8.0), text, w, HW, torch.Generator().manual_seed(123))
    assert torch.equal(explicit, drawn)


def test_bug_join_drops_generated_latents_after_truncation(tiny, pipes):
    # overlap 17 frames = 5 latents, blocks of 2: the prefix is truncated to 4 latents. The reference takes
    # latents[-5:-1] as the next prefix yet drops 5 latents of the new window, so the film jumps from the old
    # window's last latent to a latent generated after a *different* one. We hand over the last 4 latents and
    # drop exactly those 4.
    captured = {}

    def grab(pipe, i, t, kw):
        captured.setdefault(len(captured), kw["latents"][:, :, :4].clone()) if i == 0 else None
        return {}

    kw = ref_kwargs(61, base=29, overlap=17, ar_step=2, cbs=2)
    ref = pipes["t2v"](callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"], **kw).frames
    first_window_ref = ref[:, :, :8]
    ref_prefix_of_window_2 = captured[1]
    assert torch.equal(ref_prefix_of_window_2, first_window_ref[:, :, -5:-1])  # not the tail

    windows = fresh_windows(61, 29, 17, cbs=2)
    assert [w.prefix for w in windows[1:]] == [4] * (len(windows) - 1)
    cfg = S.SamplerConfig(steps=4, ar_step=2, causal_block_size=2, causal_attention=True)
    text = PromptCache(tiny.tokenizer, tiny.text_encoder).embeds(PROMPT, NEG, True)
    pred = S.NoisePredictor(tiny.transformer, cfg)
    gen = torch.Generator("cpu").manual_seed(SEED)
    results = list(S.iter_shot(pred, tiny.scheduler_for(8.0), [text], windows, HW, gen))
    assert sum(r.new.shape[2] for r in results) == latent_frames(61)
    # Replay the first two windows by hand: window 2 continues from exactly the last 4 latents of window 1.
    gen = torch.Generator("cpu").manual_seed(SEED)
    w0 = S.denoise_window(pred, tiny.scheduler_for(8.0), text, windows[0], HW, gen)
    w1 = S.denoise_window(pred, tiny.scheduler_for(8.0), text, windows[1], HW, gen, prefix=w0[:, :, -4:])
    assert torch.equal(results[0].new, w0)
    assert torch.equal(results[1].new, w1[:, :, 4:])
