"""TeaCache for diffusion forcing: skip the block stack when the timestep input has barely moved since last row.

TeaCache (Liu et al., 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model") notes that a
DiT's output changes about as much as its timestep-modulated input does.  Every forward it measures the relative
L1 change of that input against the previous forward's, rescales it with a polynomial fitted per model, and adds
it up; while the sum stays under a threshold, the blocks are skipped and the residual they added last time
(output minus input of the stack) is added instead.  The sum restarts at every computed forward.

As in SkyReels-V2's own implementation for Wan/DF (``use_ret_steps=False``): the input is the time embedding
``temb`` (per latent frame, so it sees the per-frame timesteps of a diffusion-forcing row) and the coefficients
are the ones fitted for the T2V 1.3B and 14B checkpoints.  Coefficients go by model *family*
(``skyray.models.ModelFamily.name``), never by a path; families without fitted coefficients ("tiny", "custom")
use the identity (the raw relative change).  Two deliberate differences:

- the state is per window: reset when a window starts, with its first and last rows always computed (the
  reference keeps one counter across its whole run);
- a rescaled change below zero counts as zero (the fitted polynomials dip below zero outside the range they were
  fitted on, which would otherwise let the sum shrink and skip without end).

One state per CFG branch: with sequential CFG the conditional and unconditional passes each have their own; with
batched CFG one state covers the batch (its cached residual holds both halves).  The time embedding depends on
the timesteps only, not on the text, so both ways make the same decisions; only the residuals differ per branch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# Highest power first (numpy.poly1d order); from SkyReels-V2's transformer.initialize_teacache (T2V, no ret steps).
COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "1.3B": (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
    "14B": (-5.78454975374e03, 5.44950911966e03, -1.81116591783e03, 2.5627178429e02, -1.302252404e01),
}
IDENTITY: tuple[float, ...] = (1.0, 0.0)


def coefficients_for(family: str) -> tuple[float, ...]:
    """Rescaling polynomial of a model family ("1.3B", "14B"; anything else: the identity)."""
    return COEFFICIENTS.get(family, IDENTITY)


class TeaCache:
    """One CFG branch's cache within one window; call it in place of running the block stack."""

    def __init__(self, threshold: float, coefficients: tuple[float, ...]) -> None:
        if threshold <= 0:
            raise ValueError("a TeaCache threshold must be positive (0 means no cache: do not build one)")
        self.threshold = threshold
        self.rescale = np.poly1d(coefficients)
        self.previous: torch.Tensor | None = None  # the previous forward's modulated input
        self.residual: torch.Tensor | None = None  # what the blocks added the last time they ran
        self.accumulated = 0.0
        self.force = False  # set by the caller for rows that must compute (a window's first and last)
        self.computed = 0
        self.skipped = 0

    def relative_change(self, modulated: torch.Tensor) -> float:
        prev = self.previous
        return ((modulated - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)).item()

    def __call__(
        self, x: torch.Tensor, modulated: torch.Tensor, run_blocks: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        skip = False
        if not self.force and self.previous is not None and self.residual is not None:
            if self.residual.shape == x.shape:
                self.accumulated += max(0.0, float(self.rescale(self.relative_change(modulated))))
                skip = self.accumulated < self.threshold
        self.previous = modulated.detach().clone()
        if skip:
            self.skipped += 1
            return x + self.residual
        self.accumulated = 0.0
        self.computed += 1
        out = run_blocks(x)
        self.residual = out - x
        return out


class WindowTeaCache:
    """The TeaCache states of one window, one per branch ("cond", "uncond", "both", ...), made on first use."""

    def __init__(self, threshold: float, family: str, rows: int) -> None:
        self.threshold = threshold
        self.coefficients = coefficients_for(family)
        self.rows = rows
        self.row = 0
        self.branches: dict[str, TeaCache] = {}

    def at_row(self, row: int) -> None:
        self.row = row

    def branch(self, key: str) -> TeaCache:
        if key not in self.branches:
            self.branches[key] = TeaCache(self.threshold, self.coefficients)
        cache = self.branches[key]
        cache.force = self.row == 0 or self.row == self.rows - 1
        return cache
