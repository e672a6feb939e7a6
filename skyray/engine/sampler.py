"""Diffusion-forcing sampler: denoise one window, and walk a shot window by window.

A window is ``prefix`` clean latents (handed in), ``new`` latents that start as noise, and an optional clean
``suffix`` (the end-frame image).  Every row of the step matrix runs the transformer once over the whole window
(twice with CFG) at per-frame timesteps and steps the schedulers of the frames that row advances.

Random numbers come from one CPU ``torch.Generator`` per shot, drawn in a fixed order: the window's noise
``[1, 16, prefix + new, h, w]`` when the window starts, then the ``addnoise_condition`` noise for the prefix at
every row.  Its state at a window boundary is all a resumed or handed-off window needs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from skyray.engine.forward import causal_block_ids, df_forward
from skyray.engine.schedule import StepMatrix, WindowShape, step_matrix
from skyray.engine.text import TextEmbeds

LATENT_CHANNELS = 16


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling settings of one shot (resolved from the storyboard)."""

    steps: int = 30
    guidance_scale: float = 6.0
    shift: float = 8.0
    ar_step: int = 0
    causal_block_size: int = 1
    addnoise_condition: int = 0
    fps: int = 24
    causal_attention: bool = False
    # One forward of batch 2 for the CFG pair instead of two sequential forwards (equal within fp rounding).
    batched_cfg: bool = True

    @property
    def guidance(self) -> bool:
        return self.guidance_scale > 1.0


class NoisePredictor:
    """Guided velocity prediction: ``uncond + scale * (cond - uncond)``.

    ``parallel`` (an ``engine.parallel.GroupParallel``) splits the CFG pair and/or each forward's tokens over the
    ranks of a GPU group; without it the whole prediction runs here.
    """

    def __init__(self, transformer, config: SamplerConfig, parallel=None) -> None:
        self.transformer = transformer
        self.config = config
        self.parallel = parallel
        self.forwards = 0

    def _forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, block_ids) -> torch.Tensor:
        shard = self.parallel.sequence if self.parallel is not None else None
        self.forwards += x.shape[0]
        return df_forward(self.transformer, x, t, text, self.config.fps, block_ids, shard)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbeds, block_ids=None) -> torch.Tensor:
        cfg = self.config
        if text.uncond is None:
            return self._forward(x, t, text.cond, block_ids)
        if self.parallel is not None and self.parallel.cfg_split:
            mine = text.cond if self.parallel.cfg_rank == 0 else text.uncond
            cond, uncond = self.parallel.exchange_cfg(self._forward(x, t, mine, block_ids))
        elif cfg.batched_cfg:
            both = self._forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text.cond, text.uncond]), block_ids)
            cond, uncond = both.chunk(2)
        else:
            cond = self._forward(x, t, text.cond, block_ids)
            uncond = self._forward(x, t, text.uncond, block_ids)
        return uncond + cfg.guidance_scale * (cond - uncond)


def step_template(scheduler, steps: int) -> list[int]:
    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps)
    return [int(t) for t in s.timesteps]


