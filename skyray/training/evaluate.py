"""Render synthetic-scene chains through the real sampler and measure them with ``skyray.quality``.

Used by the model card's figures (``skyray model train-tiny --evaluate``), the quality regression test and the
hand-off bench. A chain is a run of windows of one shot, each window handing its last latents to the next:

- ``latent`` hand-off (skyray): the tail latents themselves are the next window's clean prefix; the film is
  decoded once, as one causal sequence.
- ``pixel`` hand-off (the original SkyReels-V2 scripts): every window is decoded on its own, its last
  ``overlap_history`` frames are encoded again and become the next prefix, and each later window's video drops
  those frames before it is appended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from skyray import quality
from skyray.engine.conditioning import encode_pixels
from skyray.engine.decode import StreamingDecoder
from skyray.engine.sampler import NoisePredictor, SamplerConfig, denoise_window
from skyray.engine.schedule import WindowShape, latent_frames, video_frames
from skyray.engine.text import PromptCache

Handoff = Literal["latent", "pixel"]

# The demo's geometry: 64x64 at 8 fps, windows of 17 frames (5 latents) handing over 5 frames (2 latents).
DEMO_SAMPLER = SamplerConfig(steps=10, guidance_scale=3.0, shift=3.0, addnoise_condition=20, fps=8)
BASE_FRAMES = 17
OVERLAP_FRAMES = 5
SIZE = 64


@dataclass
class Chain:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    window_frames: list[int]  # new frames each window added
    prompts: list[str]  # each window's prompt

    @property
    def joins(self) -> list[int]:
        return quality.window_joins(self.window_frames)


@torch.no_grad()
def render_chain(
    components,
    prompts: Sequence[str],
    sampler: SamplerConfig = DEMO_SAMPLER,
    seed: int = 0,
    handoff: Handoff = "latent",
    base_frames: int = BASE_FRAMES,
    overlap_frames: int = OVERLAP_FRAMES,
    size: int = SIZE,
) -> Chain:
    """One shot of ``len(prompts)`` full windows (window i uses ``prompts[i]``), rendered window by window."""
    c = components
    base, overlap = latent_frames(base_frames), latent_frames(overlap_frames)
    cache = PromptCache(c.tokenizer, c.text_encoder)
    scheduler = c.scheduler_for(sampler.shift)
    predict = NoisePredictor(c.transformer, sampler, family=c.family.name)
    gen = torch.Generator("cpu").manual_seed(seed)
    decoder = StreamingDecoder(c.vae)
    hw = (size // 8, size // 8)
    pieces: list[np.ndarray] = []
    window_frames: list[int] = []
    prefix = None
    for i, prompt in enumerate(prompts):
        shape = WindowShape(i, 0 if i == 0 else overlap, base if i == 0 else base - overlap)
        text = cache.embeds(prompt, "", sampler.guidance)
        out = denoise_window(predict, scheduler, text, shape, hw, gen, prefix=prefix)
        if handoff == "latent":
            pieces.append(decoder.push(out[:, :, shape.prefix :]))
            prefix = out[:, :, -overlap:]
        else:
            decoder.reset()
            video = decoder.push(out)
            pieces.append(video if i == 0 else video[overlap_frames:])
            tail = torch.from_numpy(video[-overlap_frames:]).permute(3, 0, 1, 2).float() / 127.5 - 1.0
            prefix = encode_pixels(c.vae, tail.unsqueeze(0))
        window_frames.append(len(pieces[-1]))
    return Chain(np.concatenate(pieces), window_frames, list(prompts))


def window_adherence(chain: Chain) -> list[float]:
    """Adherence score of each window's frames to that window's prompt."""
    return [a.score for a in window_checks(chain)]


def window_checks(chain: Chain) -> list[quality.Adherence]:
    """Each window's frames checked against that window's prompt (colour, background, direction)."""
    bounds = [0, *np.cumsum(chain.window_frames)]
    return [quality.adherence(chain.frames[lo:hi], p) for lo, hi, p in zip(bounds, bounds[1:], chain.prompts)]


def _rate(checks: Sequence[quality.Adherence], attribute: str) -> float:
    return float(np.mean([c.matches[attribute] for c in checks]))


EVAL_PROMPTS = [
    "a red square moving right on a black background",
    "a yellow circle moving left on a purple background",
    "a blue square moving down on a grey background",
    "a white circle moving up on a brown background",
    "a green circle moving right on a grey background",
    "a red circle moving up on a purple background",
]
TURNS = {"right": "down", "left": "up", "down": "left", "up": "right"}


def evaluate(model: str, seeds: Sequence[int] = (0, 1), long_windows: int = 16) -> dict[str, float]:
    """The figures a trained model is judged by (and a rerun must match within the model card's bounds)."""
    from skyray import models

    comps = models.load(model, "cpu")
    fresh, travel, seams, travel_seams = [], [], [], []
    for seed in seeds:
        for prompt in EVAL_PROMPTS:
            chain = render_chain(comps, [prompt, prompt], seed=seed)
            fresh.extend(window_checks(chain))
            seams.append(quality.seam_score(chain.frames, chain.joins).worst)
            d = quality.parse_caption(prompt)["direction"]
            turned = prompt.replace(f"moving {d}", f"moving {TURNS[d]}")
            chain = render_chain(comps, [prompt, turned], seed=seed)
            travel.append(window_checks(chain)[1])
            travel_seams.append(quality.seam_score(chain.frames, chain.joins).worst)
    long = render_chain(comps, [EVAL_PROMPTS[0]] * long_windows, seed=0)
    dr = quality.drift(long.frames, long.window_frames)
    return {
        "adherence": float(np.mean([c.score for c in fresh])),
        "travel_adherence": float(np.mean([c.score for c in travel])),
        # The parts of adherence: a model can get colours and backgrounds right and its motion wrong.
        "colour": _rate(fresh, "colour"),
        "background": _rate(fresh, "background"),
        "direction": _rate(fresh, "direction"),
        "travel_direction": _rate(travel, "direction"),
        "seam_worst_median": float(np.median(seams)),
        "travel_seam_worst_median": float(np.median(travel_seams)),
        f"long{long_windows}_adherence": float(np.mean(window_adherence(long))),
        f"long{long_windows}_seam_worst": quality.seam_score(long.frames, long.joins).worst,
        f"long{long_windows}_object_drift": dr.object_drift,
        f"long{long_windows}_background_drift": dr.background_drift,
    }


def frames_for(windows: int) -> int:
    """Frames of a chain of ``windows`` full windows (the demo geometry)."""
    base, overlap = latent_frames(BASE_FRAMES), latent_frames(OVERLAP_FRAMES)
    return video_frames(base + (windows - 1) * (base - overlap))
