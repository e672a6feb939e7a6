"""The real architecture widths on CPU: random-weight transformers at the DF-1.3B widths (12 heads x 128, ffn 8960,
UMT5 width 4096) and at the 14B head count (40 heads, a smaller head dimension), one layer, tiny frames.

- our forward and a two-window shot equal diffusers' ``SkyReelsV2Transformer3DModel`` and pipeline;
- Ulysses 2, 3, 4 and 6 over 12 heads, and 4, 5 and 8 over 40 heads, equal one rank (gloo processes; the
  weights reach the ranks as one memory-mapped file, loaded onto meta-built models with ``assign=True``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from skyray.engine import sampler as S
from skyray.engine.forward import causal_block_ids, df_forward
from skyray.engine.parallel import UlyssesShard
from skyray.engine.schedule import latent_frames, prefix_latents, shot_windows
from skyray.engine.text import TextEmbeds, encode

TOL = 5e-5
TEXT_TOKENS = 64  # prompts padded to 64 tokens instead of 512 on both sides: the same code, 8x less text work
SEED = 7
PROMPT, NEG = "a red fox runs through snow", "blurry, low quality"
WIDTHS_13B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096)
# For Ulysses only the attention's heads matter (everything else is per token): 1.3B's 12 heads x 128 and 14B's
# 40 heads (with 8 dims each), with a small feed-forward and text width to keep eight processes cheap.
ULYSSES_WIDTHS = {
    12: dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=64, text_dim=32),
    40: dict(num_attention_heads=40, attention_head_dim=8, ffn_dim=64, text_dim=32),
}
# Latent sizes whose tokens per frame (patch 2x2) split over every degree tested: 3x4 = 12 and 4x10 = 40.
LATENT_HW = {12: (6, 8), 40: (8, 20)}
DEGREES = {12: (2, 3, 4, 6), 40: (4, 5, 8)}
WORLD = 8
COLLECTIVE_TIMEOUT_S = 120.0
SPAWN_DEADLINE_S = 400.0  # eight processes importing torch and diffusers on two shared cores


def transformer(layers: int, seed: int, **widths):
    from diffusers import SkyReelsV2Transformer3DModel

    cfg = dict(
        patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", inject_sample_info=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SkyReelsV2Transformer3DModel(**cfg, **widths).eval().requires_grad_(False)


def forward_inputs(heads: int, batch: int, frames: int = 4, text_len: int = 16, text_dim: int | None = None):
    g = torch.Generator().manual_seed(3)
    text_dim = text_dim or ULYSSES_WIDTHS[heads]["text_dim"]
    x = torch.randn((batch, 16, frames, *LATENT_HW[heads]), generator=g)
    t = torch.randint(0, 1000, (batch, frames), generator=g)
    text = torch.randn((batch, text_len, text_dim), generator=g)
    return x, t, text


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------- against diffusers


@pytest.fixture(scope="module")
def df13b():
    return transformer(1, SEED, **WIDTHS_13B)


@pytest.mark.parametrize("causal", [False, True])
def test_forward_at_13b_widths_equals_diffusers(df13b, causal):
    x, t, text = forward_inputs(12, batch=1, text_dim=4096)
    if causal:
        df13b.register_to_config(num_frame_per_block=2)  # the reference's block-causal mask, blocks of 2
    try:
        ref = df13b(x, t, text, enable_diffusion_forcing=True, fps=[1], return_dict=False)[0]
    finally:
        df13b.register_to_config(num_frame_per_block=1)
    got = df_forward(df13b, x, t, text, 24, causal_block_ids(0, 4, 0, 2) if causal else None)
    d = max_diff(got, ref)
    print(f"forward causal={causal}: max abs diff {d:.2e}, output std {ref.std().item():.3f}")
    assert d <= TOL and ref.std().item() > 0.1


def test_two_window_shot_at_13b_widths_equals_diffusers_pipeline(df13b, tiny):
    from diffusers import SkyReelsV2DiffusionForcingPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from skyray.models import tiny_configs, tiny_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        te_cfg = {**tiny_configs()["text_encoder"], "d_model": 4096, "num_layers": 1}
        text_encoder = UMT5EncoderModel(UMT5Config(**te_cfg)).eval().requires_grad_(False)
    tokenizer = tiny_tokenizer()
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=df13b, vae=tiny.vae,
        scheduler=tiny.scheduler_for(8.0),
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = 32, 64
    ref = pipe(
        prompt=PROMPT, negative_prompt=NEG, height=h, width=w, num_frames=25, num_inference_steps=2,
        guidance_scale=6.0, base_num_frames=17, overlap_history=9, fps=24, output_type="latent",
        max_sequence_length=TEXT_TOKENS, generator=torch.Generator("cpu").manual_seed(SEED),
    ).frames

    windows = shot_windows(latent_frames(25), latent_frames(17), prefix_latents(9, 1))
    assert [(x.prefix, x.new) for x in windows] == [(0, 5), (3, 2)]
    cfg = S.SamplerConfig(steps=2, guidance_scale=6.0, fps=24)
    text = TextEmbeds(*(encode(tokenizer, text_encoder, [p], TEXT_TOKENS) for p in (PROMPT, NEG)))
    assert text.cond.shape == (1, TEXT_TOKENS, 4096)
    gen = torch.Generator("cpu").manual_seed(SEED)
    got = S.sample_shot(S.NoisePredictor(df13b, cfg), tiny.scheduler_for(8.0), [text], windows, (h // 8, w // 8), gen)
    d = max_diff(got, ref)
    print(f"two-window shot: max abs diff {d:.2e}")
    assert d <= TOL


# ------------------------------------------------------------------------------------------- Ulysses


def _rank_main(rank: int, world: int, address: str, weights: dict[int, str], out_dir: str) -> None:
    torch.set_num_threads(1)
    from skyray.executors.distributed import destroy_group, init_group

    init_group(rank, world, address, backend="gloo", timeout_s=COLLECTIVE_TIMEOUT_S)
    try:
        out = {}
        for heads, path in weights.items():
            with torch.device("meta"):
                model = transformer(1, 0, **ULYSSES_WIDTHS[heads])
            # Memory-mapped: the ranks share the file's pages instead of holding a copy each.
            model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
            x, t, text = forward_inputs(heads, batch=2)
            for degree in DEGREES[heads]:
                group = dist.new_group(list(range(degree)))  # every rank creates every group, in order
                if rank >= degree:
                    continue
                shard = UlyssesShard(group, degree, rank)
                for name, ids in (("full", None), ("causal", causal_block_ids(1, 3, 0, 2))):
                    out[(heads, degree, name)] = df_forward(model, x, t, text, 24, ids, shard)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy_group()


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_ulysses_over_12_and_40_heads_equals_one_rank(tmp_path):
    from skyray.executors.distributed import init_method

    deadline = time.monotonic() + SPAWN_DEADLINE_S
    models = {h: transformer(1, SEED + h, **w) for h, w in ULYSSES_WIDTHS.items()}
    weights = {}
    for heads, m in models.items():
        weights[heads] = str(tmp_path / f"weights{heads}.pt")
        torch.save(m.state_dict(), weights[heads])
    ctx = mp.start_processes(
        _rank_main, args=(WORLD, init_method("127.0.0.1"), weights, str(tmp_path)), nprocs=WORLD, join=False,
        start_method="spawn",
    )
    try:
        ref = {}  # one rank's forwards, computed while the ranks start
        for heads, m in models.items():
            x, t, text = forward_inputs(heads, batch=2)
            ref[(heads, "full")] = df_forward(m, x, t, text, 24)
            ref[(heads, "causal")] = df_forward(m, x, t, text, 24, causal_block_ids(1, 3, 0, 2))
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank processes still running after {SPAWN_DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    diffs = {}
    for heads, degrees in DEGREES.items():
        for degree in degrees:
            for name in ("full", "causal"):
                key = (heads, degree, name)
                for r in range(1, degree):
                    assert torch.equal(results[r][key], results[0][key]), f"rank {r} differs from rank 0 for {key}"
                for r in range(degree, WORLD):
                    assert key not in results[r]
                diffs[key] = max_diff(results[0][key], ref[(heads, name)])
    print({f"{h} heads / ulysses {u} / {n}": f"{d:.1e}" for (h, u, n), d in diffs.items()})
    bad = {k: d for k, d in diffs.items() if not d <= TOL}
    assert not bad, f"max abs difference above {TOL}: {bad}"
    assert (ref[(12, "full")] - ref[(12, "causal")]).abs().max().item() > 1e-3  # the causal case is distinct
