"""Frame arithmetic and the diffusion-forcing timestep matrix.

Pure functions on ints and lists: no torch, no models, so every rule here is unit-testable by hand.

Vocabulary (all counts in *latent* frames unless a name says ``frames``):

- The Wan VAE compresses time by 4 with a causal first frame: ``frames = 4 * (latents - 1) + 1``.
- A *window* is one call of the model over at most ``base`` latents.  A window holds ``prefix`` clean latents
  (an I2V image, the tail of a video to extend, or the last latents of the previous window or shot), ``new``
  latents it denoises, and ``suffix`` clean latents appended after them (an end-frame image, last window only).
- Consecutive windows of a shot overlap by ``prefix`` latents: the last ``prefix`` latents of one window are
  the first of the next.
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8
PATCH = 2
# The reference feeds blocks that have not started with t=999 (not the first scheduler timestep) and finished
# blocks with t=0; we keep both so our model inputs equal the reference's.
NOT_STARTED_T = 999
FINISHED_T = 0


def check_size(height: int, width: int) -> tuple[int, int]:
    """Latent (h, w) of a film size; both sides must be multiples of 16 (VAE stride 8 x patch 2)."""
    for name, v in (("height", height), ("width", width)):
        if v < 16 or v % (SPATIAL_STRIDE * PATCH):
            raise ValueError(f"{name} must be a positive multiple of 16, got {v} (try {max(16, v // 16 * 16)})")
    return height // SPATIAL_STRIDE, width // SPATIAL_STRIDE


def latent_frames(frames: int) -> int:
    """Latents covering ``frames`` video frames (frame counts not of the form 4k+1 lose their last frames)."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    return (frames - 1) // TEMPORAL_STRIDE + 1


def video_frames(latents: int) -> int:
    """Video frames decoded from ``latents`` latents of a fresh sequence."""
    if latents < 1:
        raise ValueError(f"latents must be >= 1, got {latents}")
    return TEMPORAL_STRIDE * (latents - 1) + 1


