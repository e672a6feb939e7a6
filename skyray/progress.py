"""What a render shows on a terminal: one display on a TTY, one line per window in a log, and ``render.log``.

Everything the user sees comes from events, never from actors' stdout: the driver's render events
(``skyray.render``: plan, shot_start, window, retry, writer_lost, shot_done, film_done), and what actors send to a
small sink actor (``EventSink``): per-row progress of the window they are sampling, and their WARNING-and-above
log records.  Ray itself is started without forwarding worker output (``ensure_ray(quiet=True)``), so nothing
prefixed ``(pid=...)`` lands between the lines.

- On a TTY: a ``rich`` display of the film (windows done, elapsed, ETA, GPU-seconds), each open shot (window i of
  n, the denoising row of the window being sampled), with warnings printed above it.
- Elsewhere (CI, a RayJob's log): one line per finished window, plus shots, retries and warnings.
- Always: the same lines in ``render.log`` next to the outputs (written through the output location, so an
  ``s3://`` render gets it too), refreshed after every shot.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

SINK_NAME = "skyray-progress"
LOG_NAME = "render.log"
ROW_INTERVAL_S = 0.2  # an actor sends at most this often per window row stream (plus first and last row)
POLL_S = 0.25


# --------------------------------------------------------------------------------------------------- state


@dataclass
class ShotState:
    windows: int
    done: int = 0
    row: tuple[int, int] | None = None  # (row, rows) of the window being sampled


@dataclass
class FilmState:
    """Counts, ETA and GPU-seconds of one render, from its events (pure: the clock is passed in)."""

    windows: dict[str, int]  # shot id -> windows
    gpus_per_window: int = 1
    started: float = 0.0
    done: dict[str, int] = field(default_factory=dict)
    open: dict[str, ShotState] = field(default_factory=dict)
    gpu_seconds: float = 0.0
    run_windows: int = 0  # windows sampled in this run (not reused or resumed)
    first_window_at: float | None = None
    retries: int = 0

    @property
    def total(self) -> int:
        return sum(self.windows.values())

    @property
    def finished(self) -> int:
        return sum(self.done.values())

    def eta(self, now: float) -> float | None:
        """Seconds left at this run's pace so far (wall clock, so parallel groups count as they run)."""
        if not self.run_windows:
            return None
        pace = (now - self.started) / self.run_windows
        return max(0.0, pace * (self.total - self.finished))

    def update(self, event: dict, now: float) -> None:
        kind = event["type"]
        if kind == "plan":
            self.started = now
            for sid in event.get("reused", []):
                self.done[sid] = self.windows.get(sid, 0)
        elif kind == "shot_start":
            self.open[event["shot"]] = ShotState(event["windows"])
        elif kind == "window":
            sid = event["shot"]
            self.done[sid] = max(self.done.get(sid, 0), event["window"] + 1)
            self.gpu_seconds += float(event["seconds"]) * self.gpus_per_window
            self.run_windows += 1
            st = self.open.get(sid)
            if st is not None:
                st.done, st.row = self.done[sid], None
        elif kind == "row":
            st = self.open.get(event["shot"])
            if st is not None and event["window"] >= st.done:
                st.row = (event["row"] + 1, event["rows"])
        elif kind == "shot_done":
            self.done[event["shot"]] = self.windows.get(event["shot"], 0)
            self.open.pop(event["shot"], None)
        elif kind == "retry":
            self.retries += 1


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def line_for(event: dict, state: FilmState, now: float) -> str | None:
    """The log line of an event (after ``state`` took it in), or None for events a log does not show."""
    kind = event["type"]
    stamp = f"[{clock(now - state.started)}]"
    if kind == "plan":
        reused = event.get("reused") or []
        text = f"plan: {event['shots']} shot(s), {event['windows']} window(s)"
        return stamp + " " + text + (f"; reusing {len(reused)} finished shot(s): {', '.join(reused)}" if reused else "")
    if kind == "window":
        sid = event["shot"]
        return (f"{stamp} window {state.finished}/{state.total} | shot {sid} {event['window'] + 1}/{event['windows']}"
                f" | {float(event['seconds']):.2f} s | {state.gpu_seconds:.1f} GPU-s | ETA {clock(state.eta(now))}")
    if kind == "shot_done":
        return f"{stamp} shot {event['shot']}: {event['frames']} frames -> {event['path']}"
    if kind == "retry":
        return f"{stamp} retrying shot {event['shot']} window {event['window']} on group {event['group']}: {event['error']}"
    if kind == "writer_lost":
        return f"{stamp} writer of chain {event['chain']} lost ({event['error']}); replaying its open shots"
    if kind == "film_done":
        return (f"{stamp} film: {event['frames']} frames -> {event['path']} | {state.gpu_seconds:.1f} GPU-s in "
                f"{clock(now - state.started)}")
    if kind == "log":
        where = f"{event['worker']}: " if event.get("worker") else ""
        return f"{stamp} {event['level']}: {where}{event['message']}"
    return None


