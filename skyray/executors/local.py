"""In-process executor: one model replica, windows run synchronously. The reference for every other executor."""

from __future__ import annotations

from typing import Any

from skyray.engine.handoff import Handoff, WindowOutput
from skyray.executors.base import Executor, WindowMeta
from skyray.executors.worker import WindowJob, Worker
from skyray.output.chain_writer import ChainWriter, load_handoff


class LocalExecutor(Executor):
    groups = 1

    def __init__(self, model: str, device: str | None = None, offload: bool = False) -> None:
        self.worker = Worker(model, device, name="local", offload=offload)
        self._writers: dict[int, ChainWriter] = {}

    def submit(self, group: int, job: WindowJob, handoff: Any) -> tuple[WindowOutput, Handoff]:
        if isinstance(handoff, str):
            handoff = load_handoff(handoff)
        out = self.worker.render_window(job, handoff)
        return out, out.handoff

    def wait_any(self, handles: list[Any]) -> Any:
        return handles[0]

    def meta(self, handle) -> WindowMeta:
        out = handle[0]
        return WindowMeta(out.shot_id, out.index, out.seconds, out.forwards, out.worker)

    def handoff(self, handle) -> Handoff:
        return handle[1]

    def open_chain(self, chain: int, width: int, height: int, fps: int, shots_dir: str) -> None:
        self._writers[chain] = ChainWriter(self.worker.components.vae, shots_dir, width, height, fps)

    def begin_shot(self, chain, shot_id, parent, parent_tail, save_latents) -> None:
        tail = load_handoff(parent_tail).tail if parent_tail else None
        self._writers[chain].begin(shot_id, parent, tail, save_latents)

    def add_window(self, chain, shot_id, handle, checkpoint, meta) -> None:
        if isinstance(handle, str):
            self._writers[chain].add(shot_id, handle)
        else:
            self._writers[chain].add(shot_id, handle[0], handle[1], checkpoint, meta)

    def abort_open(self) -> None:
        for w in self._writers.values():
            w.abort_all()

    def finish_shot(self, chain, shot_id, keep_state):
        return self._writers[chain].finish(shot_id, keep_state)

