"""Procedural clips for the tiny trained model: one shape of a named colour moving in a named direction over a
named background, with a caption generated from those names.

The world is a torus: an object leaving one edge comes back at the opposite one, so a film of any length keeps
its object on screen and its direction constant (what the drift and seam metrics need). A clip may change
direction at a latent-frame boundary; every latent frame carries the direction it shows, so a training window
can be captioned with the motion of its new frames (prompt travel from a clean prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 100, 245),
    "yellow": (245, 215, 40),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "grey": (105, 105, 105),
    "purple": (75, 30, 95),
    "brown": (95, 60, 25),
}
SHAPES = ("square", "circle")
# Image axes: x grows to the right, y grows downward.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIZE = 16  # object side (square) or diameter (circle), pixels
SPEED = 2.0  # pixels per frame
TEMPORAL_STRIDE = 4  # frames per latent frame after the first (the Wan VAE)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    direction: str
    x: float  # object centre at frame 0, pixels
    y: float

    def caption(self, direction: str | None = None) -> str:
        return caption(self.colour, self.shape, direction or self.direction, self.background)


def caption(colour: str, shape: str, direction: str, background: str) -> str:
    return f"a {colour} {shape} moving {direction} on a {background} background"


def parse_caption(text: str) -> dict[str, str]:
    """The scene words a prompt names: {'colour', 'shape', 'direction', 'background'} (those it names)."""
    words = text.lower().replace(",", " ").split()
    found: dict[str, str] = {}
    for i, w in enumerate(words):
        if w in COLOURS and "colour" not in found and (i + 1 >= len(words) or words[i + 1] != "background"):
            found["colour"] = w
        elif w in BACKGROUNDS or (w in COLOURS and i + 1 < len(words) and words[i + 1] == "background"):
            found["background"] = w
        elif w in SHAPES:
            found["shape"] = w
        elif w in DIRECTIONS:
            found["direction"] = w
    return found


def vocabulary() -> list[str]:
    """Every word a caption can contain (the trained tokenizer's vocabulary)."""
    words = ["a", "moving", "on", "background"]
    return words + list(COLOURS) + [b for b in BACKGROUNDS if b not in COLOURS] + list(SHAPES) + list(DIRECTIONS)


def random_scene(rng: np.random.Generator, width: int = 64, height: int = 64) -> Scene:
    return Scene(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        background=str(rng.choice(list(BACKGROUNDS))),
        direction=str(rng.choice(list(DIRECTIONS))),
        x=float(rng.uniform(0, width)),
        y=float(rng.uniform(0, height)),
    )


def latent_of_frame(frame: int) -> int:
    """The latent frame a video frame is encoded into (frame 0 alone, then groups of four)."""
    return 0 if frame == 0 else (frame - 1) // TEMPORAL_STRIDE + 1


def first_frame_of_latent(latent: int) -> int:
    return 0 if latent == 0 else TEMPORAL_STRIDE * (latent - 1) + 1


def render_clip(
    scene: Scene, frames: int, width: int = 64, height: int = 64, turns: dict[int, str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """uint8 frames [frames, height, width, 3] and the direction shown by each frame.

    ``turns`` maps a frame index to the direction the object takes from that frame on (prompt travel).
    """
    turns = turns or {}
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32) + 0.5
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    directions = []
    x, y, direction = scene.x, scene.y, scene.direction
    for f in range(frames):
        direction = turns.get(f, direction)
        if f > 0:
            dx, dy = DIRECTIONS[direction]
            x, y = (x + SPEED * dx) % width, (y + SPEED * dy) % height
        directions.append(direction)
        # Signed distance to the centre on the torus, so the object wraps around the edges.
        ddx = (xs - x + width / 2) % width - width / 2
        ddy = (ys - y + height / 2) % height - height / 2
        if scene.shape == "square":
            dist = np.maximum(np.abs(ddx)[None, :], np.abs(ddy)[:, None])
        else:
            dist = np.sqrt(ddx[None, :] ** 2 + ddy[:, None] ** 2)
        cover = np.clip(SIZE / 2 - dist + 0.5, 0.0, 1.0)[..., None]  # one pixel of anti-aliased edge
        out[f] = np.round(bg + (fg - bg) * cover).astype(np.uint8)
    return out, directions


def turned(scene: Scene, direction: str) -> Scene:
    return replace(scene, direction=direction)
