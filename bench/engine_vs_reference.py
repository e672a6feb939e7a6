"""skyray's sampler against diffusers' ``SkyReelsV2DiffusionForcingPipeline`` on the same shot, in one process.

A tiny-but-not-trivial transformer is built here (4 layers, 8 heads of 12 dims, ffn 256, random weights with a fixed
seed; the tiny model's UMT5 and tokenizer): a 97-frame shot at 64x64 (25 latents, 400 tokens per forward), CFG on,
sync (``ar_step 0``) and async (``ar_step 5``, causal blocks of 5 with the block-causal mask, as the reference
switches it on).  Both sides encode the prompts and return latents (``output_type="latent"``; no VAE decode), and
runs alternate (reference, ours, reference, ...) so drift in machine speed hits both alike.

Prints one row per mode (median seconds of each side, their ratio, max |latent difference|), then skyray's own
exact options on the sync shot (sequential CFG; ``--compile`` adds torch.compile), the headline ratio last.  Goal
on CPU: ours <= 0.9x the reference.  ``--profile`` prints torch profiler tables of one run of each side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

H = W = 64
FRAMES = 97
SEED = 11
PROMPT, NEG = "a lighthouse on a cliff at dusk, waves below", "blurry, low quality"
MODES = {
    "sync": dict(ar_step=0, causal_block_size=1),
    "async": dict(ar_step=5, causal_block_size=5),
}


def bench_components(layers: int = 4, heads: int = 8, head_dim: int = 12, ffn: int = 256):
    """The tiny model's tokenizer, text encoder, VAE and scheduler with a larger transformer (fixed seed)."""
    from diffusers import SkyReelsV2Transformer3DModel

    from skyray import models

    comps = models.build_tiny()
    cfg = dict(models.tiny_configs()["transformer"])
    cfg.update(num_attention_heads=heads, attention_head_dim=head_dim, ffn_dim=ffn, num_layers=layers,
               rope_max_seq_len=1024)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        comps.transformer = SkyReelsV2Transformer3DModel(**cfg).eval().requires_grad_(False)
    comps.family = models.family_from_config(cfg)
    return comps


def reference_pipe(comps):
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, transformer=comps.transformer, vae=comps.vae,
        scheduler=comps.scheduler_for(8.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, steps: int, ar_step: int, causal_block_size: int) -> torch.Tensor:
    # The reference switches the block-causal mask on when given causal_block_size and never off again.
    pipe.transformer.register_to_config(num_frame_per_block=1)
    return pipe(
        prompt=PROMPT, negative_prompt=NEG, height=H, width=W, num_frames=FRAMES, num_inference_steps=steps,
        guidance_scale=6.0, base_num_frames=FRAMES, ar_step=ar_step,
        causal_block_size=causal_block_size if causal_block_size > 1 else None, addnoise_condition=0, fps=24,
        output_type="latent", generator=torch.Generator("cpu").manual_seed(SEED),
    ).frames


def run_ours(comps, steps: int, ar_step: int, causal_block_size: int, **sampler):
    """Latents of the shot and the predictor that made them (its ``forwards`` and ``skipped`` counts)."""
    from skyray.engine import sampler as S
    from skyray.engine.schedule import latent_frames, shot_windows
    from skyray.engine.text import PromptCache

    cfg = S.SamplerConfig(steps=steps, guidance_scale=6.0, shift=8.0, ar_step=ar_step,
                          causal_block_size=causal_block_size, fps=24, causal_attention=causal_block_size > 1,
                          **sampler)
    text = PromptCache(comps.tokenizer, comps.text_encoder).embeds(PROMPT, NEG, True)
    windows = shot_windows(latent_frames(FRAMES), latent_frames(FRAMES), 0)
    predict = S.NoisePredictor(comps.transformer, cfg, family=comps.family.name)
    gen = torch.Generator("cpu").manual_seed(SEED)
    out = S.sample_shot(predict, comps.scheduler_for(8.0), [text], windows, (H // 8, W // 8), gen)
    return out, predict


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def profile(comps, pipe, steps: int, mode: dict) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, fn in (("reference", lambda: run_reference(pipe, steps, **mode)), ("skyray", lambda: run_ours(comps, steps, **mode))):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"--- {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=4, help="timed runs of each side per mode (after one warm-up each)")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--profile", action="store_true", help="torch profiler tables of one run of each side")
    ap.add_argument("--compile", action="store_true", help="also time compile: true (inductor; ~10-30 s to compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comps = bench_components()
    pipe = reference_pipe(comps)
    print(f"transformer: {comps.transformer.config.num_layers} layers, {comps.transformer.config.num_attention_heads} "
          f"heads x {comps.transformer.config.attention_head_dim}; {FRAMES} frames at {W}x{H}, {args.steps} steps, "
          f"CFG 6, {args.threads} threads, torch {torch.__version__}")
    if args.profile:
        for m in args.modes:
            profile(comps, pipe, args.steps, MODES[m])
        return

    rows = []
    for m in args.modes:
        mode = MODES[m]
        ref, (ours, predict) = run_reference(pipe, args.steps, **mode), run_ours(comps, args.steps, **mode)  # warm-up
        diff, forwards = (ref - ours).abs().max().item(), predict.forwards
        t_ref, t_ours = [], []
        for _ in range(args.runs):
            t_ref.append(timed(lambda mode=mode: run_reference(pipe, args.steps, **mode))[0])
            t_ours.append(timed(lambda mode=mode: run_ours(comps, args.steps, **mode))[0])
        rows.append((m, forwards, statistics.median(t_ref), statistics.median(t_ours), diff))

    # The acceleration options that hold results within 1e-5, on the sync shot: skyray alone, alternating.
    variants = {"default (cfg_batch: true)": {}, "cfg_batch: false": {"batched_cfg": False}}
    if args.compile:
        variants["compile: true"] = {"compile": True}
    base = run_ours(comps, args.steps, **MODES["sync"])[0]
    for kw in variants.values():
        run_ours(comps, 2 if kw.get("compile") else args.steps, **MODES["sync"], **kw)  # warm-up (compiles)
    times = {name: [] for name in variants}
    diffs = {}
    for _ in range(args.runs):
        for name, kw in variants.items():
            t, (out, _) = timed(lambda kw=kw: run_ours(comps, args.steps, **MODES["sync"], **kw))
            times[name].append(t)
            diffs[name] = (out - base).abs().max().item()

    print(f"{'mode':<6} {'forwards':>8} {'reference s':>12} {'skyray s':>9} {'ratio':>6} {'max |diff|':>11}")
    for m, fw, r, o, d in rows:
        print(f"{m:<6} {fw:>8} {r:>12.3f} {o:>9.3f} {o / r:>6.3f} {d:>11.2e}")
    print(f"\n{'sync, skyray option':<26} {'seconds':>8} {'vs default':>10} {'max |diff|':>11}")
    first = statistics.median(next(iter(times.values())))
    for name, ts in times.items():
        print(f"{name:<26} {statistics.median(ts):>8.3f} {statistics.median(ts) / first:>9.3f}x {diffs[name]:>11.2e}")
    total_ref, total_ours = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"skyray / reference (median time, all modes): {total_ours / total_ref:.3f}x (goal <= 0.9x)")


if __name__ == "__main__":
    main()
