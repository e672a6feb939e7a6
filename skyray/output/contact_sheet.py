"""Contact sheet: one row of evenly spaced thumbnails per shot, labelled with the shot id, saved as a PNG.

A film review at a glance: continuity between shots, colour drift along long shots, a shot that came out blank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from skyray.output.atomic import atomic_path
from skyray.output.encode import probe, read_frames

PAD = 4
BACKGROUND = (24, 24, 24)
LABEL_COLOUR = (235, 235, 235)

Frames = np.ndarray | str | os.PathLike


def even_indices(n: int, k: int) -> list[int]:
    """``k`` frame indices spread evenly over ``n`` frames, first and last included (all of them if n <= k)."""
    if n <= k:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, k).round()]


def _sample(frames: Frames, k: int) -> np.ndarray:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [n, H, W, 3], got {frames.dtype} {frames.shape}")
        return frames[even_indices(len(frames), k)]
    # An mp4: decode only the sampled frames.
    return read_frames(frames, even_indices(probe(frames).frames, k))


def contact_sheet(
    rows: Sequence[tuple[str, Frames]], out_path: str | os.PathLike, per_row: int = 6, thumb_width: int = 160
) -> tuple[int, int]:
    """Write a PNG with one row per ``(shot_id, frames)``; frames are uint8 [n, H, W, 3] or an mp4 path.

    Each row shows ``per_row`` frames sampled evenly (fewer if the shot is shorter), scaled to ``thumb_width``
    wide keeping the aspect ratio, after the shot id. Returns the image size (width, height).
    """
    if not rows:
        raise ValueError("no shots for the contact sheet")
    if per_row < 1 or thumb_width < 1:
        raise ValueError(f"per_row and thumb_width must be >= 1, got {per_row}, {thumb_width}")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), str(shot_id), font=font) for shot_id, _ in rows]
    label_w = max(b[2] for b in boxes) + 2 * PAD
    text_h = max(b[3] for b in boxes)

    thumbs: list[list[Image.Image]] = []
    heights: list[int] = []
    for _, frames in rows:
        sampled = _sample(frames, per_row)
        h, w = sampled.shape[1:3]
        th = max(1, round(h * thumb_width / w))
        thumbs.append([Image.fromarray(f).resize((thumb_width, th), Image.Resampling.BILINEAR) for f in sampled])
        heights.append(max(th, text_h))

    width = label_w + per_row * thumb_width + (per_row + 1) * PAD
    height = sum(heights) + (len(rows) + 1) * PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for (shot_id, _), row, row_h, box in zip(rows, thumbs, heights, boxes):
        draw.text((PAD, y + (row_h - box[3]) // 2), str(shot_id), fill=LABEL_COLOUR, font=font)
        x = label_w + PAD
        for thumb in row:
            sheet.paste(thumb, (x, y))
            x += thumb_width + PAD
        y += row_h + PAD
    with atomic_path(out_path) as tmp:
        sheet.save(tmp, format="PNG")
    return sheet.size
