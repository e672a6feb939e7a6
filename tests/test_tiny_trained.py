"""The committed ``tiny-trained`` model: its files, its loading by name, and a quality regression.

The thresholds are the committed model's own figures (model card, ``metrics.json``) with a margin: a change
to the sampler, the hand-off or the loader that makes renders worse fails here in seconds.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from skyray import models, quality
from skyray.training.evaluate import render_chain, window_adherence

RIGHT = "a red square moving right on a black background"
DOWN = "a red square moving down on a black background"
CUT = "a yellow circle moving left on a purple background"


@pytest.fixture(scope="module")
def trained():
    return models.load(models.TINY_TRAINED, "cpu")


def test_weights_are_package_data_with_their_hashes():
    folder = models.TINY_TRAINED_DIR
    assert models.resolve_model_path(models.TINY_TRAINED) == folder
    sums = (folder / "SHA256SUMS").read_text().split("\n")
    entries = [line.split("  ") for line in sums if line]
    assert {name for _, name in entries} == {
        "text_encoder/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    total = 0
    for digest, name in entries:
        data = (folder / name).read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == digest, name
    assert total < 8 * 2**20  # a few MB: the whole suite may load it


def test_family_is_read_without_loading_weights():
    fam = models.family_of(models.TINY_TRAINED)
    assert (fam.heads, fam.head_dim, fam.layers) == (4, 16, 4)


def test_loads_by_name_in_eval_mode(trained):
    assert not trained.transformer.training and not trained.vae.training and not trained.text_encoder.training
    assert trained.tokenizer("a red square").input_ids[-1] == trained.tokenizer.eos_token_id
    assert models.load_vae(models.TINY_TRAINED).config.latents_std == trained.vae.config.latents_std


def test_a_continuation_keeps_its_scene_without_a_seam(trained):
    # Measured on the committed model (seeds 0-2): join ratio 0.89-1.0, first window's object red, both black.
    chain = render_chain(trained, [RIGHT, RIGHT], seed=0)
    seam = quality.seam_score(chain.frames, chain.joins)
    assert seam.worst < 1.5, seam
    windows = [quality.detect(chain.frames[:17]), quality.detect(chain.frames[17:])]
    assert [w.background for w in windows] == ["black", "black"], windows
    assert windows[0].colour == "red", windows
    assert window_adherence(chain)[0] >= 2 / 3


def test_a_cut_is_a_visible_seam_and_a_new_scene(trained):
    # Measured: the cut's ratio 3.4-5.3, the continuation's join in the same film 0.89-0.93.
    travel = render_chain(trained, [RIGHT, DOWN], seed=1)
    cut = render_chain(trained, [CUT], seed=11)
    film = np.concatenate([travel.frames, cut.frames])
    seams = quality.seam_score(film, [*travel.joins, len(travel.frames)]).ratios
    assert seams[-1] > 2.5 * seams[0], seams
    assert quality.detect(cut.frames).background == "purple"


def test_renders_are_seeded(trained):
    a = render_chain(trained, [RIGHT], seed=3).frames
    b = render_chain(trained, [RIGHT], seed=3).frames
    assert np.array_equal(a, b)
    assert torch.get_num_threads() >= 1


@pytest.mark.slow
def test_the_training_command_writes_a_loadable_model(tmp_path):
    import json

    from skyray.cli import main

    out = tmp_path / "model"
    threads = torch.get_num_threads()
    try:
        assert main(["model", "train-tiny", "--out", str(out), "--threads", "1", "--vae-steps", "2", "--steps", "2",
                     "--clips", "4", "--batch", "2", "--vae-images", "1", "--clip-latents", "6"]) == 0
    finally:
        torch.set_num_threads(threads)
    log = json.loads((out / "training.json").read_text())
    assert len(log["loss"]) == 2 and len(log["vae_loss"]) == 2 and len(log["latents_std"]) == 16
    assert (out / "loss.png").is_file() and (out / "vae_reconstruction.png").is_file()
    c = models.load(str(out), "cpu")
    assert c.vae.config.latents_std == log["latents_std"]
    frames = render_chain(c, [RIGHT], seed=0).frames
    assert frames.shape == (17, 64, 64, 3)


def test_the_latent_code_and_the_object_weights_follow_the_scene():
    from skyray.training import scenes, train

    scene = scenes.Scene("red", "square", "black", "right", x=8.0, y=8.0)  # the square covers pixels 0..15
    frames, _ = scenes.render_clip(scene, 5)
    x = train.to_tensor(frames).unsqueeze(0)
    code = train.pooled_target(x)
    assert code.shape == (1, 16, 2, 8, 8)
    assert torch.count_nonzero(code[:, 12:]) == 0  # four unused channels
    # Frame 0, red channel: the 8x8 cells the square covers are red, the rest the background.
    red = (code[0, 0, 0] / 2 + 1) * 127.5
    assert red[:2, :2].min() > 200 and red[2:, :].max() < 20
    w = train.object_weight(x, 4.0)
    assert w.shape == (1, 1, 5, 64, 64)
    assert set(torch.unique(w).tolist()) == {1.0, 5.0}
    assert w[0, 0, 0, :16, :16].eq(5.0).float().mean() > 0.9 and w[0, 0, 0, 32:, 32:].eq(1.0).all()
    # The flow loss's cell weights: the object's cells and their neighbours, in model space.
    cells = train.latent_object_weight(code, 4.0)
    assert cells.shape == (1, 1, 2, 8, 8)
    assert cells[0, 0, 0, :3, :3].eq(5.0).all() and cells[0, 0, 0, 4:, 4:].eq(1.0).all()
    assert train.latent_object_weight(code, 0.0).eq(1.0).all()
