"""Our forward pass of ``SkyReelsV2Transformer3DModel`` for diffusion forcing.

It runs the checkpoint's own modules (patch embedding, condition embedder, blocks' weights, output head) but owns
the loop over blocks, for three reasons the stock ``forward`` cannot serve:

- the per-frame modulation is broadcast over each frame's tokens instead of being materialised per token (the
  stock forward builds a [B, 6, tokens, dim] fp32 tensor in every block: gigabytes at 540p);
- batch > 1 works (the stock fps embedding broadcast breaks for two CFG branches in one batch), so conditional
  and unconditional passes can share one forward;
- sequence parallelism and block-causal attention hook in here: tokens are sharded within each frame, so every
  rank keeps whole frames' modulation and only self-attention communicates; block-causal attention runs block by
  block without a mask (``engine.attention``).

What is the same for every forward of a window is computed once per window by whoever runs the window (the
sampler): the rope angles and causal pattern (:func:`window_geometry`), and the text side of every
cross-attention (:func:`text_context`).  Called without them, ``df_forward`` computes both itself, with the same
numbers.

Rope keeps the reference's precision whatever dtype the model was cast to: the angles come from a fresh copy of
the checkpoint's rope module (fp64 angles, fp32 cos/sin as diffusers builds them), never from the model's own
buffers, which ``.to(torch.bfloat16)`` casts and a meta-device load leaves empty.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from skyray.engine.attention import BlockCausal, attention


class SequenceShard(Protocol):
    """What the forward needs from a sequence-parallel group (see ``engine.parallel``)."""

    world: int
    rank: int

    def heads_to_sequence(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int
    ) -> tuple[torch.Tensor, ...]: ...

    def sequence_to_heads(self, o: torch.Tensor, frames: int) -> torch.Tensor: ...

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor: ...

    # ``heads_to_sequence`` returns the whole sequence in frame order (every frame's tokens together, as without
    # sharding), so full and block-causal attention run on it unchanged.
    # Optional: ``attention(q, k, v, causal) -> o`` on local [B, n, H, d] tensors replaces the all-to-all + SDPA
    # (``engine.parallel.XFuserShard``: Ulysses + Ring attention).


def causal_block_ids(prefix: int, new: int, suffix: int, causal_block_size: int) -> list[int]:
    """Block index of every latent frame for block-causal attention.

    Prefix and new frames are grouped into blocks of ``causal_block_size`` counted separately (so a prefix that is
    a whole number of blocks gives exactly the reference's ``frame // block`` ids); the suffix is one last block.
    """
    ids = [f // causal_block_size for f in range(prefix)]
    first = (prefix + causal_block_size - 1) // causal_block_size
    ids += [first + f // causal_block_size for f in range(new)]
    if suffix:
        last = (ids[-1] + 1) if ids else 0
        ids += [last] * suffix
    return ids


@dataclass(frozen=True)
class Geometry:
    """What every forward over one window shape shares: this rank's rope angles and the causal pattern."""

    cos: torch.Tensor  # [1, n, 1, head_dim / 2]: cos of each interleaved pair's angle (fp32, as the reference's)
    sin: torch.Tensor
    causal: BlockCausal | None  # block-causal attention, or None (full attention)
    tokens_per_frame: int  # this rank's tokens of each latent frame


@functools.lru_cache(maxsize=8)
def _reference_rope(cls: type, head_dim: int, patch_size: tuple[int, ...], max_seq_len: int) -> torch.nn.Module:
    # Built on the CPU outside any meta-device or dtype context the model was loaded under: its buffers are what
    # the checkpoint's rope holds right after construction (diffusers' fp64 angles, cos/sin stored as fp32).
    with torch.device("cpu"):
        return cls(head_dim, patch_size, max_seq_len)


def rope_angles(model, latents_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [1, F*h*w, 1, head_dim] of the model's rope for latents of ``latents_shape``, on the CPU, in
    the reference's precision whatever dtype or device ``model`` is on."""
    cfg = model.config
    rope = _reference_rope(
        type(model.rope), int(cfg.attention_head_dim), tuple(cfg.patch_size), int(cfg.rope_max_seq_len)
    )
    return rope(torch.empty((), device="meta").expand(latents_shape))  # reads only the shape


def window_geometry(
    model, latents_shape: tuple[int, ...], device: torch.device, block_ids: list[int] | None = None,
    shard: SequenceShard | None = None,
) -> Geometry:
    """Rope angles and causal pattern for latents of ``latents_shape`` [B, C, F, H, W]; depends on nothing else."""
    _, _, frames, height, width = latents_shape
    _, p_h, p_w = model.config.patch_size
    hw = (height // p_h) * (width // p_w)
    cos, sin = rope_angles(model, latents_shape)
    causal = None
    if block_ids is not None:
        if len(block_ids) != frames:
            raise ValueError(f"{len(block_ids)} causal block ids for a window of {frames} latent frames")
        # The attention sequence holds every frame's tokens, sharded or not (the all-to-all restores them).
        causal = BlockCausal(tuple(int(b) for b in block_ids), hw)
    if shard is not None:
        if hw % shard.world:
            raise ValueError(
                f"sequence parallel degree {shard.world} must divide the {hw} tokens of each latent frame "
                f"({height * 8}x{width * 8} pixels); choose a degree dividing {hw}"
            )
        local = hw // shard.world
        sl = slice(shard.rank * local, (shard.rank + 1) * local)
        cos = cos.view(1, frames, hw, 1, -1)[:, :, sl].reshape(1, frames * local, 1, -1)
        sin = sin.view(1, frames, hw, 1, -1)[:, :, sl].reshape(1, frames * local, 1, -1)
        hw = local
    # The reference rotates with cos of the even and sin of the odd buffer entries; slice (and copy) them once.
    return Geometry(cos[..., 0::2].to(device).contiguous(), sin[..., 1::2].to(device).contiguous(), causal, hw)


@dataclass(frozen=True)
class TextContext:
    """The text side of every block's cross-attention for one batch of prompt embeddings."""

    dtype: torch.dtype  # of the raw embeddings: the stock embedder casts the time embedding to it
    tokens: torch.Tensor  # projected text [B, L, D]
    kv: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]  # per block; None: the block's stock attn2 runs


def text_context(model, text: torch.Tensor) -> TextContext:
    """Project ``text`` [B, L, text_dim] once: the context and each block's cross-attention keys and values."""
    ctx = model.condition_embedder.text_embedder(text)
    kv = []
    for blk in model.blocks:
        attn = blk.attn2
        if attn.add_k_proj is not None:  # image keys too (I2V checkpoints with CLIP): keep the stock processor
            kv.append(None)
            continue
        if attn.fused_projections:
            k, v = attn.to_kv(ctx).chunk(2, dim=-1)
        else:
            k, v = attn.to_k(ctx), attn.to_v(ctx)
        k = attn.norm_k(k)
        kv.append((k.unflatten(2, (attn.heads, -1)).transpose(1, 2), v.unflatten(2, (attn.heads, -1)).transpose(1, 2)))
    return TextContext(text.dtype, ctx, tuple(kv))


def _rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # Interleaved-pair rotation, computed in the angles' fp32 (a bf16 x is promoted) exactly as the reference
    # processor does with its fp32-kept rope buffers; only the result is cast back.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def _self_attention(attn, h, cos, sin, causal: BlockCausal | None, frames: int, shard: SequenceShard | None):
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(h).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    attend = getattr(shard, "attention", None)
    if attend is not None:  # a shard with its own distributed attention kernel (ring attention)
        o = attend(q, k, v, causal)
    else:
        if shard is not None:
            q, k, v = shard.heads_to_sequence(q, k, v, frames)
        o = attention(q, k, v, causal)
        if shard is not None:
            o = shard.sequence_to_heads(o, frames)
    o = o.flatten(2, 3).type_as(q)
    return attn.to_out[1](attn.to_out[0](o))


def _cross_attention(attn, h, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # The stock text-only processor with this window's keys and values: same ops, same numbers.
    q = attn.norm_q(attn.to_q(h)).unflatten(2, (attn.heads, -1))
    k, v = kv
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v).transpose(1, 2)
    o = o.flatten(2, 3).type_as(q)
    return attn.to_out[1](attn.to_out[0](o))


def _block(blk, x, ctx, kv, mod, cos, sin, causal, frames: int, shard) -> torch.Tensor:
    b, n, d = x.shape
    hw = n // frames

    def per_frame(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, frames, hw, d)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, n, d)

    e = blk.scale_shift_table.unsqueeze(2) + mod.float()  # [B, 6, F, D]
    shift, scale, gate, c_shift, c_scale, c_gate = (t.unsqueeze(2) for t in e.unbind(1))  # [B, F, 1, D]

    h = flat(per_frame(blk.norm1(x.float())) * (1 + scale) + shift).type_as(x)
    a = _self_attention(blk.attn1, h, cos, sin, causal, frames, shard)
    x = flat(per_frame(x.float()) + per_frame(a) * gate).type_as(x)

    h = blk.norm2(x.float()).type_as(x)
    x = x + (blk.attn2(h, ctx, None, None) if kv is None else _cross_attention(blk.attn2, h, kv))

    h = flat(per_frame(blk.norm3(x.float())) * (1 + c_scale) + c_shift).type_as(x)
    f = blk.ffn(h)
    return flat(per_frame(x.float()) + per_frame(f.float()) * c_gate).type_as(x)


def compiled_block(backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """The block function through ``torch.compile``: one graph for every block (modules are inlined, so their
    weights are inputs, not constants), compiled on first use and recompiled only for a new window shape."""
    return _compiled_block(backend)


@functools.cache
def _compiled_block(backend: str) -> Callable[..., torch.Tensor]:
    return torch.compile(_block, backend=backend)


BlockCache = Callable[[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def df_forward(
    model,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor | TextContext,
    fps: int,
    block_ids: list[int] | None = None,
    shard: SequenceShard | None = None,
    geometry: Geometry | None = None,
    block_cache: BlockCache | None = None,
    block_fn: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Velocity prediction for ``latents`` [B, C, F, H, W] at per-frame ``timesteps`` [B, F].

    ``block_ids`` (one per latent frame) switches on block-causal attention; ``shard`` runs this rank's slice of a
    sequence-parallel group (each frame's tokens split evenly over the ranks) and returns the full output.
    ``geometry`` and a ``TextContext`` for ``text`` are what the window's earlier forwards already computed.
    ``block_cache(x, temb, run_blocks)`` stands in for the block stack (TeaCache: it may return ``x`` plus a
    cached residual instead of running them); ``block_fn`` replaces the per-block function (``compiled_block``).
    """
    bsz, _, frames, height, width = latents.shape
    p_t, p_h, p_w = model.config.patch_size
    if p_t != 1:
        raise ValueError("diffusion forcing needs a temporal patch size of 1 (one timestep per latent frame)")
    pph, ppw = height // p_h, width // p_w

    if geometry is None:
        geometry = window_geometry(model, tuple(latents.shape), latents.device, block_ids, shard)
    if not isinstance(text, TextContext):
        text = text_context(model, text)
    x = model.patch_embedding(latents).flatten(2).transpose(1, 2)  # [B, F*hw, D]
    temb, tproj = _time_embedding(model.condition_embedder, timesteps, text.dtype)  # [B, F, D], [B, F, 6D]
    tproj = tproj.unflatten(-1, (6, -1))
    if model.config.inject_sample_info:
        # The checkpoints know two frame rates: 16 fps (flag 0) and everything else (flag 1).
        flag = torch.full((bsz,), 0 if fps == 16 else 1, dtype=torch.long, device=latents.device)
        fps_mod = model.fps_projection(model.fps_embedding(flag)).unflatten(1, (6, -1))  # [B, 6, D]
        tproj = tproj + fps_mod.unsqueeze(1)
    mod = tproj.transpose(1, 2)  # [B, 6, F, D]

    if shard is not None:
        hw = pph * ppw
        sl = slice(shard.rank * geometry.tokens_per_frame, (shard.rank + 1) * geometry.tokens_per_frame)
        x = x.view(bsz, frames, hw, -1)[:, :, sl].reshape(bsz, frames * geometry.tokens_per_frame, -1)
    hw = geometry.tokens_per_frame
    block = block_fn or _block

    def run_blocks(x: torch.Tensor) -> torch.Tensor:
        for blk, kv in zip(model.blocks, text.kv):
            x = block(blk, x, text.tokens, kv, mod, geometry.cos, geometry.sin, geometry.causal, frames, shard)
        return x

    x = run_blocks(x) if block_cache is None else block_cache(x, temb, run_blocks)

    shift, scale = (model.scale_shift_table.unsqueeze(2) + temb.unsqueeze(1)).chunk(2, dim=1)  # [B, 1, F, D]
    shift, scale = shift.squeeze(1).unsqueeze(2), scale.squeeze(1).unsqueeze(2)
    d = x.shape[-1]
    x = (model.norm_out(x.float()).view(bsz, frames, hw, d) * (1 + scale) + shift).type_as(x)
    x = model.proj_out(x)  # [B, F, hw, p*p*C]
    if shard is not None:
        x = shard.gather_tokens(x)
    x = x.reshape(bsz, frames, pph, ppw, p_t, p_h, p_w, -1)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _time_embedding(embedder, timesteps: torch.Tensor, text_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # The time half of the stock SkyReelsV2TimeTextImageEmbedding (its text half is in text_context), same ops.
    t = embedder.timesteps_proj(timesteps)
    dtype = next(embedder.time_embedder.parameters()).dtype
    if t.dtype != dtype and dtype != torch.int8:
        t = t.to(dtype)
    temb = embedder.time_embedder(t).to(text_dtype)
    return temb, embedder.time_proj(embedder.act_fn(temb))
