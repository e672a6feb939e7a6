"""Train the ``tiny-trained`` model and write it as a diffusers folder with its model card.

    skyray model train-tiny --out skyray/assets/tiny_trained --evaluate     # the committed model
    skyray model train-tiny --out /tmp/tt --vae-steps 20 --steps 20 --clips 32   # a smoke run

(``tools/train_tiny.py`` takes the same arguments.)

Writes model_index.json and the five component folders, ``training.json`` (config, losses, timings),
``loss.png``, and ``SHA256SUMS``; ``--evaluate`` then renders with the result through the real sampler and
writes ``metrics.json`` (the quality figures a rerun must match, see the model card).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from skyray.training.config import TrainConfig

STAGES = ("vae", "transformer")


def loss_plot(curves: dict[str, list[float]], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """Log-scale loss curves (smoothed over 25 steps) as a PNG, drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    colours = [(200, 50, 50), (40, 90, 200)]
    panel = w // max(1, len(curves))
    for k, (name, values) in enumerate(curves.items()):
        v = np.log10(np.maximum(np.convolve(values, np.ones(25) / 25, mode="valid"), 1e-6))
        x0, x1, y0, y1 = k * panel + 50, (k + 1) * panel - 10, 30, h - 30
        d.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
        lo, hi = float(v.min()), float(v.max())
        pts = [
            (x0 + (x1 - x0) * i / max(1, len(v) - 1), y1 - (y1 - y0) * (val - lo) / max(1e-9, hi - lo))
            for i, val in enumerate(v)
        ]
        d.line(pts, fill=colours[k % 2], width=2)
        d.text((x0, 8), f"{name}: {len(values)} steps, log10 loss {hi:.2f} .. {lo:.2f}", fill=(0, 0, 0))
        d.text((x0 - 45, y0), f"{10 ** hi:.3f}", fill=(0, 0, 0))
        d.text((x0 - 45, y1 - 10), f"{10 ** lo:.3f}", fill=(0, 0, 0))
    img.save(path)


def sha256sums(folder: Path) -> str:
    lines = []
    for p in sorted(folder.rglob("*.safetensors")):
        lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (a diffusers model folder)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--stages", default=",".join(STAGES), help="vae,transformer (default: both, one after the other)")
    p.add_argument("--evaluate", action="store_true", help="after training, measure quality (metrics.json)")
    p.add_argument("--evaluate-only", action="store_true", help="only measure an existing --out folder")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=getattr(defaults, f.name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.evaluate_only:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                             if hasattr(args, f.name)})
        train_model(cfg, out, args.threads, tuple(args.stages.split(",")))
    if args.evaluate or args.evaluate_only:
        from skyray.training.evaluate import evaluate

        metrics = evaluate(str(out))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics, indent=2))
    return 0


MODEL_INDEX = {
    "_class_name": "SkyReelsV2DiffusionForcingPipeline",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "transformer": ["diffusers", "SkyReelsV2Transformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def train_model(cfg: TrainConfig, out: Path, threads: int, stages: tuple[str, ...] = STAGES) -> None:
    """Train ``stages`` into ``out``. The VAE and the transformer only share the latent code (fixed, see
    ``train.pooled_target``), so the two stages may also run as two processes writing the same folder."""
    import diffusers
    import torch
    from diffusers import UniPCMultistepScheduler
    from PIL import Image

    from skyray import models
    from skyray.training import train

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    log = train.TrainLog()
    clips = train.encode_clips(cfg, log, progress)
    summary = {"config": train.config_dict(cfg), "torch": torch.__version__,
               "latents_mean": log.latents_mean, "latents_std": log.latents_std}
    if "vae" in stages:
        vae = train.train_vae(cfg, log, progress)
        vae = train.with_latent_stats(vae, log.latents_mean, log.latents_std)
        vae.save_pretrained(out / "vae")
        Image.fromarray(train.reconstruction_sheet(vae, cfg)).save(out / "vae_reconstruction.png")
        summary.update({
            "vae_seconds": log.seconds["vae"], "vae_threads": threads,
            "vae_loss_last100": log.tail_mean("vae_loss"), "vae_code_loss_last25": log.tail_mean("vae_code_loss", 25),
            "vae_loss": [round(v, 5) for v in log.vae_loss],
            "vae_code_loss": [round(v, 5) for v in log.vae_code_loss],
        })
    if "transformer" in stages:
        tokenizer, text_encoder, transformer = train.train_transformer(clips, cfg, log, progress)
        tokenizer.save_pretrained(out / "tokenizer")
        text_encoder.save_pretrained(out / "text_encoder")
        transformer.save_pretrained(out / "transformer")
        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0).save_pretrained(
            out / "scheduler"
        )
        summary.update({
            "transformer_seconds": log.seconds["transformer"], "transformer_threads": threads,
            "loss_last100": log.tail_mean("loss"), "loss": [round(v, 5) for v in log.loss],
        })
    summary_path = out / "training.json"  # read only now: the other stage may have written it meanwhile
    summary = {**(json.loads(summary_path.read_text()) if summary_path.is_file() else {}), **summary}
    summary_path.write_text(json.dumps(summary) + "\n")
    if all((out / part).is_dir() for part in models.REQUIRED_PARTS):
        (out / "model_index.json").write_text(
            json.dumps({**MODEL_INDEX, "_diffusers_version": diffusers.__version__}, indent=2) + "\n"
        )
        if "vae_loss" in summary and "loss" in summary:
            loss_plot({"VAE reconstruction (L1 + MSE)": summary["vae_loss"],
                       "transformer (flow matching MSE)": summary["loss"]}, out / "loss.png")
        (out / "SHA256SUMS").write_text(sha256sums(out))
    progress(f"wrote {', '.join(stages)} to {out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
