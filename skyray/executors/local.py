"""In-process executor: one model replica, windows run synchronously. The reference for every other executor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from skyray.engine.handoff import Handoff
from skyray.executors.base import Executor, WindowError, WindowMeta
from skyray.executors.worker import WindowJob, Worker
from skyray.output.artifacts import ShotArtifacts, read_handoff, window_checkpoint
from skyray.output.chain_writer import ChainWriter
from skyray.scheduler import Failure


@dataclass(frozen=True)
class LocalHandle:
    meta: WindowMeta
    checkpoint: bytes
    handoff: Handoff


def checkpoint_meta(job: WindowJob, meta: WindowMeta) -> dict:
    """What a window checkpoint says about itself (the resume check reads ``hash``)."""
    return {"hash": job.key, "shot": job.shot_id, "window": job.window.index, "seconds": round(meta.seconds, 3),
            "forwards": meta.forwards, "worker": meta.worker}


def render_to_checkpoint(worker: Worker, job: WindowJob, handoff: Any) -> tuple[bytes, Handoff, WindowMeta]:
    """Render one window; its checkpoint bytes, its hand-off and its metadata (shared by every executor)."""
    if isinstance(handoff, bytes):
        handoff = read_handoff(handoff)
    out = worker.render_window(job, handoff)
    meta = WindowMeta(out.shot_id, out.index, out.seconds, out.forwards, out.worker)
    return window_checkpoint(out, checkpoint_meta(job, meta)), out.handoff, meta


class LocalExecutor(Executor):
    groups = 1

    def __init__(self, model: str, device: str | None = None, offload: bool = False) -> None:
        self.worker = Worker(model, device, name="local", offload=offload)
        self._writers: dict[int, ChainWriter] = {}

    def submit(self, group: int, job: WindowJob, handoff: Any) -> LocalHandle:
        try:
            ckpt, hand, meta = render_to_checkpoint(self.worker, job, handoff)
        except Exception as err:  # in one process nothing is lost by accident: the same input fails again
            raise WindowError((job.shot_id, job.window.index), err, Failure.FATAL) from err
        return LocalHandle(meta, ckpt, hand)

    def wait_any(self, handles: list[Any], timeout: float | None = None) -> Any:
        return handles[0] if handles else None

    def result(self, handle: LocalHandle) -> tuple[WindowMeta, bytes]:
        return handle.meta, handle.checkpoint

    def handoff(self, handle: LocalHandle) -> Handoff:
        return handle.handoff

    def open_chain(self, chain: int, width: int, height: int, fps: int) -> None:
        if chain not in self._writers:
            self._writers[chain] = ChainWriter(self.worker.components.vae, width, height, fps)

    def begin_shot(self, chain, shot_id, parent, history, keep_history) -> None:
        self._writers[chain].begin(shot_id, parent, history, keep_history)

    def add_window(self, chain, shot_id, window) -> None:
        self._writers[chain].add(shot_id, window if isinstance(window, bytes) else window.checkpoint)

    def finish_shot(self, chain, shot_id, keep_state) -> ShotArtifacts:
        return self._writers[chain].finish(shot_id, keep_state)

    def has_state(self, chain: int, shot_id: str) -> bool:
        return chain in self._writers and self._writers[chain].has_state(shot_id)

    def forget_state(self, chain: int, shot_id: str) -> None:
        self._writers[chain].forget(shot_id)

    def abort_open(self) -> None:
        for w in self._writers.values():
            w.abort_all()

    def reset_writers(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def shutdown(self) -> None:
        self.reset_writers()