# ------------------------------------------------------------------------------------------------ displays


class LineLog:
    """Non-TTY output: the lines, as they come."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def show(self, state: FilmState, now: float) -> None:
        pass

    def message(self, line: str, kind: str = "") -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class TtyDisplay:
    """One ``rich`` display: the film, then each open shot; messages scroll above it."""

    def __init__(self, stream: TextIO, title: str) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=stream, highlight=False)
        self.title = title
        self.live = Live(console=self.console, refresh_per_second=4, transient=False, redirect_stdout=False,
                         redirect_stderr=False)
        self._state: FilmState | None = None
        self._now = 0.0
        self.live.start()

    def show(self, state: FilmState, now: float) -> None:
        self._state, self._now = state, now
        self.live.update(self._render(), refresh=False)

    def _render(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        s = self._state
        if s is None:
            return Group()
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(width=30)
        grid.add_column(no_wrap=True)
        total = max(1, s.total)
        grid.add_row(f"[bold]{self.title}[/]", ProgressBar(total=total, completed=s.finished, width=30),
                     f"{s.finished}/{s.total} windows | {clock(self._now - s.started)} elapsed | ETA "
                     f"{clock(s.eta(self._now))} | {s.gpu_seconds:.1f} GPU-s"
                     + (f" | {s.retries} retries" if s.retries else ""))
        for sid, st in s.open.items():
            row = f" | row {st.row[0]}/{st.row[1]}" if st.row else ""
            grid.add_row(f"  shot {sid}", ProgressBar(total=max(1, st.windows), completed=st.done, width=30),
                         f"window {min(st.done + 1, st.windows)}/{st.windows}{row}")
        return grid

    def message(self, line: str, kind: str = "") -> None:
        if kind != "window":  # windows are the display's own business; the rest scrolls above it
            self.live.console.print(line, markup=False, highlight=False)

    def close(self) -> None:
        if self._state is not None:
            self.live.update(self._render(), refresh=True)
        self.live.stop()


# --------------------------------------------------------------------------------------------------- the hub


class RenderProgress:
    """The ``on_event`` of a render: updates the state, the display and the log file; thread-safe (actor events
    arrive from the sink's poller thread)."""

    def __init__(self, plan, display, log_file: Callable[[bytes], None] | None = None, gpus_per_window: int = 1,
                 clock_fn: Callable[[], float] = time.monotonic) -> None:
        self.state = FilmState({s.id: len(s.windows) for s in plan.shots}, gpus_per_window)
        self.state.started = clock_fn()
        self.display = display
        self.lines: list[str] = []
        self.write_log = log_file
        self.now = clock_fn
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        with self._lock:
            now = self.now()
            self.state.update(event, now)
            line = line_for(event, self.state, now)
            if line is not None:
                self.lines.append(line)
                self.display.message(line, event["type"])
            self.display.show(self.state, now)
            if event["type"] in ("shot_done", "film_done"):
                self._flush()

    def _flush(self) -> None:
        if self.write_log is not None:
            try:
                self.write_log(("\n".join(self.lines) + "\n").encode())
            except Exception as exc:  # the render matters more than its log
                self.display.message(f"could not write {LOG_NAME}: {exc}")
                self.write_log = None

    def close(self) -> None:
        with self._lock:
            self._flush()
            self.display.close()


class _DriverLogs(logging.Handler):
    """The driver's own warnings go through the display too (a bare stderr write would tear it)."""

    def __init__(self, progress: RenderProgress) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress({"type": "log", "level": record.levelname, "worker": None, "message": record.getMessage()})
        except Exception:
            self.handleError(record)


# --------------------------------------------------------------------------------------------- actors' side


class EventSink:
    """A Ray actor (see ``start_sink``) holding what actors sent until the driver drains it."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def put(self, item: dict) -> None:
        if len(self.items) < 10_000:  # a driver that stopped draining must not grow this without bound
            self.items.append(item)

    def drain(self) -> list[dict]:
        items, self.items = self.items, []
        return items


class ActorReporter:
    """Inside an actor: per-row progress and WARNING+ log records to the driver's sink, fire and forget.  The
    sink is looked up lazily (the actor may start before the driver's display does) and never waited on."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._sink: Any = None
        self._looked = -1e9
        self._sent_row = 0.0

    def _handle(self):
        if self._sink is None and time.monotonic() - self._looked > 5.0:
            self._looked = time.monotonic()
            import ray

            try:
                self._sink = ray.get_actor(SINK_NAME)
            except ValueError:  # no display is listening (a Serve replica, --quiet)
                self._sink = None
        return self._sink

    def send(self, item: dict) -> None:
        sink = self._handle()
        if sink is not None:
            try:
                sink.put.remote(item)
            except Exception:  # the driver went away; progress is a nicety
                self._sink = None

    def row(self, shot: str, window: int, row: int, rows: int) -> None:
        now = time.monotonic()
        if row == 0 or row + 1 == rows or now - self._sent_row >= ROW_INTERVAL_S:
            self._sent_row = now
            self.send({"type": "row", "shot": shot, "window": window, "row": row, "rows": rows, "worker": self.name})

    def forward_logs(self) -> None:
        """Send this process's WARNING+ records (warnings.warn included) to the driver, once per process."""
        root = logging.getLogger()
        if any(isinstance(h, _ForwardLogs) for h in root.handlers):
            return
        logging.captureWarnings(True)
        root.addHandler(_ForwardLogs(self))


class _ForwardLogs(logging.Handler):
    def __init__(self, reporter: ActorReporter) -> None:
        super().__init__(logging.WARNING)
        self.reporter = reporter
        self._busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._busy, "on", False):  # a warning raised while sending one
            return
        self._busy.on = True
        try:
            self.reporter.send({"type": "log", "level": record.levelname, "worker": self.reporter.name,
                                "message": record.getMessage().splitlines()[0][:500] if record.getMessage() else ""})
        finally:
            self._busy.on = False


def start_sink(on_item: Callable[[dict], None]) -> Callable[[], None]:
    """Start the sink actor and a thread feeding what arrives to ``on_item``; returns ``stop``."""
    import ray

    sink = ray.remote(num_cpus=0)(EventSink).options(name=SINK_NAME, max_concurrency=4).remote()
    halt = threading.Event()

    def drain() -> None:
        try:
            for item in ray.get(sink.drain.remote(), timeout=10):
                on_item(item)
        except Exception:  # a lost sink costs row progress and forwarded warnings, never the render
            pass

    def poll() -> None:
        while not halt.wait(POLL_S):
            drain()

    thread = threading.Thread(target=poll, name="skyray-progress", daemon=True)
    thread.start()

    def stop() -> None:
        halt.set()
        thread.join(timeout=5)
        drain()
        ray.kill(sink)

    return stop


# ------------------------------------------------------------------------------------------------ the entry


def terminal_progress(plan, executor, out: Any = None, quiet: bool = False, stream: TextIO | None = None,
                      tty: bool | None = None) -> tuple[Callable[[dict], None] | None, Callable[[], None]]:
    """``(on_event, close)`` for a render of ``plan`` on ``executor`` into ``out`` (a folder, URI or location):
    the display (a TTY's, or lines), ``render.log`` in ``out``, per-row progress and actors' warnings."""
    if quiet:
        return None, lambda: None
    stream = stream or sys.stderr
    tty = stream.isatty() if tty is None else tty
    display = TtyDisplay(stream, plan.title or "film") if tty else LineLog(stream)
    log_file = None
    if out is not None:
        from skyray.output.location import OutputLocation

        location = out if isinstance(out, OutputLocation) else OutputLocation(out)
        log_file = lambda data: location.write_bytes(LOG_NAME, data)  # noqa: E731
    progress = RenderProgress(plan, display, log_file, getattr(executor, "gpus_per_group", 1))
    stops: list[Callable[[], None]] = []

    worker = getattr(executor, "worker", None)
    if worker is not None:  # in-process: rows come straight from the sampler
        worker.on_row = lambda shot, window, row, rows: progress(
            {"type": "row", "shot": shot, "window": window, "row": row, "rows": rows})
    else:
        try:
            import ray

            if ray.is_initialized():
                stops.append(start_sink(progress))
        except Exception as exc:
            display.message(f"(no live row progress or actor warnings: {exc})")
    handler = _DriverLogs(progress)
    root = logging.getLogger()
    root.addHandler(handler)  # with a handler on the root, Python's last-resort stderr printing stays silent

    def close() -> None:
        for stop in stops:
            try:
                stop()
            except Exception:
                pass
        root.removeHandler(handler)
        if worker is not None:
            worker.on_row = None
        progress.close()

    return progress, close
