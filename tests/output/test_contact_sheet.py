"""Contact sheet: a real PNG, one row per shot, sized by the layout rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skyray.output.contact_sheet import PAD, contact_sheet, even_indices
from skyray.output.encode import ShotEncoder


def frames(n: int, h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_even_indices() -> None:
    assert even_indices(25, 6) == [0, 5, 10, 14, 19, 24]
    assert even_indices(4, 6) == [0, 1, 2, 3]


def test_sheet_is_a_png_with_one_row_per_shot(tmp_path: Path) -> None:
    out = tmp_path / "sheet.png"
    size = contact_sheet([("s01", frames(25)), ("s02-long-id", frames(9, seed=1)), ("s3", frames(3))], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == size
        thumb_h = round(64 * 160 / 96)  # 107: taller than a label line, so it sets the row height
        assert size[1] == 3 * thumb_h + 4 * PAD
        assert size[0] > 6 * 160 + 7 * PAD  # thumbnails plus a label column
        # The short shot's row has 3 thumbnails, the rest of it is background.
        right = img.getpixel((size[0] - PAD - 80, size[1] - PAD - thumb_h // 2))
        assert right == (24, 24, 24)
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]


def test_rows_from_mp4(tmp_path: Path) -> None:
    clip = tmp_path / "shot.mp4"
    with ShotEncoder(clip, 96, 64, 24) as enc:
        enc.write(frames(17))
    size = contact_sheet([("s01", clip)], tmp_path / "sheet.png", per_row=4, thumb_width=48)
    assert size[1] == round(64 * 48 / 96) + 2 * PAD


def test_rejects_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        contact_sheet([], tmp_path / "sheet.png")
