"""Where a tiny-trained model loses motion: measured on latents, without the VAE.

    .venv/bin/python tools/motion_probe.py skyray/assets/tiny_trained [--clips 16] [--steps 10]

The tiny-trained latent code is the 8x8-pooled colours of each latent's four frames (``train.pooled_target``),
so the object's centroid, and its motion, can be read off any latent exactly. For ground-truth clips (a clean
two-latent prefix, then three new latents), this prints the mean motion along the prompt's direction, in
latent cells per frame (the truth is 0.25: 2 px per frame on an 8 px cell):

- ``x0_at_sigma_S``: the model's one-step clean estimate x0 = x_t - sigma v when the new latents are the truth
  noised to ``S`` (what its loss trains);
- ``sampled_x0_step_K``: the same estimate at step K of a plain Euler flow-matching ODE from pure noise (what
  sampling sees), and ``sampled``: the final latents.

A model that extrapolates the prefix shows ~0.25 in every row; one that learned it only from ground-truth
inputs keeps it at sigma 1 and loses it over the first sampling steps.

``--history-guidance W`` samples with guidance on the prefix (history guidance, as in Song et al. 2025, "History-
Guided Video Diffusion"): v = v_without + W (v_with - v_without), where v_without sees the prefix as pure noise
at sigma 1 (a diffusion-forcing model is trained on every per-frame noise level, so this is in its
distribution). It is a probe here, not a sampler option of the product.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skyray import models  # noqa: E402
from skyray.engine.forward import df_forward  # noqa: E402
from skyray.training import train  # noqa: E402
from skyray.training.scenes import DIRECTIONS, random_scene, render_clip  # noqa: E402

CELLS = 8  # latent grid of a 64x64 film


def sub_frames(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> list[np.ndarray]:
    """Model-space latents [16, L, 8, 8] (L >= 1, none of them the first latent) -> 4L pooled RGB frames."""
    raw = (z * std.view(-1, 1, 1, 1) + mean.view(-1, 1, 1, 1))[:12] / 2.0
    return [f for k in range(raw.shape[1]) for f in raw[:, k].reshape(4, 3, CELLS, CELLS).permute(0, 2, 3, 1).numpy()]


def centroid(frame: np.ndarray) -> np.ndarray | None:
    """Torus mean (x, y) of the cells far from the frame's median colour, in cells; None if there is no object."""
    far = np.clip(np.abs(frame - np.median(frame.reshape(-1, 3), axis=0)).max(-1) - 0.15, 0, None)
    if far.sum() < 0.3:
        return None
    ys, xs = np.mgrid[0:CELLS, 0:CELLS] + 0.5
    angle = lambda c: c / CELLS * 2 * np.pi  # noqa: E731
    return np.array([
        (np.arctan2((np.sin(angle(c)) * far).sum(), (np.cos(angle(c)) * far).sum()) / (2 * np.pi) * CELLS) % CELLS
        for c in (xs, ys)
    ])


def motion_along(frames: list[np.ndarray], direction: str) -> float:
    """Mean centroid step between consecutive frames, projected on ``direction`` (cells per frame)."""
    cs = [centroid(f) for f in frames]
    steps = [(b - a + CELLS / 2) % CELLS - CELLS / 2 for a, b in zip(cs, cs[1:]) if a is not None and b is not None]
    return float(np.mean(steps, axis=0) @ np.array(DIRECTIONS[direction], float)) if steps else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a tiny-trained model folder")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="Euler steps of the sampled rows")
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--history-guidance", type=float, default=1.0, help="guidance on the prefix (1: none)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    comps = models.load_folder(Path(args.model), torch.device("cpu"))
    mean, std = torch.tensor(comps.vae.config.latents_mean), torch.tensor(comps.vae.config.latents_std)
    rng, gen = np.random.default_rng(5), torch.Generator().manual_seed(0)
    u = torch.linspace(1, 0, args.steps + 1)
    sigmas = args.shift * u / (1 + (args.shift - 1) * u)
    rows: dict[str, list[float]] = {}
    for _ in range(args.clips):
        scene = random_scene(rng)
        frames, _ = render_clip(scene, 29)
        raw = train.pooled_target(train.to_tensor(frames).unsqueeze(0))[0]
        z = ((raw - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1))[:, 2:7].unsqueeze(0)  # prefix 2, new 3
        text = train.encode_text(comps.tokenizer, comps.text_encoder, [scene.caption()])
        with torch.no_grad():
            for s in (0.8, 0.95, 1.0):
                noise = torch.randn(z.shape, generator=gen)
                sig = torch.tensor([[0.0, 0.0, s, s, s]])
                xt = (1 - sig.view(1, 1, 5, 1, 1)) * z + sig.view(1, 1, 5, 1, 1) * noise
                x0 = xt - sig.view(1, 1, 5, 1, 1) * df_forward(comps.transformer, xt, sig * 1000, text, 8)
                rows.setdefault(f"x0_at_sigma_{s}", []).append(motion_along(sub_frames(x0[0, :, 2:], mean, std), scene.direction))
            x = z.clone()
            x[:, :, 2:] = torch.randn(x[:, :, 2:].shape, generator=gen)
            for k in range(args.steps):
                s, s_next = float(sigmas[k]), float(sigmas[k + 1])
                v = df_forward(comps.transformer, x, torch.tensor([[0, 0, s, s, s]]) * 1000, text, 8)
                if args.history_guidance != 1.0:
                    blind = x.clone()
                    blind[:, :, :2] = torch.randn(blind[:, :, :2].shape, generator=gen)
                    v_blind = df_forward(comps.transformer, blind, torch.tensor([[1, 1, s, s, s]]) * 1000, text, 8)
                    v = v_blind + args.history_guidance * (v - v_blind)
                x0 = x - s * v
                key = f"sampled_x0_step_{k}_sigma_{s:.2f}"
                rows.setdefault(key, []).append(motion_along(sub_frames(x0[0, :, 2:], mean, std), scene.direction))
                x[:, :, 2:] = x[:, :, 2:] + (s_next - s) * v[:, :, 2:]
            rows.setdefault("sampled", []).append(motion_along(sub_frames(x[0, :, 2:], mean, std), scene.direction))
        rows.setdefault("truth", []).append(motion_along(sub_frames(z[0, :, 2:], mean, std), scene.direction))
    print(json.dumps({k: round(float(np.mean(v)), 3) for k, v in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
