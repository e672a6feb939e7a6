"""The tiny-trained model's training settings and architecture (no torch import: the CLI's parser reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    width: int = 64
    height: int = 64
    fps: int = 8
    # VAE
    vae_steps: int = 450
    vae_batch: int = 1  # clips of vae_frames frames per step
    vae_images: int = 8  # and single frames
    vae_encoder_every: int = 4
    vae_frames: int = 9  # three latents: the encoder's causal cache reaches its steady state from the third
    vae_lr: float = 1e-3
    vae_latent_noise: float = 0.1  # the decoder sees noisy latents: it must tolerate the transformer's
    vae_object_weight: float = 4.0  # extra weight of object pixels (a 16 px object is 6% of the frame)
    # latents for the transformer
    clips: int = 2000
    clip_latents: int = 8  # 29 frames
    turn_fraction: float = 0.5
    # transformer + text encoder
    steps: int = 8000
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 100
    ema: float = 0.99
    sigma_shift: float = 3.0  # training noise levels u ~ U(0, 1) shifted like the sampler's flow shift
    caption_dropout: float = 0.1
    patch: int = 2  # the transformer's spatial patch (``architecture``)
    flow_object_weight: float = 0.0  # extra flow-loss weight of latent cells at and next to the object
    prefix_sigma_max: float = 0.05  # addnoise_condition up to 50
    mode_weights: tuple[float, float, float] = (0.55, 0.15, 0.3)  # continuation, fresh, diffusion forcing
    window_lengths: tuple[int, ...] = (5, 4, 3)
    window_weights: tuple[float, ...] = (0.7, 0.15, 0.15)


def architecture(patch: int = 2) -> dict[str, dict[str, Any]]:
    """The tiny-trained architecture: the tiny model a little wider and deeper (weights of a few MB).

    ``patch``: the transformer's spatial patch, in latent cells. The object moves a quarter cell per frame; with
    2x2 patches each token must encode where inside it the object is, with 1x1 the positions are the tokens'
    own (4x the tokens, about 3x the training time).
    """
    return {
        "transformer": dict(
            patch_size=(1, patch, patch), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=256, num_layers=4, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, inject_sample_info=True,
        ),
        "vae": dict(
            base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
        ),
        "text_encoder": dict(
            vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0,
        ),
    }
