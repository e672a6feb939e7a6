"""The executor seam: where windows run and where shots are decoded.

The driver (``skyray.render``) decides *what* runs next; an executor decides *where*.  ``local`` runs everything
in this process; ``ray`` runs windows on GPU-group actors and decoding on writer actors, passing latents between
them as object references.  Handles are opaque to the driver.  What it gets back is bytes: each window's
checkpoint (which it stores in the output location) and each shot's finished files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from skyray.executors.worker import WindowJob
from skyray.output.artifacts import ShotArtifacts
from skyray.scheduler import Failure


@dataclass(frozen=True)
class WindowMeta:
    shot_id: str
    index: int
    seconds: float
    forwards: int
    worker: str


class WindowError(RuntimeError):
    """A window failed: which handle, why, and whether a retry can succeed (``failure``)."""

    def __init__(self, handle: Any, cause: BaseException, failure: Failure) -> None:
        super().__init__(str(cause))
        self.handle = handle
        self.cause = cause
        self.failure = failure


class ResourcesUnavailable(RuntimeError):
    """A group (or another stage) could not be placed on the cluster within its stated timeout."""


class WriterLost(RuntimeError):
    """The writer of a chain died; its open shots must be begun again and their windows replayed."""

    def __init__(self, chain: int, cause: BaseException) -> None:
        super().__init__(f"the writer of chain {chain} was lost: {cause}")
        self.chain = chain
        self.cause = cause


class Executor(ABC):
    """Runs windows on ``groups`` model replicas and streams finished windows to per-chain writers."""

    groups: int

    # ------------------------------------------------------------------------------------------------ windows
    @abstractmethod
    def submit(self, group: int, job: WindowJob, handoff: Any) -> Any:
        """Start ``job`` on ``group``; ``handoff`` is a previous handle's ``handoff``, stored hand-off bytes
        (a window checkpoint or a shot's tail), or None."""

    @abstractmethod
    def wait_any(self, handles: list[Any], timeout: float | None = None) -> Any:
        """The first of ``handles`` to finish, or None after ``timeout`` seconds; raises ``WindowError``."""

    @abstractmethod
    def result(self, handle: Any) -> tuple[WindowMeta, bytes]:
        """A finished window's metadata and checkpoint bytes; raises ``WindowError`` if they were lost."""

    @abstractmethod
    def handoff(self, handle: Any) -> Any:
        """What the next window or shot receives (never materialised in the driver by remote executors)."""

    # ------------------------------------------------------------------------------------------------ writers
    @abstractmethod
    def open_chain(self, chain: int, width: int, height: int, fps: int) -> None: ...

    @abstractmethod
    def begin_shot(self, chain: int, shot_id: str, parent: str | None, history: list[bytes] | None,
                   keep_history: bool) -> None:
        """Open a clip; a continuing shot starts from the parent's decoder state, or from ``history`` (the
        ancestors' decode histories, root first) when ``has_state`` says the writer no longer holds it."""

    @abstractmethod
    def add_window(self, chain: int, shot_id: str, window: Any) -> None:
        """Decode one window into its shot's clip: a finished handle, or stored checkpoint bytes."""

    @abstractmethod
    def finish_shot(self, chain: int, shot_id: str, keep_state: bool) -> ShotArtifacts:
        """Close the shot's clip; raises ``WriterLost`` if the chain's writer died."""

    def has_state(self, chain: int, shot_id: str) -> bool:
        """Whether the chain's writer still holds ``shot_id``'s final decoder state."""
        return False

    def forget_state(self, chain: int, shot_id: str) -> None:  # noqa: B027 - optional hook
        """Every child has started from ``shot_id``: its decoder state may go."""

    def restart_writer(self, chain: int) -> list[int]:
        """Replace the chain's lost writer; returns every chain it served (their open shots need replaying)."""
        raise RuntimeError("this executor cannot replace a writer")

    def reset_writers(self) -> None:  # noqa: B027 - optional hook
        """Forget the last film's writers and their decoder states (the groups stay warm)."""

    def abort_open(self) -> None:  # noqa: B027 - optional hook
        """Drop every shot still being written (their ffmpeg processes end; nothing partial is kept)."""

    # ------------------------------------------------------------------------------------------------- groups
    def recover(self, group: int, error: BaseException) -> bool:
        """Start replacing a lost group (returns at once); False if it cannot be replaced at all."""
        return False

    def ready_groups(self) -> list[int]:
        """Groups being replaced that are ready for work now (their resources came back)."""
        return []

    def replacing(self) -> int:
        """How many lost groups are still being replaced (waiting for resources or starting)."""
        return 0

    def missing(self) -> str:
        """What the groups being replaced wait for, in words (for a clear error when they never come)."""
        return "no group can be replaced"

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        pass
