"""The byte formats that cross nodes: window checkpoints, hand-offs, a shot's decode history, its finished files.

Nothing crosses a node as a path.  A group actor returns each window as one checkpoint (safetensors bytes: the
window's latents, its hand-off and its metadata); the chain writer decodes from those bytes and the driver stores
the same bytes in the output location, from where a retried or resumed render reads them back.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import BinaryIO

import torch
from safetensors.torch import load, save

from skyray.engine.handoff import Handoff, WindowOutput


def checkpoint_rel(shot_id: str, index: int) -> str:
    return f"checkpoints/{shot_id}/w{index:04d}.safetensors"


def window_checkpoint(output: WindowOutput, meta: dict) -> bytes:
    """One finished window: everything its writer decodes and everything the next window continues from."""
    tensors = {"latents": output.latents.contiguous()}
    if output.handoff.rng_state is not None:
        tensors["rng_state"] = output.handoff.rng_state.contiguous()
    if output.handoff.tail is not None:
        tensors["tail"] = output.handoff.tail.contiguous()
    if output.warm is not None:
        tensors["warm"] = output.warm.contiguous()
    return save(tensors, metadata={"meta": json.dumps(meta)})


def read_window_checkpoint(data: bytes) -> tuple[WindowOutput, dict]:
    t = load(data)
    meta = header_meta(data)
    out = WindowOutput(meta.get("shot", ""), int(meta.get("window", 0)), t["latents"],
                       Handoff(t.get("tail"), t.get("rng_state")), t.get("warm"))
    return out, meta


def handoff_bytes(handoff: Handoff) -> bytes:
    tensors = {}
    if handoff.tail is not None:
        tensors["tail"] = handoff.tail.contiguous()
    if handoff.rng_state is not None:
        tensors["rng_state"] = handoff.rng_state.contiguous()
    return save(tensors)


def read_handoff(data: bytes) -> Handoff:
    """A hand-off from a window checkpoint's bytes or a finished shot's ``<id>.tail.safetensors``."""
    t = load(data)
    return Handoff(t.get("tail"), t.get("rng_state"))


def header_meta(data: bytes | BinaryIO) -> dict:
    """The ``meta`` JSON of a safetensors file, read from its header only (a checkpoint's tensors stay unread)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        n = struct.unpack("<Q", bytes(data[:8]))[0]
        header = bytes(data[8 : 8 + n])
    else:
        n = struct.unpack("<Q", data.read(8))[0]
        if n > 100 << 20:
            raise ValueError("not a safetensors file (header too large)")
        header = data.read(n)
    meta = json.loads(header).get("__metadata__") or {}
    return json.loads(meta["meta"]) if "meta" in meta else {}


def shot_history(latents: torch.Tensor, warm: torch.Tensor | None) -> bytes:
    """What the causal decoder saw over a shot: ``warm`` (a video's clean tail) then ``latents`` [1, 16, T, h, w].

    Stored as ``shots/<id>.safetensors`` (``latents`` [16, T, h, w] float32, as ``--save-latents`` documents);
    replaying a chain's histories root first rebuilds a lost decoder state exactly.
    """
    tensors = {"latents": latents[0].float().contiguous()}
    if warm is not None:
        tensors["warm"] = warm[0].float().contiguous()
    return save(tensors)


def read_shot_history(data: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
    t = load(data)
    warm = t.get("warm")
    return t["latents"].unsqueeze(0), None if warm is None else warm.unsqueeze(0)


@dataclass
class ShotArtifacts:
    """A finished shot as bytes, from its writer to the driver, which stores them in the output location."""

    shot_id: str
    frames: int
    clip: bytes  # shots/<id>.mp4
    decode_seconds: float
    history: bytes | None = None  # shots/<id>.safetensors: kept for --save-latents and for shots with children
    tail: bytes | None = None  # shots/<id>.tail.safetensors: the last window's hand-off, for continuing shots
