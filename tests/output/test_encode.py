"""Real ffmpeg: encode synthetic shots, probe them, join them with and without fades."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from skyray.output.encode import ShotEncoder, VideoInfo, concat, ffmpeg_exe, probe, read_frames

FPS = 24
SIZE = 64


def synthetic(n: int, seed: int) -> np.ndarray:
    """Smooth moving gradients (H.264 keeps them close to lossless at crf 18), different per seed."""
    t = np.arange(n)[:, None, None]
    y = np.arange(SIZE)[None, :, None]
    x = np.arange(SIZE)[None, None, :]
    r = 40 + 2 * x + 3 * t + seed * 10
    g = 60 + 2 * y + 0 * t
    b = 50 + x + y + 2 * t
    return np.clip(np.stack(np.broadcast_arrays(r, g, b), -1), 0, 255).astype(np.uint8)


def encode(path: Path, frames: np.ndarray, chunk: int = 5) -> Path:
    with ShotEncoder(path, SIZE, SIZE, FPS) as enc:
        for i in range(0, len(frames), chunk):
            enc.write(frames[i : i + chunk])
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    d = tmp_path_factory.mktemp("clips")
    a, b = synthetic(17, 0), synthetic(8, 5)
    return encode(d / "a.mp4", a), encode(d / "b.mp4", b), a, b


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_ffmpeg_exe_runs() -> None:
    assert Path(ffmpeg_exe()).exists()


def test_encode_and_probe(clips) -> None:
    a_path, b_path, a, b = clips
    assert probe(a_path) == VideoInfo(codec="h264", frames=17, fps=24.0, width=64, height=64, pix_fmt="yuv420p")
    assert probe(b_path).frames == 8
    assert leftovers(a_path.parent) == []
    decoded = read_frames(a_path)
    assert decoded.shape == a.shape
    assert np.abs(decoded.astype(int) - a.astype(int)).mean() < 3


def test_read_frames_keeps_order_and_repeats(clips) -> None:
    a_path, _, _, _ = clips
    every = read_frames(a_path)
    picked = read_frames(a_path, [16, 0, 3, 3])
    assert np.array_equal(picked, every[[16, 0, 3, 3]])
    with pytest.raises(IndexError):
        read_frames(a_path, [17])


def test_concat_copy_is_exact(clips, tmp_path: Path) -> None:
    a_path, b_path, _, _ = clips
    film = concat([a_path, b_path], tmp_path / "film.mp4", FPS)
    info = probe(film)
    assert (info.codec, info.frames, info.fps, info.pix_fmt) == ("h264", 25, 24.0, "yuv420p")
    # Stream copy: the film decodes to exactly the clips' frames.
    assert np.array_equal(read_frames(film), np.concatenate([read_frames(a_path), read_frames(b_path)]))
    assert leftovers(tmp_path) == []


def test_concat_with_fade_keeps_frame_count(clips, tmp_path: Path) -> None:
    a_path, b_path, a, b = clips
    film = concat([a_path, b_path, a_path], tmp_path / "film.mp4", FPS, fades=[0.5, None])
    info = probe(film)
    assert (info.codec, info.frames, info.fps, info.pix_fmt) == ("h264", 42, 24.0, "yuv420p")
    frames = read_frames(film).astype(float)
    # Fade through black at the first join (6 frames each side at 24 fps), a hard cut at the second.
    assert frames[16].mean() < 0.3 * a[16].mean()
    assert frames[17].mean() < 0.3 * b[0].mean()
    assert abs(frames[5].mean() - a[5].mean()) < 3
    assert abs(frames[25].mean() - a[0].mean()) < 3
    assert leftovers(tmp_path) == []


def test_encoder_removes_temp_file_on_exception(tmp_path: Path) -> None:
    out = tmp_path / "shot.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with ShotEncoder(out, SIZE, SIZE, FPS) as enc:
            enc.write(synthetic(4, 0))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_encoder_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ShotEncoder(tmp_path / "odd.mp4", 63, 64, FPS)
    with pytest.raises(ValueError):
        with ShotEncoder(tmp_path / "wrong.mp4", SIZE, SIZE, FPS) as enc:
            enc.write(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        with ShotEncoder(tmp_path / "empty.mp4", SIZE, SIZE, FPS):
            pass
    assert list(tmp_path.iterdir()) == []


def test_encoder_reports_ffmpeg_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="ffmpeg"):
        with ShotEncoder(tmp_path / "shot.mp4", SIZE, SIZE, FPS, preset="no-such-preset") as enc:
            for _ in range(50):
                enc.write(synthetic(8, 0))
    assert list(tmp_path.iterdir()) == []
