"""Which window runs on which group next: a pure state machine over shots, windows and groups.

No Ray, no models, no files: the render loop (``skyray.render``) tells it what happened (a window finished, failed,
a group was lost or came back) and asks it what to start.  A shot's windows run one after another (each continues
from the last); a continuing shot starts once its parent has finished; independent chains and branches run side by
side on free groups.  A window that failed for a reason that can pass (a lost actor, node or object) runs again,
at most ``max_retries`` times; one that will fail again (a bad input, a bug) fails the render at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum


class Failure(Enum):
    """Why a window failed, as the executor classifies it."""

    FATAL = "fatal"  # it will fail again: stop now with its message
    INPUT_LOST = "input_lost"  # an object it needed is gone; its group is fine
    GROUP_LOST = "group_lost"  # its group (an actor, a node) died: retry elsewhere, replace the group


class GroupState(Enum):
    FREE = "free"
    BUSY = "busy"
    LOST = "lost"  # being replaced, or waiting for resources


@dataclass
class ShotTask:
    id: str
    windows: int
    parent: str | None = None
    next: int = 0  # the next window to run
    running: int | None = None  # the group running its current window
    opened: bool = False  # its writer has begun it
    done: bool = False
    reused: bool = False  # finished by an earlier run


@dataclass(frozen=True)
class Assignment:
    shot: str
    window: int
    group: int
    retry: bool  # a window that ran before: continue from the stored checkpoint, not an in-memory hand-off


@dataclass
class Scheduler:
    shots: dict[str, ShotTask]
    groups: dict[int, GroupState]
    max_retries: int = 2
    attempts: dict[tuple[str, int], int] = field(default_factory=dict)  # failures so far per window

    @classmethod
    def build(cls, shots: Iterable[tuple[str, int, str | None]], groups: int, max_retries: int = 2) -> Scheduler:
        tasks = {sid: ShotTask(sid, n, parent) for sid, n, parent in shots}
        for t in tasks.values():
            if t.parent is not None and t.parent not in tasks:
                raise ValueError(f"shot {t.id!r} continues unknown shot {t.parent!r}")
        return cls(tasks, dict.fromkeys(range(groups), GroupState.FREE), max_retries)

    # ------------------------------------------------------------------------------------------ before start
    def reuse(self, shot: str) -> None:
        """The shot was finished by an earlier run (its files are in the output location)."""
        t = self.shots[shot]
        t.done = t.reused = True
        t.next = t.windows

    def resume(self, shot: str, windows_done: int) -> None:
        """An interrupted run checkpointed the shot's first ``windows_done`` windows."""
        self.shots[shot].next = min(windows_done, self.shots[shot].windows)

    # -------------------------------------------------------------------------------------------------- ask
    def ready(self) -> list[ShotTask]:
        """Shots whose next window can start now (storyboard order)."""
        out = []
        for t in self.shots.values():
            if t.done or t.running is not None or t.next >= t.windows:
                continue
            if t.parent is not None and not self.shots[t.parent].done:
                continue
            out.append(t)
        return out

    def assign(self) -> list[Assignment]:
        """Pair ready windows with free groups (and mark both busy)."""
        free = [g for g, s in self.groups.items() if s is GroupState.FREE]
        out = []
        for t, g in zip(self.ready(), free):
            t.running = g
            self.groups[g] = GroupState.BUSY
            out.append(Assignment(t.id, t.next, g, self.attempts.get((t.id, t.next), 0) > 0))
        return out

    def closable(self) -> list[ShotTask]:
        """Shots whose windows are all rendered but whose writer has not finished them yet."""
        return [t for t in self.shots.values() if not t.done and t.next >= t.windows and t.running is None]

    @property
    def finished(self) -> bool:
        return all(t.done for t in self.shots.values())

    @property
    def running(self) -> int:
        return sum(t.running is not None for t in self.shots.values())

    @property
    def live_groups(self) -> int:
        return sum(s is not GroupState.LOST for s in self.groups.values())

    def lost_groups(self) -> list[int]:
        return [g for g, s in self.groups.items() if s is GroupState.LOST]

    def blocked(self) -> bool:
        """Nothing runs and nothing can start although shots remain (every group lost, or a broken plan)."""
        return not self.finished and self.running == 0 and not self.closable() and not self.assignable()

    def assignable(self) -> bool:
        return bool(self.ready()) and any(s is GroupState.FREE for s in self.groups.values())

    # ------------------------------------------------------------------------------------------------- tell
    def window_done(self, shot: str, window: int) -> bool:
        """Window ``window`` of ``shot`` finished; True when it was the shot's last."""
        t = self._running(shot, window)
        self.groups[t.running] = GroupState.FREE
        t.running = None
        t.next += 1
        return t.next >= t.windows

    def window_failed(self, shot: str, window: int, failure: Failure) -> bool:
        """Window ``window`` of ``shot`` failed; True if it will run again, False if the render must stop."""
        t = self._running(shot, window)
        group, t.running = t.running, None
        self.groups[group] = GroupState.LOST if failure is Failure.GROUP_LOST else GroupState.FREE
        if failure is Failure.FATAL:
            return False
        key = (shot, window)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key] <= self.max_retries

    def shot_opened(self, shot: str) -> None:
        self.shots[shot].opened = True

    def shot_done(self, shot: str) -> None:
        t = self.shots[shot]
        t.done, t.opened = True, False

    def group_lost(self, group: int) -> None:
        """A group died outside a window (or its replacement failed): no new work until it is back."""
        self.groups[group] = GroupState.LOST

    def group_ready(self, group: int) -> None:
        if self.groups.get(group) is GroupState.LOST:
            self.groups[group] = GroupState.FREE

    def reopen(self, shots: Iterable[str]) -> list[ShotTask]:
        """Shots whose writer was lost: they must be begun again and their finished windows replayed."""
        return [self.shots[s] for s in shots if self.shots[s].opened and not self.shots[s].done]

    def open_shots(self) -> list[ShotTask]:
        return [t for t in self.shots.values() if t.opened and not t.done]

    def _running(self, shot: str, window: int) -> ShotTask:
        t = self.shots[shot]
        if t.running is None or t.next != window:
            raise ValueError(f"window {window} of shot {shot!r} is not running")
        return t
