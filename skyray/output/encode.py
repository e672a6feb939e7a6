"""ffmpeg output: stream uint8 frames into an H.264 mp4 per shot, join shots into the film, probe results.

Everything runs the one ffmpeg binary from ``ffmpeg_exe()`` (a system ffmpeg, else the one imageio-ffmpeg
bundles), built with ffmpeg-python. imageio-ffmpeg ships no ffprobe, so ``probe`` reads ``ffmpeg -i`` output.
Every file is written under a temporary name and renamed on success (see ``atomic``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import ffmpeg
import numpy as np

from skyray.output.atomic import atomic_path, temp_path_for

Rate = int | float | Fraction
# Quiet ffmpeg: errors only, and they are short enough to quote in an exception.
_QUIET = ["-hide_banner", "-loglevel", "error"]


def ffmpeg_exe() -> str:
    """The ffmpeg binary: ``ffmpeg`` on PATH, else imageio-ffmpeg's bundled build (which has libx264)."""
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _rate(fps: Rate) -> Fraction:
    # 23.976 as a float is not 24000/1001; a bounded denominator recovers the usual NTSC-style rates.
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return rate


def _rate_arg(rate: Fraction) -> str:
    return str(rate.numerator) if rate.denominator == 1 else f"{rate.numerator}/{rate.denominator}"


def _args(stream: ffmpeg.nodes.Node, global_args: Sequence[str] = _QUIET) -> list[str]:
    # ffmpeg-python appends global args after the output, where ffmpeg >= 7 ignores them: put them up front.
    args = stream.compile(cmd=ffmpeg_exe())
    return [args[0], *global_args, *args[1:]]


