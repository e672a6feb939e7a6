"""Model loading: the built-in tiny model, export to a diffusers folder, and clear errors."""

from __future__ import annotations

import pytest
import torch

from skyray import models
from skyray.cli import main
from skyray.engine import sampler as S
from skyray.engine.schedule import shot_windows
from skyray.engine.text import PromptCache


def test_tiny_is_deterministic_and_in_eval_mode(tiny):
    again = models.build_tiny()
    for a, b in zip(tiny.transformer.parameters(), again.transformer.parameters()):
        assert torch.equal(a, b)
    assert not any(m.training for m in (again.transformer, again.text_encoder, again.vae))
    assert tiny.tokenizer("a fox").input_ids != tiny.tokenizer("a cat").input_ids


def _render(comps):
    cfg = S.SamplerConfig(steps=3)
    text = PromptCache(comps.tokenizer, comps.text_encoder).embeds("a fox", "", True)
    return S.sample_shot(
        S.NoisePredictor(comps.transformer, cfg), comps.scheduler_for(8.0), [text], shot_windows(3, 3, 0), (4, 4),
        torch.Generator().manual_seed(0),
    )


def test_export_round_trip(tmp_path, tiny):
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    assert main(["model", "export", "tiny", str(tmp_path / "tiny")]) == 0
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(tmp_path / "tiny")
    assert type(pipe.transformer).__name__ == "SkyReelsV2Transformer3DModel"
    loaded = models.load(str(tmp_path / "tiny"), "cpu")
    assert loaded.family.name == "tiny"
    assert torch.equal(_render(loaded), _render(tiny))


def test_missing_and_incomplete_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load(str(tmp_path / "nope"), "cpu")
    (tmp_path / "half" / "vae").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="incomplete: missing model_index.json, tokenizer, text_encoder"):
        models.load(str(tmp_path / "half"), "cpu")


def test_dtype_policy():
    assert models.dtypes_for(torch.device("cpu"))["transformer"] == torch.float32
    gpu = models.dtypes_for(torch.device("cuda"))
    assert gpu["transformer"] == gpu["text_encoder"] == torch.bfloat16 and gpu["vae"] == torch.float32


def test_family_without_loading_weights():
    assert models.family_of("tiny").heads == 4
    assert models.family_of("Skywork/SkyReels-V2-DF-14B-720P-Diffusers").heads == 40
    assert models.family_of("Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers").layers == 30


def test_offload_loads_text_encoder_and_transformer_off_the_device():
    # "meta" stands in for a GPU: what moved to the device shows up there, what stays offloaded stays on the CPU.
    comps = models.load("tiny", "meta", offload=True)
    assert comps.device.type == "meta"
    assert {p.device.type for p in comps.vae.parameters()} == {"meta"}
    assert {p.device.type for p in comps.transformer.parameters()} == {"cpu"}
    assert {p.device.type for p in comps.text_encoder.parameters()} == {"cpu"}
    full = models.load("tiny", "meta")
    assert {p.device.type for p in full.transformer.parameters()} == {"meta"}
