"""The memory model against the real modules: exact weight counts, and activation peaks measured on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from skyray import memory
from skyray.models import FAMILIES


def peak_allocated(fn) -> int:
    """Peak bytes torch's CPU allocator holds while ``fn`` runs, above what it held before (allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def _transformer(spec: memory.ModelSpec, layers: int | None = None, device: str = "meta"):
    from diffusers import SkyReelsV2Transformer3DModel

    with torch.device(device):
        return SkyReelsV2Transformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=spec.heads, attention_head_dim=spec.head_dim, in_channels=16,
            out_channels=16, text_dim=spec.text_dim, freq_dim=spec.freq_dim, ffn_dim=spec.ffn_dim,
            num_layers=layers or spec.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024, inject_sample_info=True,
        ).eval().requires_grad_(False)


def _split(model) -> tuple[int, int]:
    keep = tuple(model._keep_in_fp32_modules)
    fp32 = sum(p.numel() for n, p in model.named_parameters() if any(k in n.split(".") for k in keep))
    return sum(p.numel() for p in model.parameters()) - fp32, fp32


@pytest.mark.parametrize("name", ["1.3B", "14B"])
def test_transformer_weights_are_counted_exactly(name: str) -> None:
    spec = memory.ModelSpec.of(FAMILIES[name])
    assert spec.transformer_params() == _split(_transformer(spec))


def test_text_encoder_and_vae_weights_are_counted_exactly(tiny) -> None:
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    x = memory.UMT5_XXL
    with torch.device("meta"):
        t5 = UMT5EncoderModel(UMT5Config(
            vocab_size=x.vocab, d_model=x.d_model, d_kv=x.d_kv, d_ff=x.d_ff, num_layers=x.layers, num_heads=x.heads,
            relative_attention_num_buckets=x.buckets, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        ))
        vae = AutoencoderKLWan()
    assert sum(p.numel() for p in t5.parameters()) == x.params == 5_680_910_336
    assert sum(p.numel() for p in vae.parameters()) == memory.WAN_VAE_PARAMS
    spec = memory.ModelSpec.of(FAMILIES["tiny"])
    assert spec.transformer_params() == _split(tiny.transformer)
    assert spec.text_encoder.params == sum(p.numel() for p in tiny.text_encoder.parameters())
    assert spec.vae_params == sum(p.numel() for p in tiny.vae.parameters())


def _cast_like_cuda(model) -> None:
    # What models.load does for CUDA: bf16 except diffusers' _keep_in_fp32_modules.
    keep = tuple(model._keep_in_fp32_modules)
    for name, module in model.named_modules():
        if name and not any(k in name.split(".") for k in keep) and not list(module.children()):
            module.to(torch.bfloat16)


@pytest.mark.parametrize(
    "heads, ffn_dim",
    [(12, 8960), (10, 3456)],  # 1.3B widths (FFN-bound); 14B's ffn/dim ratio at a quarter width (attention-bound)
    ids=["1.3B", "14B-ratio"],
)
def test_activation_peak_matches_a_measured_forward(heads: int, ffn_dim: int) -> None:
    from skyray.engine.forward import df_forward, text_context, window_geometry

    spec = memory.ModelSpec("m", heads=heads, head_dim=128, layers=2, ffn_dim=ffn_dim)
    torch.manual_seed(0)
    model = _transformer(spec, layers=2, device="cpu")
    _cast_like_cuda(model)
    batch, frames, side = 2, 3, 32  # 3 latents of 16x16 tokens: 768 tokens, batched CFG
    x = torch.randn(batch, 16, frames, side, side).bfloat16()
    t = torch.full((batch, frames), 500, dtype=torch.long)
    with torch.no_grad():
        ctx = text_context(model, torch.randn(batch, 512, spec.text_dim).bfloat16())
        geometry = window_geometry(model, tuple(x.shape), x.device)
        measured = peak_allocated(lambda: df_forward(model, x, t, ctx, 24, geometry=geometry))
    predicted = memory.estimate(spec, side * 8, side * 8, frames, guided=True, cfg_batch=True).activations
    assert predicted == pytest.approx(measured, rel=0.1), (predicted, measured)


