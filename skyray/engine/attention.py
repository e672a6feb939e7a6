"""Self-attention over a window's tokens: full, or block-causal without an N x N mask.

Block-causal attention (``causal_attention: true``) lets every token see the tokens of its own causal block and
of every earlier block; a block is a run of ``causal_block_size`` latent frames.  A dense boolean mask for it is
N x N: 12.5 GB at 720p (N = 111,600) before SDPA widens it to an additive float mask.  Because the blocks are
runs of frames in frame order, a query block's visible keys are a *prefix* of the sequence, so the same result
comes from one unmasked SDPA per query block over that key prefix: no mask at all, and the fused (flash /
memory-efficient, or torch's CPU flash) kernels stay usable.  The extra memory is the output plus one block's
partial result: O(N) (:func:`block_causal_bytes`).

The sequence must be in frame order here.  Ulysses sequence parallelism keeps it so: its all-to-all hands each
rank the whole sequence in the original token order (``engine.parallel.UlyssesShard``), not rank by rank.

``flex_attention`` with a ``BlockMask`` would express the same thing, but uncompiled on the CPU it falls back to
materialising the whole score matrix, so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LSE_BYTES = 4  # the fused kernels keep one fp32 log-sum-exp per query and head


@dataclass(frozen=True)
class BlockCausal:
    """The block-causal pattern of a window: frame ``f``'s tokens see frame ``g``'s iff ``block_ids[g] <=
    block_ids[f]``.  ``block_ids`` (one per latent frame) must not decrease (``forward.causal_block_ids``)."""

    block_ids: tuple[int, ...]
    tokens_per_frame: int  # of the attention sequence: every rank's tokens of a frame, after the all-to-all

    def __post_init__(self) -> None:
        if not self.block_ids:
            raise ValueError("block-causal attention needs at least one latent frame")
        if any(b < a for a, b in zip(self.block_ids, self.block_ids[1:])):
            raise ValueError(f"causal block ids must not decrease along the frames, got {list(self.block_ids)}")
        if self.tokens_per_frame < 1:
            raise ValueError(f"tokens per frame must be positive, got {self.tokens_per_frame}")

    @property
    def frames(self) -> int:
        return len(self.block_ids)

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    def spans(self) -> tuple[tuple[int, int], ...]:
        """Token range ``[start, end)`` of each causal block; its queries see keys ``[0, end)``."""
        out, start = [], 0
        for f in range(1, self.frames + 1):
            if f == self.frames or self.block_ids[f] != self.block_ids[f - 1]:
                end = f * self.tokens_per_frame
                out.append((start, end))
                start = end
        return tuple(out)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: BlockCausal | None = None) -> torch.Tensor:
    """Scaled dot-product self-attention of [B, N, H, d] q, k, v (sequence in frame order) -> [B, N, H, d]."""
    if causal is None:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if q.shape[1] != causal.tokens:
        raise ValueError(
            f"block-causal attention over {causal.frames} frames of {causal.tokens_per_frame} tokens expects "
            f"{causal.tokens} tokens, got {q.shape[1]}"
        )
    out = torch.empty_like(q)  # [B, N, H, d]: the caller's layout, so later views need no copy
    qt, kt, vt, ot = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2)
    for start, end in causal.spans():
        ot[:, :, start:end] = F.scaled_dot_product_attention(qt[:, :, start:end], kt[:, :, :end], vt[:, :, :end])
    return out


def block_causal_bytes(
    tokens: int,
    frames: int,
    causal_block_size: int,
    heads: int,
    head_dim: int,
    itemsize: int = 2,
    batch: int = 1,
) -> int:
    """Peak bytes block-causal :func:`attention` allocates beyond its q, k, v inputs, for one rank.

    ``tokens`` is the attention sequence (all ranks' tokens, after the Ulysses all-to-all), ``heads`` the heads
    this rank attends with.  It holds the output [B, N, H, d] and one block's SDPA result and log-sum-exp; the
    largest block is ``causal_block_size`` frames (a partial or end-image block is smaller).  The fused kernel's
    own tile workspace is a few MB and not counted.  Full attention needs the output and log-sum-exp for all N.
    """
    if tokens % frames:
        raise ValueError(f"{tokens} tokens do not split into {frames} latent frames")
    block = min(causal_block_size, frames) * (tokens // frames)
    return batch * heads * (tokens * head_dim * itemsize + block * (head_dim * itemsize + LSE_BYTES))
