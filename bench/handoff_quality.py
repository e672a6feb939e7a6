"""Latent hand-off (skyray) against decode/re-encode hand-off (the original SkyReels-V2 scripts), same model,
same seeds: seams at the joins, drift over the windows and prompt adherence of long chains.

    .venv/bin/python bench/handoff_quality.py                      # 2, 16 and 64 windows; addnoise 0, 20, 50
    .venv/bin/python bench/handoff_quality.py --windows 2 16 --addnoise 20

The model is ``tiny-trained`` (trained on the synthetic scenes ``skyray.quality`` can measure without
downloaded weights). Pixel hand-off is bench code only: every window is decoded on its own and its last
``overlap_history`` frames are VAE-encoded again as the next window's prefix, as the reference scripts do.
Ratios are pixel / latent: above 1 means the pixel hand-off is worse.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skyray import models, quality  # noqa: E402
from skyray.training.evaluate import DEMO_SAMPLER, render_chain, window_adherence  # noqa: E402

PROMPTS = [
    "a red square moving right on a black background",
    "a yellow circle moving down on a purple background",
]


def measure(comps, prompt: str, windows: int, addnoise: int, handoff: str, seed: int) -> dict[str, float]:
    sampler = dataclasses.replace(DEMO_SAMPLER, addnoise_condition=addnoise)
    chain = render_chain(comps, [prompt] * windows, sampler, seed=seed, handoff=handoff)
    seam = quality.seam_score(chain.frames, chain.joins)
    dr = quality.drift(chain.frames, chain.window_frames)
    return {
        "seam_mean": seam.mean,
        "seam_worst": seam.worst,
        "object_drift": dr.object_drift,
        "background_drift": dr.background_drift,
        "adherence": float(np.mean(window_adherence(chain))),
        "last_adherence": window_adherence(chain)[-1],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=models.TINY_TRAINED)
    p.add_argument("--windows", type=int, nargs="+", default=[2, 16, 64])
    p.add_argument("--addnoise", type=int, nargs="+", default=[0, 20, 50])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the bench prompts to use")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    comps = models.load(args.model, "cpu")
    keys = ["seam_mean", "seam_worst", "object_drift", "background_drift", "adherence", "last_adherence"]
    prompts = PROMPTS[: args.prompts]
    print(f"model {args.model}; sampler {DEMO_SAMPLER}; prompts {prompts}; seeds {args.seeds}")
    print(f"{'windows':>7} {'addnoise':>8} {'handoff':>7} " + " ".join(f"{k:>16}" for k in keys))
    for windows in args.windows:
        for addnoise in args.addnoise:
            t0 = time.time()
            res = {}
            for handoff in ("latent", "pixel"):
                runs = [measure(comps, pr, windows, addnoise, handoff, s) for pr in prompts for s in args.seeds]
                res[handoff] = {k: float(np.mean([r[k] for r in runs])) for k in keys}
                print(f"{windows:>7} {addnoise:>8} {handoff:>7} " + " ".join(f"{res[handoff][k]:>16.3f}" for k in keys))
            ratio = {k: res["pixel"][k] / max(res["latent"][k], 1e-6) for k in keys}
            print(f"{windows:>7} {addnoise:>8} {'ratio':>7} " + " ".join(f"{ratio[k]:>16.2f}" for k in keys)
                  + f"   ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