def _run(stream: ffmpeg.nodes.Node, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_args(stream), stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed to {what}: {proc.stderr.decode(errors='replace').strip()}")
    return proc


class ShotEncoder:
    """Encode one shot to H.264 (yuv420p, +faststart) mp4, frames streamed to ffmpeg as they are decoded.

    Use as a context manager: a clean exit finishes the file and renames it into place; an exception kills
    ffmpeg and removes the temporary file, so no partial mp4 is ever left at ``path``.
    """

    def __init__(
        self, path: str | os.PathLike, width: int, height: int, fps: Rate, crf: int = 18, preset: str = "veryfast"
    ) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs an even frame size, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height, self.rate = int(width), int(height), _rate(fps)
        self.crf, self.preset = int(crf), preset
        self.frames = 0
        self._tmp = temp_path_for(self.path)
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._closed = False

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stream = ffmpeg.input(
            "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{self.width}x{self.height}",
            framerate=_rate_arg(self.rate),
        ).output(
            str(self._tmp), format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=self.crf, preset=self.preset,
            movflags="+faststart",
        )
        # stderr to a file, not a pipe: an unread pipe could fill up and stall ffmpeg mid-shot.
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            _args(stream.overwrite_output()), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr
        )

    def _error(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 frames [n, H, W, 3] (or one frame [H, W, 3])."""
        if self._closed:
            raise RuntimeError("write after close")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"expected uint8 frames [n, {self.height}, {self.width}, 3], got {frames.dtype} {frames.shape}"
            )
        if self._proc is None:
            self._start()
        try:
            for frame in frames:
                self._proc.stdin.write(np.ascontiguousarray(frame).data)
                self.frames += 1
        except BrokenPipeError as e:
            self._proc.wait()
            err = self._error()
            self.abort()
            raise RuntimeError(f"ffmpeg exited while encoding {self.path}: {err}") from e

    def close(self) -> Path:
        """Finish the file and move it to ``path``; returns ``path``."""
        if self._closed:
            return self.path
        if self._proc is None:
            self.abort()
            raise ValueError(f"no frames written to {self.path}")
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg already exited; its exit status below says why
        rc = self._proc.wait()
        if rc != 0:
            err = self._error()
            self.abort()
            raise RuntimeError(f"ffmpeg failed encoding {self.path} (exit {rc}): {err}")
        os.replace(self._tmp, self.path)
        self._cleanup()
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and remove the temporary file; ``path`` is left untouched."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._tmp.unlink(missing_ok=True)
        self._cleanup()

    def _cleanup(self) -> None:
        self._closed = True
        if self._proc is not None and self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> ShotEncoder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def concat(
    clips: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    fps: Rate,
    fades: Sequence[float | None] | None = None,
    crf: int = 18,
    preset: str = "veryfast",
) -> Path:
    """Join mp4 clips in order into ``out_path``; ``fades[i]`` (seconds) is the transition into clip i + 1.

    No fades: the concat demuxer copies the streams (no re-encode, no quality loss). With fades, each one is a
    fade through black centred on the join: the earlier clip fades out over its last ``fade / 2`` seconds and the
    later one fades in over its first ``fade / 2``. Unlike a crossfade (``xfade``), which overlaps the clips and
    shortens the film by the fade per join, this keeps every frame, so the film's frame count stays the sum of the
    clips' and shot boundaries stay where the plan put them. Each side of a join fades over
    ``round(fade * fps / 2)`` frames (at least 1, at most the clip). This path re-encodes with ``crf`` / ``preset``.

    ``fps`` must be the clips' frame rate; all clips share one size and rate, as ``ShotEncoder`` writes them.
    """
    clips = [Path(c) for c in clips]
    if not clips:
        raise ValueError("nothing to concatenate")
    fades = list(fades) if fades is not None else []
    if len(fades) > len(clips) - 1:
        raise ValueError(f"{len(fades)} fades for {len(clips) - 1} joins")
    fades += [None] * (len(clips) - 1 - len(fades))
    rate = _rate(fps)
    with atomic_path(out_path) as tmp:
        if not any(fades):
            _concat_copy(clips, tmp, rate)
        else:
            _concat_fade(clips, tmp, rate, fades, crf, preset)
    return Path(out_path)


def _concat_copy(clips: list[Path], tmp: Path, rate: Fraction) -> None:
    with tempfile.NamedTemporaryFile("w", prefix=".concat-", suffix=".txt", dir=tmp.parent, delete=False) as f:
        for clip in clips:
            # The concat demuxer's list syntax: single-quoted, with ' written as '\''.
            quoted = str(clip.resolve()).replace("'", "'\\''")
            f.write(f"file '{quoted}'\n")
    try:
        # The demuxer offsets each clip by the previous one's duration rounded to microseconds, which 1/24 s is
        # not: later clips start a few ticks early and the film reads as 24.01 fps. Snap every timestamp back onto
        # the frame grid (the error is far below half a frame).
        r = _rate_arg(rate)
        snap = ":".join(f"{k.lower()}=round({k}*TB*{r})/({r}*TB)" for k in ("PTS", "DTS", "DURATION"))
        stream = ffmpeg.input(f.name, format="concat", safe=0).output(
            str(tmp), format="mp4", c="copy", movflags="+faststart", **{"bsf:v": f"setts={snap}"}
        )
        _run(stream.overwrite_output(), f"concatenate {len(clips)} clips")
    finally:
        os.unlink(f.name)


def _concat_fade(
    clips: list[Path], tmp: Path, rate: Fraction, fades: list[float | None], crf: int, preset: str
) -> None:
    counts = [probe(c).frames for c in clips]
    streams = []
    for i, clip in enumerate(clips):
        v = ffmpeg.input(str(clip)).video
        # Frame-based fade parameters: exact counts, no dependence on timestamps.
        if i > 0 and fades[i - 1]:
            n = min(counts[i], max(1, round(fades[i - 1] * rate / 2)))
            v = v.filter("fade", type="in", start_frame=0, nb_frames=n)
        if i < len(clips) - 1 and fades[i]:
            n = min(counts[i], max(1, round(fades[i] * rate / 2)))
            v = v.filter("fade", type="out", start_frame=counts[i] - n, nb_frames=n)
        streams.append(v)
    joined = ffmpeg.concat(*streams, v=1, a=0) if len(streams) > 1 else streams[0]
    # Renumber timestamps from the frame index so the output is exactly constant-rate: no frame dropped or doubled.
    joined = joined.filter("setpts", f"N/({_rate_arg(rate)})/TB")
    stream = joined.output(
        str(tmp), format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=crf, preset=preset, r=_rate_arg(rate),
        movflags="+faststart",
    )
    _run(stream.overwrite_output(), f"join {len(clips)} clips with fades")


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    frames: int
    fps: float
    width: int
    height: int
    pix_fmt: str


def _split_top(s: str) -> list[str]:
    # Split on commas outside parentheses: "yuv420p(tv, bt709, progressive)" is one field.
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def probe(path: str | os.PathLike) -> VideoInfo:
    """Codec, exact frame count, fps, size and pixel format of the first video stream."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    # Stream copy to the null muxer reads every packet without decoding; one video packet is one frame, so the
    # final frame= of -progress is an exact count (container metadata such as nb_frames can be absent or stale).
    stream = ffmpeg.input(str(path))["v:0"].output("-", format="null", c="copy")
    proc = subprocess.run(
        _args(stream, ["-hide_banner", "-nostats", "-progress", "pipe:1"]), stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg cannot read {path}: {err.strip()}")
    # The first "Video:" line belongs to Input #0 (the null output's stream is listed after it).
    m = re.search(r"Stream #0:\d+.*?: Video: (.*)", err)
    if not m:
        raise ValueError(f"no video stream in {path}")
    fields = _split_top(m.group(1))
    codec = fields[0].split()[0]
    pix_fmt = fields[1].split("(")[0].strip()
    size = next(re.search(r"\b(\d+)x(\d+)\b", f) for f in fields[2:] if re.search(r"\b\d+x\d+\b", f))
    fps_field = next((f for f in fields if f.endswith(" fps")), None) or next(f for f in fields if f.endswith(" tbr"))
    fps = float(fps_field.split()[0].rstrip("k")) * (1000 if fps_field.split()[0].endswith("k") else 1)
    counts = re.findall(r"^frame=(\d+)", proc.stdout.decode(errors="replace"), flags=re.M)
    return VideoInfo(
        codec=codec, frames=int(counts[-1]) if counts else 0, fps=fps, width=int(size.group(1)),
        height=int(size.group(2)), pix_fmt=pix_fmt,
    )


def read_frames(path: str | os.PathLike, indices: Sequence[int] | None = None) -> np.ndarray:
    """Decode frames ``indices`` (all if None; order and repeats kept) -> uint8 [len(indices), H, W, 3].

    Frames stream through a pipe one at a time and only the wanted ones are kept, so sampling a few frames of a
    long film needs memory for those frames only.
    """
    info = probe(path)
    wanted = range(info.frames) if indices is None else [int(i) for i in indices]
    bad = [i for i in wanted if not 0 <= i < info.frames]
    if bad:
        raise IndexError(f"frames {bad} out of range for {path} ({info.frames} frames)")
    keep = set(wanted)
    size = info.width * info.height * 3
    # passthrough: one output frame per decoded frame, never duplicated or dropped to fit a rate.
    stream = ffmpeg.input(str(path))["v:0"].output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough")
    got: dict[int, np.ndarray] = {}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(_args(stream), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        try:
            n = 0
            while len(got) < len(keep):
                buf = proc.stdout.read(size)
                if len(buf) < size:
                    break
                if n in keep:
                    got[n] = np.frombuffer(buf, np.uint8).reshape(info.height, info.width, 3)
                n += 1
        finally:
            # Stop decoding once the last wanted frame is in: the rest of the film is not needed.
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if len(got) < len(keep):
            err.seek(0)
            raise RuntimeError(f"ffmpeg decoded too few frames of {path}: {err.read().decode(errors='replace')}")
    if not wanted:
        return np.empty((0, info.height, info.width, 3), np.uint8)
    return np.stack([got[i] for i in wanted])
