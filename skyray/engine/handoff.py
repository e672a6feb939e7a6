"""What a rendered window hands on: its latents for the shot, and the tail and RNG state for the next window.

Plain tensors on the CPU, so the same objects travel in-process, as Ray object references, or through a
window checkpoint on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Handoff:
    """What one window passes to the next: its tail latents and the shot's RNG state after it."""

    tail: torch.Tensor | None
    rng_state: torch.Tensor | None


@dataclass
class WindowOutput:
    shot_id: str
    index: int
    latents: torch.Tensor  # [1, 16, n, h, w] fp32 CPU: latents this window adds to the shot (I2V: image first)
    handoff: Handoff
    warm: torch.Tensor | None = None  # clean latents to prime the decoder with (video extension)
    seconds: float = 0.0
    forwards: int = 0
    worker: str = ""
