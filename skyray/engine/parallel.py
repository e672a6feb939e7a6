"""Sequence-parallel (Ulysses) and CFG-parallel forwards inside one GPU group.

A group of ``cfg_degree x ring x ulysses`` ranks renders one window together.  Ranks are laid out with Ulysses
fastest, so every all-to-all group is a run of consecutive ranks (one NVLink island when a group is packed on a
node) and the CFG partner of a rank is ``sequence_degree`` ranks away::

    rank = cfg_idx * (ring * ulysses) + ring_idx * ulysses + u

- **CFG parallel**: the two halves of the group compute the conditional (``cfg_idx`` 0) and unconditional
  (``cfg_idx`` 1) branch of the same step; partners swap their outputs once per step (one latent window, a few MB).
- **Ulysses**: the ranks of a sequence group each hold an equal slice of every latent frame's tokens (see
  ``engine.forward``); self-attention all-to-alls q/k/v so each rank sees the whole sequence, in frame order,
  for ``heads / U`` heads.  Everything else in a block is per token or per frame and needs no communication.
- **Ring** (``ring > 1``) needs yunchang's long-context attention (installed with xfuser, CUDA only).

Attention ``"auto"`` is our all-to-all + torch SDPA (flash on GPUs), the path the CPU suite proves equal to one
rank.  yunchang/xfuser has not run on a GPU yet, so it is used only when asked for: ``attention="xfuser"``, or a
ring degree above 1 (ring attention exists only there).  ``ParallelConfig.auto`` never picks a ring.

Noise, the ``addnoise_condition`` noise and scheduler steps are identical on every rank without communication:
the sampler draws every random number from one CPU generator seeded the same everywhere, and every rank ends a
step with the same full velocity, so all ranks hold bit-identical latents.

Nothing here imports Ray: process groups are set up by ``executors.distributed`` (or torchrun) before
``GroupParallel.build`` is called.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from skyray.engine.attention import BlockCausal, attention

AttentionBackend = Literal["auto", "torch", "xfuser"]


@functools.cache
def xfuser_status() -> tuple[bool, str]:
    """Whether yunchang's long-context attention (shipped with xfuser) can run here, and if not, why."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (xfuser and yunchang run on GPUs only)"
    # yunchang's default ring kernel is flash-attn's; xfuser brings yunchang along.
    for name in ("xfuser", "yunchang", "flash_attn"):
        try:
            importlib.import_module(name)
        except Exception as exc:  # xfuser raises more than ImportError when triton or CUDA pieces are missing
            return False, f"{name} does not import ({exc.__class__.__name__}: {exc}); pip install 'skyray[gpu]'"
    return True, "available"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelConfig:
    """How one GPU group splits a window's forwards; ``validate`` once before any model is loaded."""

    ulysses: int = 1
    """Ulysses degree: ranks splitting each frame's tokens; must divide the attention head count."""
    ring: int = 1
    """Ring-attention degree on top of Ulysses (yunchang/xfuser only)."""
    cfg: bool = False
    """Run the conditional and unconditional branches on two halves of the group (needs guidance)."""
    attention: AttentionBackend = "auto"
    """Self-attention backend: "torch" all-to-all + SDPA, "xfuser" yunchang's long-context attention (opt-in),
    or "auto": torch, unless a ring degree above 1 asks for yunchang's ring attention."""

    @property
    def cfg_degree(self) -> int:
        return 2 if self.cfg else 1

    @property
    def sequence_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cfg_degree * self.sequence_degree

    @property
    def attention_backend(self) -> Literal["torch", "xfuser"]:
        """The self-attention a sequence group of this layout runs (see the module docstring)."""
        return "xfuser" if self.attention == "xfuser" or self.ring > 1 else "torch"

    def describe(self) -> str:
        return f"cfg {self.cfg_degree} x ulysses {self.ulysses} x ring {self.ring}"

    def validate(self, world_size: int, heads: int, guidance: bool | None = None) -> ParallelConfig:
        """Raise ``ValueError`` naming the problem and a fix; returns ``self`` so calls chain.

        ``guidance`` (if known) rejects CFG parallel for a render without classifier-free guidance.
        """
        for name, v in (("ulysses", self.ulysses), ("ring", self.ring)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"parallel {name} degree must be a positive integer, got {v!r}")
        if world_size < 1:
            raise ValueError(f"a GPU group needs at least one rank, got world size {world_size}")
        if self.attention not in ("auto", "torch", "xfuser"):
            raise ValueError(f"attention backend must be 'auto', 'torch' or 'xfuser', got {self.attention!r}")
        if heads % self.ulysses:
            choices = ", ".join(map(str, _divisors(heads)))
            raise ValueError(
                f"ulysses degree {self.ulysses} must divide the model's {heads} attention heads "
                f"(choose one of {choices})"
            )
        need = self.world_size
        if need > world_size:
            raise ValueError(
                f"parallel layout {self.describe()} needs {need} GPUs but the group has only {world_size}; "
                f"lower a degree or use ParallelConfig.auto({world_size}, {heads}, guidance)"
            )
        if need < world_size:
            raise ValueError(
                f"parallel layout {self.describe()} uses {need} of the group's {world_size} GPUs; every GPU must "
                f"have a role, so the degrees' product must equal the group size"
            )
        if self.cfg and guidance is False:
            raise ValueError("cfg parallel needs classifier-free guidance (guidance_scale > 1); set cfg=False")
        if self.ring > 1 or self.attention == "xfuser":
            ok, why = xfuser_status()
            if not ok:
                what = f"ring degree {self.ring}" if self.ring > 1 else "attention='xfuser'"
                raise ValueError(f"{what} needs yunchang/xfuser long-context attention, which is unavailable: {why}")
        return self

    def check_frame_tokens(self, height: int, width: int, patch: int = 16) -> None:
        """Reject a film size whose tokens per latent frame do not split evenly over the sequence ranks."""
        tokens = (height // patch) * (width // patch)
        s = self.sequence_degree
        if tokens % s:
            raise ValueError(
                f"sequence parallel degree {s} must divide the {tokens} tokens of each latent frame "
                f"({height}x{width} pixels); choose a degree dividing {tokens} or another size"
            )

    @classmethod
    def auto(
        cls, world_size: int, heads: int, guidance: bool, ring: int = 1, attention: AttentionBackend = "auto"
    ) -> ParallelConfig:
        """A sensible layout for ``world_size`` GPUs.

        CFG parallel first when there is guidance and the group is even (one small exchange per step, no
        per-layer communication); then a Ulysses degree for the remaining ranks, which must divide the head
        count.  It never chooses ring attention itself (yunchang/xfuser, not yet run on a GPU): ``ring`` is
        the degree the caller asked for, and a group that CFG and Ulysses cannot fill, e.g. 16 GPUs for the
        12-head 1.3B model, is an error naming the sizes that work.
        """
        if world_size < 1:
            raise ValueError(f"a GPU group needs at least one rank, got world size {world_size}")
        if ring < 1 or world_size % ring:
            raise ValueError(f"ring degree {ring} must be a positive divisor of the group's {world_size} GPUs")
        cfg = guidance and (world_size // ring) % 2 == 0
        rest = world_size // ring // (2 if cfg else 1)
        if heads % rest:
            sizes = sorted({d * (2 if guidance else 1) for d in _divisors(heads)} | set(_divisors(heads)))
            raise ValueError(
                f"{world_size} GPUs per group{f' with ring {ring}' if ring > 1 else ''} cannot be split by CFG and "
                f"Ulysses parallelism over the model's "
                f"{heads} attention heads; use a group of {', '.join(map(str, sizes))} GPUs, or set a ring degree "
                f"(parallel.ring: yunchang/xfuser ring attention, not yet run on a GPU)"
            )
        return cls(ulysses=rest, ring=ring, cfg=cfg, attention=attention).validate(world_size, heads, guidance)


# ------------------------------------------------------------------------------------------------- sequence shards


class UlyssesShard:
    """``engine.forward.SequenceShard`` over a torch.distributed group (gloo on CPU, NCCL on GPU).

    Heads are split head-major (rank j attends with heads ``j*H/U .. (j+1)*H/U - 1``).  Rank j holds tokens
    ``j*n/U .. (j+1)*n/U - 1`` of every frame; the gathered sequence puts them back in frame order (frame 0:
    rank 0's tokens, rank 1's, ...; then frame 1), so causal blocks stay contiguous runs of frames.
    """

    def __init__(self, group: dist.ProcessGroup | None, world: int, rank: int) -> None:
        self.group = group
        self.world = world
        self.rank = rank

    def heads_to_sequence(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int
    ) -> tuple[torch.Tensor, ...]:
        """3 x [B, n, H, d] local tokens of ``frames`` frames, all heads -> 3 x [B, U*n, H/U, d]: all tokens in
        frame order, this rank's heads."""
        b, n, h, d = q.shape
        u = self.world
        if h % u:
            raise ValueError(f"ulysses degree {u} must divide the {h} attention heads")
        # One all-to-all for q, k and v together: chunk j of dim 0 goes to rank j.
        send = torch.stack([q, k, v]).view(3, b, n, u, h // u, d).permute(3, 0, 1, 2, 4, 5).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        # recv[j] = rank j's slice of every frame for our heads; interleave the slices back into frame order.
        out = recv.view(u, 3, b, frames, n // frames, h // u, d).permute(1, 2, 3, 0, 4, 5, 6)
        return tuple(out.reshape(3, b, u * n, h // u, d).unbind(0))

    def sequence_to_heads(self, o: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, U*n, H/U, d] in frame order -> [B, n, H, d] local tokens (the inverse all-to-all)."""
        b, s, hu, d = o.shape
        u = self.world
        local = s // (u * frames)
        send = o.reshape(b, frames, u, local, hu, d).permute(2, 0, 1, 3, 4, 5).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        # recv[j] = our tokens for rank j's heads: head group j sits at heads j*hu .. (j+1)*hu - 1.
        return recv.permute(1, 2, 3, 0, 4, 5).reshape(b, frames * local, u * hu, d)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F, hw/U, C] -> [B, F, hw, C], rank r's slice at position r of each frame."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=2)


class XFuserShard(UlyssesShard):
    """Ulysses + Ring self-attention through yunchang's ``LongContextAttention`` (flash-attn kernels).

    Not exercised by the test suite (it needs CUDA, flash-attn and xfuser/yunchang), hence opt-in only.
    ``engine.forward`` calls ``attention`` instead of its own all-to-all + SDPA when a shard has one.  yunchang has
    no block-causal pattern, so block-causal attention falls back to the torch all-to-all path (Ulysses only;
    ring + causal is refused).
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        world: int,
        rank: int,
        ulysses_group: dist.ProcessGroup,
        ring_group: dist.ProcessGroup,
        ring: int,
    ) -> None:
        super().__init__(group, world, rank)
        from yunchang import LongContextAttention
        from yunchang.globals import PROCESS_GROUP

        self.ring = ring
        self.ulysses_group = ulysses_group
        # LongContextAttention reads its groups from yunchang's singleton at construction; ours use the same
        # layout as yunchang's set_seq_parallel_pg(use_ulysses_low=True), so we hand them over instead of making
        # a second copy of every group.
        PROCESS_GROUP.ULYSSES_PG = ulysses_group
        PROCESS_GROUP.RING_PG = ring_group
        self._attn = LongContextAttention(ring_impl_type="basic")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: BlockCausal | None) -> torch.Tensor:
        """[B, n, H, d] local q, k, v -> [B, n, H, d] attention output for the local tokens."""
        if causal is not None:
            if self.ring > 1:
                raise ValueError("block-causal attention (causal_attention) is not supported with ring attention")
            # With ring 1 the sequence group is the Ulysses group: the torch all-to-all path applies.
            qs, ks, vs = self.heads_to_sequence(q, k, v, causal.frames)
            return self.sequence_to_heads(attention(qs, ks, vs, causal), causal.frames)
        # Full attention is invariant to the order of the keys, so yunchang's rank-major layout is fine.
        return self._attn(q, k, v, causal=False)


# -------------------------------------------------------------------------------------------------- the group


class GroupParallel:
    """This rank's role in its GPU group: what ``sampler.NoisePredictor(parallel=...)`` consumes.

    Attributes: ``sequence`` (a shard or None), ``cfg_split``, ``cfg_rank`` (0 conditional, 1 unconditional),
    ``exchange_cfg``.  Build it with ``GroupParallel.build`` on every rank of an initialised default group.
    """

    def __init__(
        self,
        config: ParallelConfig,
        rank: int,
        sequence: UlyssesShard | None,
        cfg_group: dist.ProcessGroup | None,
    ) -> None:
        self.config = config
        self.rank = rank
        self.sequence = sequence
        self.cfg_split = config.cfg
        self.cfg_rank = rank // config.sequence_degree if config.cfg else 0
        self.cfg_group = cfg_group

    def __repr__(self) -> str:
        seq = type(self.sequence).__name__ if self.sequence is not None else "none"
        return f"GroupParallel(rank={self.rank}, {self.config.describe()}, cfg_rank={self.cfg_rank}, shard={seq})"

    def exchange_cfg(self, local_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Swap this rank's branch output with its CFG partner; returns (cond, uncond) on both."""
        if self.cfg_group is None:
            raise RuntimeError("exchange_cfg called on a group without cfg parallel")
        parts = [torch.empty_like(local_out) for _ in range(2)]
        dist.all_gather(parts, local_out.contiguous(), group=self.cfg_group)
        return parts[0], parts[1]

    @classmethod
    def build(
        cls,
        config: ParallelConfig,
        heads: int,
        guidance: bool | None = None,
        timeout_s: float | None = None,
    ) -> GroupParallel:
        """Create the CFG pairs and sequence groups of the default process group (a collective: every rank calls
        it with the same ``config``).  A single-rank layout needs no process group at all."""
        if config.world_size == 1 and not dist.is_initialized():
            config.validate(1, heads, guidance)
            return cls(config, 0, None, None)
        if not dist.is_initialized():
            raise RuntimeError(
                f"{config.describe()} needs an initialised torch.distributed group "
                "(executors.distributed.init_group or torchrun)"
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        config.validate(world, heads, guidance)
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        seq, u_deg, r_deg = config.sequence_degree, config.ulysses, config.ring
        cfg_idx, s = divmod(rank, seq)

        def group(ranks: list[int]) -> dist.ProcessGroup:
            # torch.distributed requires every rank to create every group, in the same order.
            return dist.new_group(ranks, timeout=timeout)

        cfg_group = None
        if config.cfg:
            for j in range(seq):
                g = group([j, seq + j])
                if j == s:
                    cfg_group = g

        sequence: UlyssesShard | None = None
        if seq > 1:
            use_xfuser = config.attention_backend == "xfuser"
            seq_group = ulysses_group = ring_group = None
            for c in range(config.cfg_degree):
                base = c * seq
                g = group(list(range(base, base + seq)))
                if c == cfg_idx:
                    seq_group = g
                if use_xfuser:  # yunchang wants both groups, a ring of one included
                    for r in range(r_deg):
                        g = group([base + r * u_deg + u for u in range(u_deg)])
                        if c == cfg_idx and r == s // u_deg:
                            ulysses_group = g
                    for u in range(u_deg):
                        g = group([base + r * u_deg + u for r in range(r_deg)])
                        if c == cfg_idx and u == s % u_deg:
                            ring_group = g
            if use_xfuser:
                sequence = XFuserShard(seq_group, seq, s, ulysses_group, ring_group, r_deg)
            else:
                sequence = UlyssesShard(seq_group, seq, s)
        return cls(config, rank, sequence, cfg_group)
