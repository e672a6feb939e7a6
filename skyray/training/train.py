"""Train the ``tiny-trained`` model on procedural scenes: first the VAE, then the text encoder and transformer.

1. VAE: an autoencoder of short clips (``AutoencoderKLWan``) around a fixed latent code, the 8x8-pooled
   colours of each latent's frames (``pooled_target``): the encoder (the posterior's mode, as conditioning
   uses it) learns to produce the code, the decoder to reconstruct the clip from it. The decoder sees slightly
   noisy codes so that it tolerates what the transformer produces, and its loss weighs object pixels more
   (``object_weight``), since the object is what a viewer and the detector look at.
2. Latents: long clips (some turn part-way) are coded once and normalised with their per-channel mean and std,
   which become the VAE's ``latents_mean`` / ``latents_std`` (the renderer's model space).
3. Transformer + UMT5, jointly, with diffusion forcing and flow matching: windows cut from the encoded clips at
   random offsets, each latent frame at its own noise level ``sigma``, ``x_t = (1 - sigma) x0 + sigma noise``,
   timestep ``1000 sigma``, target velocity ``noise - x0`` (what UniPC's ``flow_prediction`` expects: it
   recovers ``x0 = x_t - sigma v``). Most windows are laid out as the sampler renders them: a clean (or lightly
   re-noised, as ``addnoise_condition`` does) prefix and new frames at one shared level, captioned with the
   motion of the new frames, so a window whose prefix moves one way and whose prompt says another learns to turn
   (prompt travel); the rest are pure diffusion forcing, every frame at an independent level.

Everything is seeded; results differ across processors only by float rounding.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from skyray.engine.forward import df_forward
from skyray.training.config import TrainConfig, architecture
from skyray.training.scenes import (
    DIRECTIONS,
    Scene,
    first_frame_of_latent,
    random_scene,
    render_clip,
)
from skyray.training.tokenizer import scene_tokenizer

__all__ = ["TrainConfig", "architecture"]

TEXT_TOKENS = 512  # what the renderer pads prompts to (engine.text.MAX_TEXT_TOKENS)


@dataclass
class TrainLog:
    """Loss curves and timings (the model card and the rerun bounds come from this)."""

    vae_loss: list[float] = field(default_factory=list)  # reconstruction from the code (L1 + MSE)
    vae_code_loss: list[float] = field(default_factory=list)  # encoder output against the code (MSE)
    loss: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    latents_mean: list[float] = field(default_factory=list)
    latents_std: list[float] = field(default_factory=list)

    def tail_mean(self, name: str, n: int = 100) -> float:
        values = getattr(self, name)
        return float(np.mean(values[-n:]))


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> [3, F, H, W] in [-1, 1] (the VAE's pixel range)."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def _vae_batch(rng: np.random.Generator, cfg: TrainConfig, clips: int, frames: int) -> torch.Tensor:
    out = []
    for _ in range(clips):
        scene = random_scene(rng, cfg.width, cfg.height)
        turns = {int(rng.integers(1, frames)): str(rng.choice(list(DIRECTIONS)))} if frames > 1 and rng.random() < 0.3 else None
        out.append(to_tensor(render_clip(scene, frames, cfg.width, cfg.height, turns)[0]))
    return torch.stack(out)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def object_weight(x: torch.Tensor, extra: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, F, H, W]: 1, plus ``extra`` where a pixel is far from its clip's background
    (the per-channel median colour). Without it the decoder's loss is mostly background, and objects come out
    in the wrong colour: the detector, and a viewer, look at the object."""
    bg = x.flatten(2).median(dim=2).values.view(x.shape[0], 3, 1, 1, 1)
    far = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.25).float()
    return 1.0 + extra * far