def draw_noise(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    # Always drawn on the CPU in fp32: the same numbers on every device and every rank of a group.
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@torch.no_grad()
def denoise_window(
    predict: NoisePredictor,
    scheduler,
    text: TextEmbeds,
    window: WindowShape,
    latent_hw: tuple[int, int],
    generator: torch.Generator,
    prefix: torch.Tensor | None = None,
    suffix: torch.Tensor | None = None,
    on_row: Callable[[int, int], None] | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise one window; returns its latents [1, 16, prefix + new + suffix, h, w] in fp32.

    ``noise`` replaces the window's draw from ``generator`` (the reference crashes when given ``latents=``).
    """
    cfg = predict.config
    device = next(predict.transformer.parameters()).device
    dtype = next(predict.transformer.parameters()).dtype
    h, w = latent_hw
    if (prefix is None) != (window.prefix == 0) or (prefix is not None and prefix.shape[2] != window.prefix):
        raise ValueError(f"window {window.index} expects {window.prefix} prefix latents")
    if (suffix is None) != (window.suffix == 0):
        raise ValueError(f"window {window.index} expects {window.suffix} suffix latents")

    shape = (1, LATENT_CHANNELS, window.prefix + window.new, h, w)
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise for window {window.index} must have shape {shape}, got {tuple(noise.shape)}")
    latents = (draw_noise(generator, shape) if noise is None else noise.float()).to(device)
    if prefix is not None:
        latents[:, :, : window.prefix] = prefix.to(device, torch.float32)
    if suffix is not None:
        latents = torch.cat([latents, suffix.to(device, torch.float32)], dim=2)

    template = step_template(scheduler, cfg.steps)
    matrix = step_matrix(template, window.prefix, window.new, window.suffix, cfg.ar_step, cfg.causal_block_size)
    blocks = (
        causal_block_ids(window.prefix, window.new, window.suffix, cfg.causal_block_size)
        if cfg.causal_attention
        else None
    )
    schedulers = _group_schedulers(scheduler, matrix, cfg.steps)
    text = text.to(device, dtype)
    noise_factor = cfg.addnoise_condition / 1000.0

    for r in range(matrix.rows):
        t = torch.tensor(matrix.timesteps[r], dtype=torch.long, device=device)
        x = latents.to(dtype).clone()
        t_in = t.unsqueeze(0).clone()
        if cfg.addnoise_condition > 0 and window.prefix > 0:
            # The model sees a lightly re-noised copy of the prefix (robust to error build-up across windows);
            # the stored prefix stays clean.
            p = window.prefix
            eps = draw_noise(generator, (1, LATENT_CHANNELS, p, h, w)).to(device, dtype)
            x[:, :, :p] = x[:, :, :p] * (1.0 - noise_factor) + eps * noise_factor
            t_in[:, :p] = cfg.addnoise_condition
        velocity = predict(x, t_in, text, blocks)
        for (s, e), sched in zip(matrix.groups, schedulers):
            if matrix.update[r][s]:
                latents[:, :, s:e] = sched.step(velocity[:, :, s:e], t[s], latents[:, :, s:e], return_dict=False)[0]
        if on_row is not None:
            on_row(r, matrix.rows)
    return latents


def _group_schedulers(scheduler, matrix: StepMatrix, steps: int) -> list:
    out = []
    for _ in matrix.groups:
        s = copy.deepcopy(scheduler)
        s.set_timesteps(steps)
        out.append(s)
    return out


@dataclass
class WindowResult:
    window: WindowShape
    new: torch.Tensor  # [1, 16, new, h, w]: the latents this window adds to the shot
    tail: torch.Tensor  # the last latents of the window (prefix + new), for the next window or shot


def iter_shot(
    predict: NoisePredictor,
    scheduler,
    texts: list[TextEmbeds],
    windows: list[WindowShape],
    latent_hw: tuple[int, int],
    generator: torch.Generator,
    first_prefix: torch.Tensor | None = None,
    suffix: torch.Tensor | None = None,
    tail_latents: int = 0,
    on_row: Callable[[int, int, int], None] | None = None,
) -> Iterator[WindowResult]:
    """Render a shot window by window, keeping only the hand-off tail between windows (memory stays flat).

    ``texts[i]`` is window i's prompt embedding (prompt travel); ``tail_latents`` is how many trailing latents
    each result keeps for whoever continues (at least the next window's prefix).
    """
    prefix = first_prefix
    for w in windows:
        out = denoise_window(
            predict,
            scheduler,
            texts[min(w.index, len(texts) - 1)],
            w,
            latent_hw,
            generator,
            prefix=prefix[:, :, -w.prefix :] if w.prefix else None,
            suffix=suffix if w.suffix else None,
            on_row=(lambda r, n, i=w.index: on_row(i, r, n)) if on_row else None,
        )
        body = out[:, :, : w.prefix + w.new]
        keep = max(tail_latents, *(x.prefix for x in windows))
        yield WindowResult(w, body[:, :, w.prefix :].clone(), body[:, :, -keep:].clone())
        prefix = body[:, :, -keep:]


def sample_shot(
    predict: NoisePredictor,
    scheduler,
    texts: list[TextEmbeds],
    windows: list[WindowShape],
    latent_hw: tuple[int, int],
    generator: torch.Generator,
    first_prefix: torch.Tensor | None = None,
    suffix: torch.Tensor | None = None,
) -> torch.Tensor:
    """All latents of a shot in frame order: the first prefix (if any) followed by every window's new latents."""
    parts = [] if first_prefix is None else [first_prefix.to(torch.float32)]
    for res in iter_shot(predict, scheduler, texts, windows, latent_hw, generator, first_prefix, suffix):
        parts.append(res.new.to(parts[0].device if parts else res.new.device))
    return torch.cat(parts, dim=2)