def test_sequential_cfg_halves_activations_and_ulysses_splits_them() -> None:
    spec = memory.ModelSpec.of(FAMILIES["14B"])
    batched = memory.estimate(spec, 720, 1280, 31, cfg_batch=True)
    alone = memory.estimate(spec, 720, 1280, 31, cfg_batch=False)
    split = memory.estimate(spec, 720, 1280, 31, memory.Layout(ulysses=8), cfg_batch=True)
    parallel = memory.estimate(spec, 720, 1280, 31, memory.Layout(ulysses=4, cfg=True), cfg_batch=True)
    assert batched.tokens == 111_600 and (batched.batch, alone.batch, parallel.batch) == (2, 1, 1)
    assert batched.activations == 2 * alone.activations
    assert split.activations < batched.activations / 8 * 1.3  # Ulysses adds the all-to-all buffers
    assert parallel.text_cache * 2 == alone.text_cache  # a CFG-parallel rank holds its branch's text only
    assert memory.estimate(spec, 720, 1280, 31, causal_block_size=5).attention > 0


def test_a_custom_folder_is_sized_from_its_own_configs(tmp_path, tiny) -> None:
    import json

    from skyray import models

    folder = tmp_path / "custom"
    models.export(tiny, folder)
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] = 3  # no longer the tiny family: a "custom" one, sized from the folder
    cfg_path.write_text(json.dumps(cfg))
    family = models.family_of(str(folder))
    assert family.name == "custom"
    spec = memory.ModelSpec.of_model(str(folder), family)
    from diffusers import SkyReelsV2Transformer3DModel

    with torch.device("meta"):
        model = SkyReelsV2Transformer3DModel.from_config(SkyReelsV2Transformer3DModel.load_config(folder / "transformer"))
    assert spec.transformer_params() == _split(model)
    assert spec.text_encoder.params == sum(p.numel() for p in tiny.text_encoder.parameters())
    assert spec.vae_base_dim == 3 and spec.vae_params < 10 * memory.TINY_VAE_PARAMS


def _ulysses_rank(rank: int, world: int, address: str, out: str) -> None:
    from skyray.engine.forward import df_forward, text_context, window_geometry
    from skyray.engine.parallel import UlyssesShard
    from skyray.executors.distributed import destroy_group, init_group

    torch.set_num_threads(1)
    init_group(rank, world, address, backend="gloo", timeout_s=120)
    try:
        spec = memory.ModelSpec("m", heads=10, head_dim=128, layers=2, ffn_dim=3456)  # attention-bound widths
        torch.manual_seed(0)
        model = _transformer(spec, layers=2, device="cpu")
        _cast_like_cuda(model)
        shard = UlyssesShard(None, world, rank)
        x = torch.randn(2, 16, 3, 32, 32).bfloat16()
        t = torch.full((2, 3), 500, dtype=torch.long)
        with torch.no_grad():
            ctx = text_context(model, torch.randn(2, 512, spec.text_dim).bfloat16())
            geometry = window_geometry(model, tuple(x.shape), x.device, None, shard)
            measured = peak_allocated(lambda: df_forward(model, x, t, ctx, 24, None, shard, geometry=geometry))
        predicted = memory.estimate(spec, 256, 256, 3, memory.Layout(ulysses=world)).activations
        torch.save((measured, predicted), f"{out}/rank{rank}.pt")
    finally:
        destroy_group()


@pytest.mark.timeout(180)
def test_ulysses_activation_peak_matches_a_measured_rank(tmp_path) -> None:
    import torch.multiprocessing as mp

    from skyray.executors.distributed import init_method

    mp.start_processes(_ulysses_rank, args=(2, init_method("127.0.0.1"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # A gloo rank may hold staging buffers of its own on top (memory.ACT_ULYSSES_EXTRA): the forward's own peak
    # is the least busy rank's.
    least = min(m for m, _ in results)
    # The least busy rank's peak itself varies between runs (30.3 to 33.7 MB measured here for a 29.9 MB
    # prediction): gloo's buffers are not all freed at the same point. 20% holds that spread, not a worse model.
    assert results[0][1] == pytest.approx(least, rel=0.2), results