def _weighted(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    d = y - x
    return ((d.abs() + d.pow(2)) * w).mean() / w.mean()


def pooled_target(x: torch.Tensor) -> torch.Tensor:
    """The VAE's latent code: each latent frame holds the 8x8-pooled colours of its four frames (the first
    latent: frame 0, four times) in 12 of the 16 channels, the rest zero, scaled to about unit range.

    A fixed code instead of a learned one, because the budget is minutes of a shared CPU: trained end to end from
    random weights, the Wan VAE spends hundreds of steps predicting the mean colour (its channel-RMS-normalised
    stack passes almost no input signal at initialisation). With the code fixed, the encoder is a direct
    regression and the decoder learns from an informative input from the first step; and the latents are a
    small colour image, which the transformer learns quickly.
    """
    first = F.avg_pool3d(x[:, :, :1], (1, 8, 8)).repeat(1, 4, 1, 1, 1)
    parts = [first]
    for k in range(1, (x.shape[2] - 1) // 4 + 1):
        frames = F.avg_pool3d(x[:, :, 4 * k - 3 : 4 * k + 1], (1, 8, 8))  # [B, 3, 4, h, w]
        parts.append(frames.permute(0, 2, 1, 3, 4).reshape(x.shape[0], 12, 1, *frames.shape[-2:]))
    z = torch.cat(parts, dim=2)
    return 2.0 * torch.cat([z, torch.zeros_like(z[:, :4])], dim=1)


def init_vae(vae) -> None:
    """Variance-preserving convolutions, zero biases, residual branches starting at zero (identity blocks)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

    for m in vae.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    for m in vae.modules():
        if isinstance(m, WanResidualBlock):
            torch.nn.init.zeros_(m.conv2.weight)


def train_vae(cfg: TrainConfig, log: TrainLog, progress: Callable[[str], None] = print) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vae = AutoencoderKLWan(**architecture()["vae"]).train()
    init_vae(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.vae_steps, 20))
    start = time.time()
    for step in range(cfg.vae_steps):
        x = _vae_batch(rng, cfg, cfg.vae_batch, cfg.vae_frames)
        target = pooled_target(x)
        # Encoder and decoder learn the code from both sides (two independent regressions). Only the decoder
        # renders films, so the encoder (I2V and video-extension prefixes) trains on every few steps; the
        # decoder also sees a batch of single frames (first latents), which teach it colours and shapes cheaply.
        y = vae.decode(target + cfg.vae_latent_noise * torch.randn_like(target)).sample
        images = _vae_batch(rng, cfg, cfg.vae_images, 1)
        code = pooled_target(images)
        y_img = vae.decode(code + cfg.vae_latent_noise * torch.randn_like(code)).sample
        loss = (_weighted(y, x, object_weight(x, cfg.vae_object_weight))
                + _weighted(y_img, images, object_weight(images, cfg.vae_object_weight)))
        total = loss
        if step % cfg.vae_encoder_every == 0:
            enc = F.mse_loss(vae.encode(x).latent_dist.mode(), target)
            total = total + enc
            log.vae_code_loss.append(enc.item())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        log.vae_loss.append(loss.item())
        if step % 25 == 0 or step == cfg.vae_steps - 1:
            progress(
                f"vae step {step} reconstruction {log.tail_mean('vae_loss', 25):.4f} encoder "
                f"{log.tail_mean('vae_code_loss', 7):.4f} ({time.time() - start:.0f} s)"
            )
    log.seconds["vae"] = time.time() - start
    return vae.eval().requires_grad_(False)


@dataclass
class LatentClips:
    """Encoded training clips in model space: latents [N, 16, L, h, w], per-latent direction ids [N, L]."""

    latents: torch.Tensor
    directions: torch.Tensor
    scenes: list[Scene]
    turn_at: list[int]  # latent index where the clip turns, or -1


DIRECTION_NAMES = list(DIRECTIONS)


def encode_clips(cfg: TrainConfig, log: TrainLog, progress: Callable[[str], None] = print) -> LatentClips:
    rng = np.random.default_rng(cfg.seed + 1)
    frames_per_clip = first_frame_of_latent(cfg.clip_latents - 1) + 4
    raws, dirs, scenes, turns = [], [], [], []
    start = time.time()
    for lo in range(0, cfg.clips, 32):
        batch = []
        for _ in range(lo, min(cfg.clips, lo + 32)):
            scene = random_scene(rng, cfg.width, cfg.height)
            turn = -1
            turn_map = None
            if rng.random() < cfg.turn_fraction:
                turn = int(rng.integers(2, cfg.clip_latents - 1))
                new = str(rng.choice([d for d in DIRECTIONS if d != scene.direction]))
                turn_map = {first_frame_of_latent(turn): new}
            frames, per_frame = render_clip(scene, frames_per_clip, cfg.width, cfg.height, turn_map)
            batch.append(to_tensor(frames))
            dirs.append([DIRECTION_NAMES.index(per_frame[first_frame_of_latent(k)]) for k in range(cfg.clip_latents)])
            scenes.append(scene)
            turns.append(turn)
        raws.append(pooled_target(torch.stack(batch)))  # the code itself, not the encoder's estimate of it
        progress(f"encoded {min(cfg.clips, lo + 32)}/{cfg.clips} clips ({time.time() - start:.0f} s)")
    raw = torch.cat(raws)
    if raw.shape[2] != cfg.clip_latents:
        raise AssertionError(f"{frames_per_clip} frames encoded to {raw.shape[2]} latents, not {cfg.clip_latents}")
    mean = raw.mean(dim=(0, 2, 3, 4))
    std = raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-2)  # a near-constant channel is not blown up
    log.latents_mean, log.latents_std = mean.tolist(), std.tolist()
    log.seconds["encode"] = time.time() - start
    latents = (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    return LatentClips(latents, torch.tensor(dirs), scenes, turns)


@torch.no_grad()
def reconstruction_sheet(vae, cfg: TrainConfig, rows: int = 4) -> np.ndarray:
    """uint8 image: for a few fresh clips, frames (top) over their VAE reconstructions (bottom)."""
    rng = np.random.default_rng(cfg.seed + 99)
    out = []
    for _ in range(rows):
        frames, _ = render_clip(random_scene(rng, cfg.width, cfg.height), 9, cfg.width, cfg.height)
        x = to_tensor(frames).unsqueeze(0)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]
        rec = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
        out.append(np.concatenate([np.concatenate(list(frames), 1), np.concatenate(list(rec), 1)], 0))
    return np.concatenate(out, 0)


def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """``engine.text.encode`` with gradients: real tokens' states, zeros up to 512 tokens.

    Encoding at the batch's own length is exact: padding is masked, and UMT5's relative position bias between
    real tokens does not depend on how many pads follow.
    """
    batch = tokenizer(prompts, padding="longest", add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    hidden = text_encoder(batch.input_ids, batch.attention_mask).last_hidden_state
    hidden = hidden * batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.pad(hidden, (0, 0, 0, TEXT_TOKENS - hidden.shape[1]))


def latent_object_weight(x0: torch.Tensor, extra: float) -> torch.Tensor:
    """Per-cell flow-loss weights [B, 1, n, h, w] of model-space latents: 1, plus ``extra`` on cells within one
    cell of the object (far from the window's median, its background). Where the object goes next is the whole
    motion task, yet those cells are a few of 64 and the background is learned early; reweighting cells does not
    move the loss's minimiser (each cell's best prediction is still its conditional mean), only where capacity goes.
    """
    if extra == 0:
        return torch.ones_like(x0[:, :1])
    bg = x0.flatten(2).median(dim=2).values.view(x0.shape[0], -1, 1, 1, 1)
    far = ((x0 - bg).abs().amax(dim=1, keepdim=True) > 0.5).float()
    near = F.max_pool3d(far, (1, 3, 3), stride=1, padding=(0, 1, 1))
    return 1.0 + extra * near


def _shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def _window(rng: np.random.Generator, clips: LatentClips, cfg: TrainConfig, n: int, mode: int) -> tuple[int, int, int]:
    """(clip, offset, prefix) of one training window of ``n`` latents; prefix 0 for fresh and DF windows.

    A window of a turning clip either starts its new frames exactly at the turn (a prefix moving the old way,
    a caption of the new way) or lies wholly on one side of it, so its caption is right for every new frame.
    """
    L = clips.latents.shape[2]
    prefix = int(rng.integers(1, min(3, n - 1) + 1)) if mode == 0 else 0
    while True:  # a clip whose turn leaves no valid window of this layout is drawn again
        i = int(rng.integers(len(clips.scenes)))
        turn = clips.turn_at[i]
        if turn > 0 and mode == 0 and rng.random() < 0.6 and 0 <= turn - prefix <= L - n:
            return i, turn - prefix, prefix
        offsets = [
            off for off in range(L - n + 1)
            if turn < 0 or off + n <= turn or off >= turn or (mode == 0 and off + prefix == turn)
        ]
        if offsets:
            return i, int(rng.choice(offsets)), prefix


def train_transformer(
    clips: LatentClips, cfg: TrainConfig, log: TrainLog, progress: Callable[[str], None] = print
) -> tuple[Any, torch.nn.Module, torch.nn.Module]:
    from diffusers import SkyReelsV2Transformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    arch = architecture(cfg.patch)
    torch.manual_seed(cfg.seed + 2)
    rng = np.random.default_rng(cfg.seed + 2)
    tokenizer = scene_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(**arch["text_encoder"])).train()
    transformer = SkyReelsV2Transformer3DModel(**arch["transformer"]).train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.steps, cfg.warmup))
    ema_tr, ema_te = copy.deepcopy(transformer).eval(), copy.deepcopy(text_encoder).eval()
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    start = time.time()
    for step in range(cfg.steps):
        n = int(rng.choice(cfg.window_lengths, p=np.array(cfg.window_weights) / sum(cfg.window_weights)))
        x0s, prompts, sig, weights = [], [], [], []
        for _ in range(cfg.batch):
            mode = int(rng.choice(3, p=np.array(cfg.mode_weights) / sum(cfg.mode_weights)))
            i, off, prefix = _window(rng, clips, cfg, n, mode)
            x0s.append(clips.latents[i, :, off : off + n])
            scene = clips.scenes[i]
            direction = DIRECTION_NAMES[int(clips.directions[i, off + n - 1])]
            prompts.append("" if rng.random() < cfg.caption_dropout else scene.caption(direction))
            if mode == 2:
                s = _shifted(torch.rand(n, generator=gen), cfg.sigma_shift)
            else:
                s = _shifted(torch.rand(1, generator=gen), cfg.sigma_shift).expand(n).clone()
                s[:prefix] = torch.rand(prefix, generator=gen) * cfg.prefix_sigma_max
            w = torch.ones(n)
            w[:prefix] = 0.0  # the sampler never uses the prediction for prefix frames
            sig.append(s)
            weights.append(w)
        x0 = torch.stack(x0s)
        sigma = torch.stack(sig)  # [B, n]
        weight = torch.stack(weights)
        noise = torch.randn(x0.shape, generator=gen)
        s5 = sigma.view(cfg.batch, 1, n, 1, 1)
        xt = (1 - s5) * x0 + s5 * noise
        text = encode_text(tokenizer, text_encoder, prompts)
        v = df_forward(transformer, xt, sigma * 1000.0, text, cfg.fps)
        cells = latent_object_weight(x0, cfg.flow_object_weight)
        err = ((v - (noise - x0)).pow(2) * cells).mean(dim=(1, 3, 4)) / cells.mean(dim=(1, 3, 4))  # [B, n]
        loss = (err * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for ema, live in ((ema_tr, transformer), (ema_te, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        log.loss.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            progress(f"transformer step {step} loss {log.tail_mean('loss', 50):.4f} ({time.time() - start:.0f} s)")
    log.seconds["transformer"] = time.time() - start
    for m in (ema_tr, ema_te):
        m.eval().requires_grad_(False)
    return tokenizer, ema_te, ema_tr


def with_latent_stats(vae, mean: list[float], std: list[float]):
    """A copy of ``vae`` whose config carries the training latents' statistics (the renderer's model space)."""
    from diffusers import AutoencoderKLWan

    out = AutoencoderKLWan(**architecture()["vae"], latents_mean=mean, latents_std=std)
    out.load_state_dict(vae.state_dict())
    return out.eval().requires_grad_(False)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
