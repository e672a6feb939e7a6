"""Frames per second of streaming decode + encode against the transformer's window time at the same size.

One 97-frame window (25 latents) at each size: ``StreamingDecoder`` (the tiny Wan VAE) pushes the window's
latents as the chain writer does, ``ShotEncoder`` streams the frames to ffmpeg/libx264 (veryfast, crf 18), and the
bench transformer of ``engine_vs_reference`` (4 layers, 8 heads x 12) denoises the same window (sync, CFG as one
batch-2 forward).  Prints frames per second of each stage and, last, the ratio of output time (decode + encode)
to window compute: below 1 the output side keeps up with the sampler when the two overlap (the Ray executor's
chain writer runs beside the group).

The tiny models are far cheaper than the real ones, and not in proportion (the real VAE has base_dim 96 and the
real transformer 30-40 layers of 1536-5120 dims), so the ratio here measures the harness and ffmpeg, not a
540p render; run it with real components on a GPU for that.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

FRAMES = 97


def window_seconds(comps, size: int, steps: int) -> float:
    from engine_vs_reference import NEG, PROMPT

    from skyray.engine import sampler as S
    from skyray.engine.schedule import latent_frames, shot_windows
    from skyray.engine.text import PromptCache

    text = PromptCache(comps.tokenizer, comps.text_encoder).embeds(PROMPT, NEG, True)
    window = shot_windows(latent_frames(FRAMES), latent_frames(FRAMES), 0)[0]
    predict = S.NoisePredictor(comps.transformer, S.SamplerConfig(steps=steps), family=comps.family.name)
    t = time.perf_counter()
    S.denoise_window(predict, comps.scheduler_for(8.0), text, window, (size // 8, size // 8), torch.Generator().manual_seed(1))
    return time.perf_counter() - t


def output_seconds(vae, size: int, out_dir: str) -> tuple[float, float, int]:
    """Seconds of decode and of encode (write + close) for one window's latents, and the frames written."""
    from skyray.engine.decode import StreamingDecoder
    from skyray.engine.schedule import latent_frames
    from skyray.output.encode import ShotEncoder

    latents = torch.randn(1, 16, latent_frames(FRAMES), size // 8, size // 8, generator=torch.Generator().manual_seed(2))
    dec = StreamingDecoder(vae)
    t = time.perf_counter()
    frames = dec.push(latents)
    t_dec = time.perf_counter() - t
    t = time.perf_counter()
    with ShotEncoder(Path(out_dir) / f"w{size}.mp4", size, size, 24) as enc:
        enc.write(frames)
    t_enc = time.perf_counter() - t
    return t_dec, t_enc, len(frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from engine_vs_reference import bench_components

    comps = bench_components()
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for size in args.sizes:
            output_seconds(comps.vae, size, out_dir)  # warm-up (ffmpeg start, allocator)
            window_seconds(comps, size, 2)
            dec, enc, win = [], [], []
            for _ in range(args.runs):
                d, e, n = output_seconds(comps.vae, size, out_dir)
                dec.append(d)
                enc.append(e)
                win.append(window_seconds(comps, size, args.steps))
            rows.append((size, n, statistics.median(dec), statistics.median(enc), statistics.median(win)))

    print(f"one {FRAMES}-frame window, {args.steps} steps, CFG batched, {args.threads} threads, torch {torch.__version__}")
    print(f"{'size':>7} {'frames':>6} {'decode fps':>10} {'encode fps':>10} {'dec+enc fps':>11} {'window s':>9} "
          f"{'sampler fps':>11} {'output/window':>13}")
    for size, n, d, e, w in rows:
        print(f"{size:>3}x{size:<3} {n:>6} {n / d:>10.1f} {n / e:>10.1f} {n / (d + e):>11.1f} {w:>9.3f} "
              f"{n / w:>11.1f} {(d + e) / w:>13.3f}")
    size, n, d, e, w = rows[-1]
    print(f"decode + encode time / window compute at {size}x{size}: {(d + e) / w:.3f}x (< 1: output keeps up)")


if __name__ == "__main__":
    main()
