"""Images and videos -> clean latents in model space (the prefix or suffix a window treats as finished).

I2V, end-frame control and video extension are one mechanism: VAE-encoded frames (the latent distribution's
mode, as the reference does) normalised with the VAE's per-channel mean and std.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skyray.engine.schedule import SPATIAL_STRIDE, TEMPORAL_STRIDE


def _processor():
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(vae_scale_factor=SPATIAL_STRIDE)


def latent_stats(vae, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_pixels(vae, video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> model-space latents [B, 16, (T-1)//4+1, H/8, W/8] (fp32)."""
    p = next(vae.parameters())
    raw = vae.encode(video.to(p.device, p.dtype)).latent_dist.mode().float()
    mean, std = latent_stats(vae, raw.device)
    return (raw - mean) / std


def load_image(source: str | Path | bytes) -> Image.Image:
    """An image from a path or from the file's bytes (what a remote worker receives)."""
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).convert("RGB")


def encode_image(vae, image: Image.Image | str | Path | bytes, height: int, width: int) -> torch.Tensor:
    """One image -> one latent frame [1, 16, 1, H/8, W/8] (resized to the film's size first)."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    pixels = _processor().preprocess(image, height=height, width=width).float()  # [1, 3, H, W]
    return encode_pixels(vae, pixels.unsqueeze(2))


def read_video(source: str | Path | bytes, last: int | None = None) -> list[Image.Image]:
    """Frames of a video file or its bytes (only the last ``last`` kept, so long clips are not held whole)."""
    if isinstance(source, bytes):
        # ffmpeg reads a file: this process's own temporary copy, gone when read.
        with tempfile.NamedTemporaryFile(suffix=".video") as f:
            f.write(source)
            f.flush()
            return read_video(f.name, last)
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(source))
    meta = next(reader)
    w, h = meta["size"]
    frames: list[Image.Image] = []
    for buf in reader:
        frames.append(Image.fromarray(np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3)))
        if last is not None and len(frames) > last:
            frames.pop(0)
    return frames


def encode_video_tail(
    vae, frames: list[Image.Image] | str | Path | bytes, overlap_history: int, prefix: int, height: int, width: int
) -> torch.Tensor:
    """The last ``prefix`` latents of the clip's tail, encoded as a fresh sequence.

    The last ``overlap_history`` frames (fewer for a short clip, snapped down to 4k+1) are encoded; when the
    prefix had to be rounded down to whole causal blocks we keep the latents nearest the end of the clip (the
    reference drops those instead, leaving a gap between the clip and its extension).
    """
    if not isinstance(frames, list):
        frames = read_video(frames, last=overlap_history)
    n = min(overlap_history, len(frames))
    n = (n - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1
    if n < 1:
        raise ValueError("the video to extend has no frames")
    clip = _processor().preprocess_video(frames[-n:], height=height, width=width).float()  # [1, 3, T, H, W]
    latents = encode_pixels(vae, clip)
    if latents.shape[2] < prefix:
        raise ValueError(f"the video gives {latents.shape[2]} latents, fewer than the {prefix} the shot needs")
    return latents[:, :, latents.shape[2] - prefix :]
