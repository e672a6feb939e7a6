"""A small JPEG of one latent: the per-window preview a job's progress stream carries."""

from __future__ import annotations

import base64
import io


def preview_jpeg(vae, latent, size: int) -> str:
    """One latent decoded on its own (no causal context) as a base64 JPEG at most ``size`` pixels a side."""
    from PIL import Image

    from skyray.engine.decode import StreamingDecoder

    frame = StreamingDecoder(vae).push(latent)[-1]
    im = Image.fromarray(frame)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()
