"""Diffusion-forcing sampler: denoise one window, and walk a shot window by window.

A window is ``prefix`` clean latents (handed in), ``new`` latents that start as noise, and an optional clean
``suffix`` (the end-frame image).  Every row of the step matrix runs the transformer once over the whole window
(twice with CFG) at per-frame timesteps and steps the schedulers of the frames that row advances.

Random numbers come from one CPU ``torch.Generator`` per shot, drawn in a fixed order: the window's noise
``[1, 16, prefix + new, h, w]`` when the window starts, then the ``addnoise_condition`` noise for the prefix at
every row.  Its state at a window boundary is all a resumed or handed-off window needs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from skyray.engine.forward import (
    Geometry,
    TextContext,
    causal_block_ids,
    compiled_block,
    df_forward,
    text_context,
    window_geometry,
)
from skyray.engine.schedule import StepMatrix, WindowShape, step_matrix
from skyray.engine.teacache import WindowTeaCache
from skyray.engine.text import TextEmbeds

AttentionKernel = Literal["sdpa", "flash", "xfuser"]

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
    # TeaCache threshold (``engine.teacache``): skip the block stack while the rescaled change of the time
    # embedding adds up to less than this; 0 is off.
    teacache: float = 0.0
    # torch.compile the transformer block function (``forward.compiled_block``).
    compile: bool = False
    # Attention kernel: "sdpa" (torch picks), "flash" (torch's flash kernel only; CUDA, bf16/fp16, no mask) or
    # "xfuser" (yunchang/xfuser long-context attention of a sequence-parallel group).
    attention: AttentionKernel = "sdpa"
    # Move the text encoder to the CPU after encoding and the transformer before decoding (read by the worker).
    offload: bool = False

    @property
    def guidance(self) -> bool:
        return self.guidance_scale > 1.0


class NoisePredictor:
    """Guided velocity prediction: ``uncond + scale * (cond - uncond)``.

    ``parallel`` (an ``engine.parallel.GroupParallel``) splits the CFG pair and/or each forward's tokens over the
    ranks of a GPU group; without it the whole prediction runs here.  ``family`` (``ModelFamily.name``) picks the
    TeaCache coefficients.  ``start_window`` forgets what the forwards of one window share (rope angles, mask,
    text keys and values, TeaCache state); ``denoise_window`` calls it.  ``forwards`` counts transformer
    forwards (batch items), ``skipped`` those of them whose block stack TeaCache replaced by its cached residual.
    """

    def __init__(self, transformer, config: SamplerConfig, parallel=None, family: str = "custom") -> None:
        self.transformer = transformer
        self.config = config
        self.parallel = parallel
        self.family = family
        self.forwards = 0
        self.skipped = 0
        self._check_attention()
        self._block_fn = compiled_block() if config.compile else None
        self.start_window(0)

    def _check_attention(self) -> None:
        cfg = self.config
        if cfg.attention == "sdpa":
            return
        param = self.transformer.patch_embedding.weight  # not the first parameter: that one stays fp32
        if cfg.attention == "flash":
            if param.device.type != "cuda":
                raise ValueError(
                    f"attention 'flash' needs a CUDA GPU (torch's flash-attention kernel); the transformer is on "
                    f"{param.device.type}: use attention 'sdpa'"
                )
            if param.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(f"attention 'flash' needs a bf16 or fp16 transformer, this one is {param.dtype}")
            if cfg.causal_attention:
                raise ValueError("attention 'flash' takes no mask: causal_attention needs attention 'sdpa'")
        elif cfg.attention == "xfuser":
            from skyray.engine.parallel import xfuser_status

            ok, why = xfuser_status()
            if not ok:
                raise ValueError(f"attention 'xfuser' is unavailable here: {why}")
            if getattr(getattr(self.parallel, "sequence", None), "attention", None) is None:
                raise ValueError(
                    "attention 'xfuser' is yunchang/xfuser's sequence-parallel attention: it needs a group with "
                    "sequence parallelism built with attention='xfuser' (gpus_per_group > 1); use 'sdpa' or "
                    "'flash' on one GPU"
                )
        else:
            raise ValueError(f"attention must be 'sdpa', 'flash' or 'xfuser', got {cfg.attention!r}")

    def start_window(self, rows: int) -> None:
        """A new window of ``rows`` rows starts: drop the previous window's shared state."""
        self._geometry: dict[tuple, Geometry] = {}
        self._text: dict[str, tuple[tuple[torch.Tensor, ...], TextContext]] = {}
        self._teacache = WindowTeaCache(self.config.teacache, self.family, rows) if self.config.teacache > 0 else None

    def _context(self, key: str, *parts: torch.Tensor) -> TextContext:
        held = self._text.get(key)
        if held is None or len(held[0]) != len(parts) or any(a is not b for a, b in zip(held[0], parts)):
            text = parts[0] if len(parts) == 1 else torch.cat(parts)
            held = self._text[key] = (parts, text_context(self.transformer, text))
        return held[1]

    def _forward(self, x: torch.Tensor, t: torch.Tensor, key: str, text: TextContext, block_ids) -> torch.Tensor:
        shard = self.parallel.sequence if self.parallel is not None else None
        self.forwards += x.shape[0]
        gkey = (tuple(x.shape), None if block_ids is None else tuple(block_ids), id(shard))
        if gkey not in self._geometry:
            self._geometry[gkey] = window_geometry(self.transformer, tuple(x.shape), x.device, block_ids, shard)
        cache = self._teacache.branch(key) if self._teacache is not None else None
        skipped = cache.skipped if cache is not None else 0
        with self._attention_kernel():
            out = df_forward(
                self.transformer, x, t, text, self.config.fps, block_ids, shard,
                geometry=self._geometry[gkey], block_cache=cache, block_fn=self._block_fn,
            )
        if cache is not None and cache.skipped > skipped:
            self.skipped += x.shape[0]
        return out

    def _attention_kernel(self):
        if self.config.attention == "flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
        return contextlib.nullcontext()

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, text: TextEmbeds, block_ids=None, row: int | None = None
    ) -> torch.Tensor:
        """Guided velocity at ``row`` of the current window (``None``: outside a window; TeaCache computes)."""
        cfg = self.config
        if self._teacache is not None:
            self._teacache.at_row(0 if row is None else row)
        if text.uncond is None:
            return self._forward(x, t, "cond", self._context("cond", text.cond), block_ids)
        if self.parallel is not None and self.parallel.cfg_split:
            mine = text.cond if self.parallel.cfg_rank == 0 else text.uncond
            key = "cond" if self.parallel.cfg_rank == 0 else "uncond"
            cond, uncond = self.parallel.exchange_cfg(self._forward(x, t, key, self._context(key, mine), block_ids))
        elif cfg.batched_cfg:
            both = self._context("both", text.cond, text.uncond)
            cond, uncond = self._forward(torch.cat([x, x]), torch.cat([t, t]), "both", both, block_ids).chunk(2)
        else:
            cond = self._forward(x, t, "cond", self._context("cond", text.cond), block_ids)
            uncond = self._forward(x, t, "uncond", self._context("uncond", text.uncond), block_ids)
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
    # The compute dtype: a bf16 model's first parameter (scale_shift_table) is one of those kept in fp32.
    dtype = predict.transformer.patch_embedding.weight.dtype
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
    predict.start_window(matrix.rows)

    for r in range(matrix.rows):
        t = torch.tensor(matrix.timesteps[r], dtype=torch.long, device=device)
        # The model only reads x and t_in; they are copied only where the prefix is re-noised below.
        x = latents.to(dtype)
        t_in = t.unsqueeze(0)
        if cfg.addnoise_condition > 0 and window.prefix > 0:
            # The model sees a lightly re-noised copy of the prefix (robust to error build-up across windows);
            # the stored prefix stays clean.
            p = window.prefix
            x, t_in = x.clone(), t_in.clone()
            eps = draw_noise(generator, (1, LATENT_CHANNELS, p, h, w)).to(device, dtype)
            x[:, :, :p] = x[:, :, :p] * (1.0 - noise_factor) + eps * noise_factor
            t_in[:, :p] = cfg.addnoise_condition
        velocity = predict(x, t_in, text, blocks, row=r)
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
