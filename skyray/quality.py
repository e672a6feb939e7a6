"""Quality of long films without downloaded weights: seams at joins, drift over windows, and prompt adherence.

All functions take uint8 frames [F, H, W, 3] (what the decoder and the writers produce).

- Seam score: the mean absolute frame difference across each window or shot join, divided by the median
  difference between consecutive frames inside windows. About 1 is a seamless join; a cut is far above.
- Drift: per window, the mean colour of the object and of the background and the object's area, against the
  first window. A film that keeps its look has a drift near 0 however long it runs.
- Prompt adherence on the synthetic scenes of ``skyray.training.scenes``: an analytic detector (no learned
  model) finds the background (the median colour), the object (pixels far from it), their nearest named colours
  and the object's motion (its centroid on the torus the scenes live on), and compares them with the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from skyray.training.scenes import BACKGROUNDS, COLOURS, DIRECTIONS, parse_caption

# A pixel belongs to the object when its colour is this far (RGB, 0..255) from the background's.
OBJECT_DISTANCE = 60.0
# Centroid motion below this many pixels per frame is "still" (no direction).
MIN_SPEED = 0.5


def _check(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got {frames.shape}")
    return frames


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between consecutive frames, in 0..1 units: [F - 1]."""
    f = _check(frames).astype(np.float32) / 255.0
    return np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))


@dataclass(frozen=True)
class SeamReport:
    joins: list[int]  # first frame after each join
    across: list[float]  # difference between frames join-1 and join
    within: float  # median difference between consecutive frames away from every join
    ratios: list[float]  # across / within

    @property
    def worst(self) -> float:
        return max(self.ratios) if self.ratios else 0.0

    @property
    def mean(self) -> float:
        return float(np.mean(self.ratios)) if self.ratios else 0.0


def seam_score(frames: np.ndarray, joins: Sequence[int]) -> SeamReport:
    """Frame difference across each join (``joins``: the first frame after it) against the median inside windows."""
    diffs = frame_differences(frames)
    joins = [int(j) for j in joins]
    for j in joins:
        if not 0 < j < len(frames):
            raise ValueError(f"join at frame {j} is outside 1..{len(frames) - 1}")
    across = [float(diffs[j - 1]) for j in joins]
    inside = np.delete(diffs, [j - 1 for j in joins])
    within = float(np.median(inside)) if inside.size else float("nan")
    ratios = [a / max(within, 1e-6) for a in across]
    return SeamReport(joins, across, within, ratios)


def window_joins(window_frames: Sequence[int]) -> list[int]:
    """Join positions of a film made of consecutive windows of ``window_frames`` new frames each."""
    return [int(j) for j in np.cumsum(window_frames)[:-1]]


# --------------------------------------------------------------------------------------------------- detector


@dataclass(frozen=True)
class FrameStats:
    background: np.ndarray  # mean RGB of the background pixels
    object: np.ndarray | None  # mean RGB of the object pixels (None: no object found)
    area: float  # object pixels / all pixels
    centre: tuple[float, float] | None  # (x, y) centroid on the torus, pixels


def _torus_mean(coords: np.ndarray, weights: np.ndarray, period: int) -> float:
    # The circular mean: a centroid that stays right when the object wraps across an edge.
    angle = 2 * np.pi * coords / period
    z = (weights * np.exp(1j * angle)).sum()
    return float((np.angle(z) % (2 * np.pi)) * period / (2 * np.pi))


def frame_stats(frame: np.ndarray) -> FrameStats:
    f = frame.astype(np.float32)
    bg_guess = np.median(f.reshape(-1, 3), axis=0)
    mask = np.linalg.norm(f - bg_guess, axis=-1) > OBJECT_DISTANCE
    background = f[~mask].mean(axis=0) if (~mask).any() else bg_guess
    area = float(mask.mean())
    if mask.sum() < 4:
        return FrameStats(background, None, area, None)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    ones = np.ones(len(xs), dtype=np.float64)
    centre = (_torus_mean(xs + 0.5, ones, w), _torus_mean(ys + 0.5, ones, h))
    return FrameStats(background, f[mask].mean(axis=0), area, centre)


