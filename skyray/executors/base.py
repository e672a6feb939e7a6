"""The executor seam: where windows run and where shots are decoded.

The driver (``skyray.render``) decides *what* runs next; an executor decides *where*.  ``local`` runs everything
in this process; ``ray`` runs windows on GPU-group actors and decoding on writer actors, passing latents between
them as object references.  Handles are opaque to the driver: it only ever reads small metadata from them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from skyray.executors.worker import WindowJob


@dataclass(frozen=True)
class WindowMeta:
    shot_id: str
    index: int
    seconds: float
    forwards: int
    worker: str


class WindowError(RuntimeError):
    """Raised by ``Executor.wait_any`` when a window failed: which handle, and why (the driver may retry it)."""

    def __init__(self, handle: Any, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.handle = handle
        self.cause = cause


class Executor(ABC):
    """Runs windows on ``groups`` model replicas and streams finished windows to per-chain writers."""

    groups: int

    @abstractmethod
    def submit(self, group: int, job: WindowJob, handoff: Any) -> Any:
        """Start ``job`` on ``group``; ``handoff`` is a previous handle's ``handoff``, a checkpoint path or None."""

    @abstractmethod
    def wait_any(self, handles: list[Any]) -> Any:
        """Block until one of ``handles`` is finished and return it (raises if its window failed)."""

    @abstractmethod
    def meta(self, handle: Any) -> WindowMeta: ...

    @abstractmethod
    def handoff(self, handle: Any) -> Any:
        """What the next window or shot receives (never materialised in the driver by remote executors)."""

    @abstractmethod
    def open_chain(self, chain: int, width: int, height: int, fps: int, shots_dir: str) -> None: ...

    @abstractmethod
    def begin_shot(self, chain: int, shot_id: str, parent: str | None, parent_tail: str | None, save_latents: bool) -> None: ...

    @abstractmethod
    def add_window(self, chain: int, shot_id: str, handle: Any, checkpoint: str | None, meta: dict) -> None: ...

    @abstractmethod
    def finish_shot(self, chain: int, shot_id: str, keep_state: bool) -> Any:
        """Close the shot's clip; returns a ``ShotResult``."""

    def flush(self, chain: int) -> None:  # noqa: B027 - optional hook
        """Block until the chain's writer has taken (and checkpointed) every window sent so far."""

    def abort_open(self) -> None:  # noqa: B027 - optional hook
        """Drop every shot still being written (their ffmpeg processes end; nothing partial is kept)."""

    def recover(self, group: int, error: BaseException) -> bool:
        """Replace a failed group; False if it cannot be replaced (the render then stops)."""
        return False

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        pass