def check_fresh_frames(frames: int) -> int:
    """Latents of a shot starting from nothing; its frame count must be 4k+1."""
    if frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
        lo = max(1, (frames - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1)
        raise ValueError(f"a shot that starts fresh needs 4k+1 frames; {frames} is not (try {lo} or {lo + 4})")
    return latent_frames(frames)


def check_added_frames(frames: int) -> int:
    """Latents added by a shot that continues from earlier latents; each latent adds 4 frames."""
    if frames < TEMPORAL_STRIDE or frames % TEMPORAL_STRIDE:
        lo = max(TEMPORAL_STRIDE, frames // TEMPORAL_STRIDE * TEMPORAL_STRIDE)
        raise ValueError(
            f"a shot that continues earlier latents adds frames in steps of 4; {frames} is not (try {lo} or {lo + 4})"
        )
    return frames // TEMPORAL_STRIDE


def prefix_latents(overlap_history: int, causal_block_size: int) -> int:
    """Latents handed from one window to the next.

    ``overlap_history`` frames cover ``(overlap_history-1)//4+1`` latents; the prefix must be whole causal blocks,
    so it is rounded down to a multiple of ``causal_block_size`` (the reference truncates the same way).
    """
    overlap = latent_frames(overlap_history)
    prefix = overlap // causal_block_size * causal_block_size
    if prefix == 0:
        raise ValueError(
            f"overlap_history={overlap_history} covers {overlap} latents, fewer than one causal block of "
            f"{causal_block_size}; raise overlap_history to at least {video_frames(causal_block_size)}"
        )
    return prefix


@dataclass(frozen=True)
class WindowShape:
    """Latent layout of one window: ``prefix`` clean, ``new`` to denoise, ``suffix`` clean."""

    index: int
    prefix: int
    new: int
    suffix: int = 0

    @property
    def total(self) -> int:
        return self.prefix + self.new + self.suffix


def shot_windows(
    new_latents: int,
    base_latents: int,
    handoff_latents: int,
    first_prefix: int = 0,
    suffix: int = 0,
) -> list[WindowShape]:
    """Split ``new_latents`` into windows of at most ``base_latents`` (prefix included, suffix on top).

    ``first_prefix`` clean latents open the first window (image, video tail or the previous shot's tail); every
    later window opens with the last ``handoff_latents`` latents of the one before.  Unlike the reference, a window
    drops exactly the prefix it was given, so no generated latent is thrown away when the overlap had to be
    rounded down to whole causal blocks.
    """
    if new_latents < 1:
        raise ValueError(f"a shot must add at least one latent frame, got {new_latents}")
    if first_prefix >= base_latents:
        raise ValueError(f"prefix of {first_prefix} latents leaves no room in a window of {base_latents}")
    windows = [WindowShape(0, first_prefix, min(new_latents, base_latents - first_prefix))]
    done = windows[0].new
    while done < new_latents:
        if handoff_latents >= base_latents:
            raise ValueError(
                f"overlap of {handoff_latents} latents leaves no room in a window of {base_latents} latents; "
                "lower overlap_history or raise base_num_frames"
            )
        step = min(new_latents - done, base_latents - handoff_latents)
        windows.append(WindowShape(len(windows), handoff_latents, step))
        done += step
    if suffix:
        last = windows[-1]
        windows[-1] = WindowShape(last.index, last.prefix, last.new, suffix)
    return windows


def reference_window_count(num_latents: int, base_latents: int, overlap_latents: int) -> int:
    """The reference pipelines' window count for a fresh long video (``n_iter`` in diffusers)."""
    if num_latents <= base_latents:
        return 1
    return 1 + (num_latents - base_latents - 1) // (base_latents - overlap_latents) + 1


@dataclass(frozen=True)
class StepMatrix:
    """The diffusion-forcing schedule of one window.

    Row r is one model call (times two with CFG).  ``timesteps[r][f]`` is frame f's timestep fed to the model,
    ``update[r][f]`` says whether frame f's scheduler steps after that call, ``counters[r][f]`` is the frame's
    step counter (0: not started, ``steps``: done) and ``groups`` lists the frames that share one step history
    (so one scheduler can step them together).
    """

    timesteps: list[list[int]]
    update: list[list[bool]]
    counters: list[list[int]]
    groups: list[tuple[int, int]]

    @property
    def rows(self) -> int:
        return len(self.timesteps)


def step_matrix(
    step_template: list[int],
    prefix: int,
    new: int,
    suffix: int = 0,
    ar_step: int = 0,
    causal_block_size: int = 1,
    base_latents: int | None = None,
) -> StepMatrix:
    """Diffusion-forcing timestep matrix for a window of ``prefix + new + suffix`` latents.

    The ``new`` latents are cut into causal blocks of ``causal_block_size`` counted from the end of the prefix
    (the last block may be shorter: the reference floors the count and leaves the remainder as raw noise).
    Each row advances the first unfinished block by one step; every later block lags ``ar_step`` steps behind its
    predecessor until that predecessor is done, then runs freely.  ``ar_step=0`` is synchronous: exactly
    ``len(step_template)`` rows; async gives ``steps + (blocks-1)*ar_step`` rows.  Prefix and suffix latents are
    finished from the start (timestep 0, never updated).
    """
    steps = len(step_template)
    if steps < 1:
        raise ValueError("need at least one denoising step")
    if ar_step < 0:
        raise ValueError(f"ar_step must be >= 0, got {ar_step}")
    if causal_block_size < 1:
        raise ValueError(f"causal_block_size must be >= 1, got {causal_block_size}")
    if new < 1:
        raise ValueError(f"a window must denoise at least one latent, got {new}")
    blocks = [(s, min(s + causal_block_size, new)) for s in range(0, new, causal_block_size)]
    if base_latents is not None:
        # Only a window longer than the model's base needs its wave to advance fast enough to slide; ours never
        # are, but the rule is the reference's and guards direct callers.
        base_blocks = base_latents // causal_block_size
        if base_blocks < len(blocks) and ar_step < steps / base_blocks:
            raise ValueError(
                f"ar_step={ar_step} is too small: a window of {len(blocks)} blocks over a base of {base_blocks} "
                f"needs ar_step >= {-(-steps // base_blocks)}"
            )
    template = [NOT_STARTED_T, *[int(t) for t in step_template]]
    total = prefix + new + suffix
    counters = [0] * len(blocks)
    rows_t: list[list[int]] = []
    rows_u: list[list[bool]] = []
    rows_c: list[list[int]] = []
    while not all(c >= steps for c in counters):
        row = [0] * len(blocks)
        for i in range(len(blocks)):
            if i == 0 or counters[i - 1] >= steps:
                row[i] = min(counters[i] + 1, steps + 1)
            else:
                row[i] = max(row[i - 1] - ar_step, 0)
        moved = [r != c and r <= steps for r, c in zip(row, counters)]
        # A block past its last step stays at `steps` so that its timestep reads as finished (0).
        counters = [min(r, steps) for r in row]
        t_row = [FINISHED_T] * total
        u_row = [False] * total
        c_row = [steps] * total
        for (s, e), c, m in zip(blocks, counters, moved):
            for f in range(prefix + s, prefix + e):
                t_row[f] = template[c] if c < steps or m else FINISHED_T
                u_row[f] = m
                c_row[f] = c
        rows_t.append(t_row)
        rows_u.append(u_row)
        rows_c.append(c_row)
    groups = _step_groups(rows_c, rows_u, prefix, new)
    return StepMatrix(rows_t, rows_u, rows_c, groups)


def _step_groups(counters: list[list[int]], update: list[list[bool]], prefix: int, new: int) -> list[tuple[int, int]]:
    """Contiguous frame ranges whose counter and update histories are identical.

    Such frames see the same sequence of (timestep, step) calls, so one scheduler instance stepping them together
    is exactly as many per-frame schedulers would be (sync mode: one group for the whole window).
    """
    groups: list[tuple[int, int]] = []
    start = prefix
    for f in range(prefix + 1, prefix + new + 1):
        same = f < prefix + new and all(r[f] == r[start] for r in counters) and all(u[f] == u[start] for u in update)
        if not same:
            groups.append((start, f))
            start = f
    return groups


def model_calls(rows: int, guidance: bool) -> int:
    """Transformer forward passes for ``rows`` schedule rows (CFG doubles them)."""
    return rows * (2 if guidance else 1)


def window_tokens(latents: int, height: int, width: int) -> int:
    """Transformer tokens of a window: latents x (H/16) x (W/16)."""
    per_frame = (height // (SPATIAL_STRIDE * PATCH)) * (width // (SPATIAL_STRIDE * PATCH))
    return latents * per_frame


def transformer_flops(tokens: int, text_tokens: int, dim: int, ffn_dim: int, layers: int) -> float:
    """Approximate FLOPs of one transformer forward (matmuls only, 2 FLOPs per MAC).

    Per layer: QKVO projections 8*N*d^2, self-attention 4*N^2*d, cross-attention 4*N*d^2 (Q, O) +
    4*M*d^2 (K, V on M text tokens) + 4*N*M*d, FFN 4*N*d*f.
    """
    n, m, d, f = tokens, text_tokens, dim, ffn_dim
    per_layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * d + 4 * m * d * d + 4 * n * m * d + 4 * n * d * f
    return float(layers * per_layer)
