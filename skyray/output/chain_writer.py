"""Decode and encode the shots of one chain as their windows arrive.

One ``ChainWriter`` keeps the causal VAE's state across a chain's shots, so a continuing shot's first frames are
decoded exactly as if the chain were one clip.  It reads windows as checkpoint bytes and hands each finished shot
back as bytes (``ShotArtifacts``): it writes nothing that another node would have to read.

A writer that lost a parent's decoder state (it was restarted, or the parent was rendered by an earlier run)
rebuilds it exactly by replaying the decode history of the chain's ancestors, root first: the decoder is a causal
convolution stack fed one latent at a time, so the same latents give the same state.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from skyray.engine.decode import StreamingDecoder
from skyray.engine.handoff import Handoff
from skyray.output.artifacts import (
    ShotArtifacts,
    handoff_bytes,
    read_shot_history,
    read_window_checkpoint,
    shot_history,
)
from skyray.output.encode import ShotEncoder


class ChainWriter:
    def __init__(self, vae, width: int, height: int, fps: int, scratch: str | Path | None = None) -> None:
        self.vae = vae
        self.size = (width, height)
        self.fps = fps
        # Clips are encoded into this machine's own temp folder and returned as bytes when finished.
        self.scratch = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="skyray-writer-"))
        self._after: dict[str, StreamingDecoder] = {}
        self._open: dict[str, _OpenShot] = {}

    def has_state(self, shot_id: str) -> bool:
        return shot_id in self._after

    def begin(self, shot_id: str, parent: str | None, history: list[bytes] | None, keep_history: bool) -> None:
        """Open ``shot_id``; a continuing shot starts from its parent's decoder state, kept in memory or rebuilt
        from ``history`` (the ancestors' ``shots/<id>.safetensors`` bytes, root first)."""
        if parent is not None and parent in self._after and not history:
            dec = copy.deepcopy(self._after[parent])
        else:
            if parent is not None and not history:
                raise RuntimeError(f"writer has no decoder state for {parent!r} and was given no history")
            dec = StreamingDecoder(self.vae)
            for data in history or []:
                latents, warm = read_shot_history(data)
                if warm is not None:
                    dec.warm(warm)
                dec.warm(latents)
        self.scratch.mkdir(parents=True, exist_ok=True)
        enc = ShotEncoder(self.scratch / f"{shot_id}.mp4", self.size[0], self.size[1], self.fps)
        enc.__enter__()
        self._open[shot_id] = _OpenShot(dec, enc, [] if keep_history else None)

    def add(self, shot_id: str, checkpoint: bytes) -> int:
        """Decode and encode one window (its checkpoint bytes); returns the frames it added."""
        output, _ = read_window_checkpoint(checkpoint)
        o = self._open[shot_id]
        o.last_handoff = output.handoff
        t0 = time.perf_counter()
        if output.warm is not None:
            o.decoder.warm(output.warm)
            o.warm = output.warm.float().cpu()
        frames = o.decoder.push(output.latents)
        o.encoder.write(frames)
        o.frames += len(frames)
        if o.latents is not None:
            o.latents.append(output.latents.float().cpu())
        o.seconds += time.perf_counter() - t0
        return len(frames)

    def finish(self, shot_id: str, keep_state: bool) -> ShotArtifacts:
        o = self._open.pop(shot_id)
        t0 = time.perf_counter()
        path = Path(o.encoder.close())
        clip = path.read_bytes()
        path.unlink(missing_ok=True)
        history = shot_history(torch.cat(o.latents, dim=2), o.warm) if o.latents else None
        tail = None
        if o.last_handoff is not None and o.last_handoff.tail is not None:  # small: any later shot may continue
            tail = handoff_bytes(Handoff(o.last_handoff.tail, None))
        if keep_state:
            self._after[shot_id] = o.decoder
        return ShotArtifacts(shot_id, o.frames, clip, o.seconds + time.perf_counter() - t0, history, tail)

    def forget(self, shot_id: str) -> None:
        """Drop a parent's decoder state once every child has started from it (it can be large at 540p)."""
        self._after.pop(shot_id, None)

    def abort_all(self) -> None:
        """Close every unfinished clip without keeping it (the render stopped; finished shots stay)."""
        for shot_id in list(self._open):
            self.abort(shot_id)

    def abort(self, shot_id: str) -> None:
        o = self._open.pop(shot_id, None)
        if o is not None:
            o.encoder.abort()

    def close(self) -> None:
        self.abort_all()
        shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass
class _OpenShot:
    decoder: StreamingDecoder
    encoder: ShotEncoder
    latents: list[torch.Tensor] | None
    frames: int = 0
    seconds: float = 0.0
    last_handoff: Handoff | None = None
    warm: torch.Tensor | None = None