def nearest(rgb: np.ndarray | None, palette: dict[str, tuple[int, int, int]]) -> str | None:
    if rgb is None:
        return None
    names = list(palette)
    d = [np.linalg.norm(rgb - np.array(palette[n], dtype=np.float32)) for n in names]
    return names[int(np.argmin(d))]


@dataclass(frozen=True)
class Detection:
    colour: str | None
    background: str | None
    direction: str | None
    velocity: tuple[float, float]  # mean centroid motion, pixels per frame (x right, y down)
    area: float  # mean object area fraction


def detect(frames: np.ndarray) -> Detection:
    """What a clip shows: the object's and background's nearest named colours and the direction it moves."""
    stats = [frame_stats(f) for f in _check(frames)]
    h, w = frames.shape[1:3]
    objs = [s.object for s in stats if s.object is not None]
    colour = nearest(np.mean(objs, axis=0), COLOURS) if objs else None
    background = nearest(np.mean([s.background for s in stats], axis=0), BACKGROUNDS)
    steps = []
    for a, b in zip(stats, stats[1:]):
        if a.centre is None or b.centre is None:
            continue
        dx = (b.centre[0] - a.centre[0] + w / 2) % w - w / 2
        dy = (b.centre[1] - a.centre[1] + h / 2) % h - h / 2
        steps.append((dx, dy))
    vx, vy = (float(v) for v in np.mean(steps, axis=0)) if steps else (0.0, 0.0)
    direction = None
    if max(abs(vx), abs(vy)) >= MIN_SPEED:
        unit = (int(np.sign(vx)), 0) if abs(vx) >= abs(vy) else (0, int(np.sign(vy)))
        direction = next(name for name, d in DIRECTIONS.items() if d == unit)
    return Detection(colour, background, direction, (vx, vy), float(np.mean([s.area for s in stats])))


@dataclass(frozen=True)
class Adherence:
    wanted: dict[str, str]
    detected: Detection
    matches: dict[str, bool]

    @property
    def score(self) -> float:
        """Fraction of the prompt's colour, background and direction that the clip shows."""
        return float(np.mean(list(self.matches.values()))) if self.matches else 0.0


def adherence(frames: np.ndarray, prompt: str) -> Adherence:
    """Does the clip show the colour, background and direction its prompt names?"""
    wanted = {k: v for k, v in parse_caption(prompt).items() if k in ("colour", "background", "direction")}
    det = detect(frames)
    got = {"colour": det.colour, "background": det.background, "direction": det.direction}
    return Adherence(wanted, det, {k: got[k] == v for k, v in wanted.items()})


# ------------------------------------------------------------------------------------------------------ drift


@dataclass(frozen=True)
class DriftReport:
    object_rgb: list[list[float]]  # per window
    background_rgb: list[list[float]]
    area: list[float]
    object_drift: float  # largest RGB distance of a window's object colour from the first window's (0..441)
    background_drift: float
    area_drift: float  # largest relative change of the object's area

    def as_dict(self) -> dict[str, float]:
        return {"object_drift": self.object_drift, "background_drift": self.background_drift,
                "area_drift": self.area_drift}


def drift(frames: np.ndarray, window_frames: Sequence[int]) -> DriftReport:
    """Colour and size statistics of object and background per window (``window_frames``: frames of each)."""
    _check(frames)
    bounds = [0, *np.cumsum(window_frames)]
    if bounds[-1] != len(frames):
        raise ValueError(f"windows cover {bounds[-1]} frames, the clip has {len(frames)}")
    obj, bg, area = [], [], []
    for lo, hi in zip(bounds, bounds[1:]):
        stats = [frame_stats(f) for f in frames[lo:hi]]
        objs = [s.object for s in stats if s.object is not None]
        obj.append(np.mean(objs, axis=0) if objs else np.full(3, np.nan))
        bg.append(np.mean([s.background for s in stats], axis=0))
        area.append(float(np.mean([s.area for s in stats])))

    def dist(values: list[np.ndarray]) -> float:
        d = [np.linalg.norm(v - values[0]) for v in values[1:]]
        d = [x for x in d if np.isfinite(x)]
        return float(max(d)) if d else 0.0

    a0 = max(area[0], 1e-6)
    return DriftReport(
        [o.tolist() for o in obj], [b.tolist() for b in bg], area,
        dist(obj), dist(bg), float(max(abs(a - area[0]) / a0 for a in area)),
    )
