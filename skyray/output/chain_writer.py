"""Decode and encode the shots of one chain as their windows arrive; checkpoint every window.

One ``ChainWriter`` per chain keeps the causal VAE's state across the chain's shots, so a continuing shot's first
frames are decoded exactly as if the chain were one clip.  Window checkpoints (latents, hand-off tail, RNG state)
make a render resumable window by window.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from skyray.engine.decode import StreamingDecoder
from skyray.engine.handoff import Handoff, WindowOutput
from skyray.output.encode import ShotEncoder


def checkpoint_path(ckpt_dir: Path, shot_id: str, index: int) -> Path:
    return ckpt_dir / shot_id / f"w{index:04d}.safetensors"


def save_checkpoint(path: Path, output: WindowOutput, handoff: Handoff, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"latents": output.latents.contiguous(), "rng_state": handoff.rng_state.contiguous()}
    if handoff.tail is not None:
        tensors["tail"] = handoff.tail.contiguous()
    if output.warm is not None:
        tensors["warm"] = output.warm.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def checkpoint_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])


def load_checkpoint(path: str | Path) -> tuple[WindowOutput, Handoff]:
    t = load_file(str(path))
    meta = checkpoint_meta(Path(path))
    out = WindowOutput(meta["shot"], meta["window"], t["latents"], Handoff(t.get("tail"), t["rng_state"]), t.get("warm"))
    return out, out.handoff


@dataclass
class ShotResult:
    shot_id: str
    frames: int
    path: str
    decode_seconds: float
    latents_path: str | None = None


class ChainWriter:
    """Streams each shot of a chain to ``shots/<id>.mp4``; decoder state is kept per finished shot for children."""

    def __init__(self, vae, shots_dir: Path, width: int, height: int, fps: int) -> None:
        self.vae = vae
        self.shots_dir = Path(shots_dir)
        self.size = (width, height)
        self.fps = fps
        self._after: dict[str, StreamingDecoder] = {}
        self._open: dict[str, _OpenShot] = {}

    def begin(self, shot_id: str, parent: str | None, parent_tail: torch.Tensor | None, save_latents: bool) -> None:
        if parent is not None and parent in self._after:
            dec = copy.deepcopy(self._after[parent])
        else:
            dec = StreamingDecoder(self.vae)
            if parent_tail is not None:
                # The parent was decoded in an earlier run: prime the cache with its tail (close, not exact).
                dec.warm(parent_tail)
        self.shots_dir.mkdir(parents=True, exist_ok=True)
        enc = ShotEncoder(self.shots_dir / f"{shot_id}.mp4", self.size[0], self.size[1], self.fps)
        enc.__enter__()
        self._open[shot_id] = _OpenShot(dec, enc, [] if save_latents else None)

    def add(self, shot_id: str, output: WindowOutput | str, handoff: Handoff | None = None,
            checkpoint: str | None = None, meta: dict | None = None) -> int:
        """Decode and encode one window's latents; ``output`` may be a checkpoint path (resumed window)."""
        if isinstance(output, str):
            output, handoff = load_checkpoint(output)
        elif checkpoint is not None:
            save_checkpoint(Path(checkpoint), output, handoff, meta or {})
        o = self._open[shot_id]
        o.last_handoff = handoff
        t0 = time.perf_counter()
        if output.warm is not None:
            o.decoder.warm(output.warm)
        latents = output.latents
        frames = o.decoder.push(latents)
        o.encoder.write(frames)
        o.frames += len(frames)
        if o.latents is not None:
            o.latents.append(latents.float().cpu())
        o.seconds += time.perf_counter() - t0
        return len(frames)

    def finish(self, shot_id: str, keep_state: bool) -> ShotResult:
        o = self._open.pop(shot_id)
        t0 = time.perf_counter()
        path = o.encoder.close()
        latents_path = None
        if o.latents is not None:
            lat = torch.cat(o.latents, dim=2)[0].contiguous()  # [16, T, h, w]
            latents_path = str(self.shots_dir / f"{shot_id}.safetensors")
            tmp = latents_path + ".tmp"
            save_file({"latents": lat}, tmp)
            os.replace(tmp, latents_path)
        tail = o.last_handoff.tail if o.last_handoff is not None else None
        if tail is not None:
            tmp = self.shots_dir / f".{shot_id}.tail.tmp"
            save_file({"tail": tail.contiguous()}, str(tmp))
            os.replace(tmp, self.shots_dir / f"{shot_id}.tail.safetensors")
        if keep_state:
            self._after[shot_id] = o.decoder
        return ShotResult(shot_id, o.frames, str(path), o.seconds + time.perf_counter() - t0, latents_path)

    def abort_all(self) -> None:
        """Close every unfinished clip without keeping it (the render stopped; finished shots stay)."""
        for shot_id in list(self._open):
            self.abort(shot_id)

    def abort(self, shot_id: str) -> None:
        o = self._open.pop(shot_id, None)
        if o is not None:
            o.encoder.abort()


@dataclass
class _OpenShot:
    decoder: StreamingDecoder
    encoder: ShotEncoder
    latents: list[torch.Tensor] | None
    frames: int = 0
    seconds: float = 0.0
    last_handoff: Handoff | None = None


def load_handoff(path: str | Path) -> Handoff:
    """A hand-off from a window checkpoint or a finished shot's ``<id>.tail.safetensors``."""
    t = load_file(str(path))
    return Handoff(t.get("tail"), t.get("rng_state"))
