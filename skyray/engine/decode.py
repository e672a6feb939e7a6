"""Streaming causal VAE decode: model-space latents in, uint8 frames out, a few latents at a time.

The Wan VAE decoder is causal in time. ``AutoencoderKLWan._decode`` already runs it latent by latent, carrying
each causal conv's last input frames in a list (``feat_cache``) indexed by a running counter (``feat_idx``). We
run that same loop, but keep the list between calls, so a film can be decoded window by window while it is being
sampled, with memory bounded by one latent's activations instead of the film's length.

The cache lives in this object, not in the VAE's own ``_feat_map``: ``vae.decode`` clears that one, so a VAE
shared with conditioning (``vae.encode``) or a one-shot decode cannot corrupt a stream in progress.
"""

from __future__ import annotations

import numpy as np
import torch

# Frames one latent decodes to, after the first latent of a sequence (which decodes to one frame).
TEMPORAL_STRIDE = 4


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """Decoded video [1, 3, F, H, W] in [-1, 1] -> uint8 frames [F, H, W, 3].

    Same float ops as ``VideoProcessor.postprocess_video(video, output_type="np")`` (x * 0.5 + 0.5, clamp to
    [0, 1]) followed by ``(x * 255).round()``, which is what ``VaeImageProcessor.numpy_to_pil`` does. diffusers'
    ``export_to_video`` and the original SkyReels-V2 scripts truncate instead (``astype(np.uint8)``); rounding is
    unbiased where truncation darkens every frame by half a level on average, and differs from it by at most 1.
    Done on the tensor's device so only uint8 crosses to the host.
    """
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"expected a video [1, 3, F, H, W], got {tuple(video.shape)}")
    x = (video[0].float() * 0.5 + 0.5).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def _causal_conv_count(vae: torch.nn.Module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())


class StreamingDecoder:
    """Decode one sequence of model-space latents in consecutive chunks, exactly as one ``vae.decode`` would.

    ``push`` returns the frames of exactly the latents it was given: 1 frame for the first latent of the sequence,
    4 for every later one. ``warm`` feeds latents whose frames someone else already has (the prefix of a video
    being extended, or the tail of a previous shot decoded elsewhere) so the next ``push`` continues seamlessly.

    Spatial tiling (``vae.enable_tiling()``) is not applied: streaming bounds memory in time, not in space.
    """

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae
        param = next(vae.parameters())
        self.device, self.dtype = param.device, param.dtype
        z_dim = int(vae.config.z_dim)
        shape = (1, z_dim, 1, 1, 1)
        # The reference pipelines denormalize as ``latents / (1 / std) + mean``; we use the same ops (not
        # ``* std``) so our raw latents are bit-identical to theirs.
        self._inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape).to(self.device)
        self._mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape).to(self.device)
        self._conv_count = _causal_conv_count(vae)
        self.reset()

    def reset(self) -> None:
        """Forget the sequence: the next latent pushed is a first latent again (decodes to one frame)."""
        self._feat_map: list = [None] * self._conv_count
        self.latents_seen = 0

    @property
    def frames_seen(self) -> int:
        """Frames decoded so far (pushed or warmed) in this sequence."""
        return 0 if self.latents_seen == 0 else TEMPORAL_STRIDE * (self.latents_seen - 1) + 1

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> np.ndarray:
        """Decode the next latents [1, 16, n, h, w] (model space) -> uint8 frames [frames, 8h, 8w, 3]."""
        return self._decode(latents, keep=True)

    @torch.no_grad()
    def warm(self, latents: torch.Tensor) -> None:
        """Prime the causal cache with latents whose frames are not wanted (they still cost a full decode)."""
        self._decode(latents, keep=False)

    def _decode(self, latents: torch.Tensor, keep: bool) -> np.ndarray:
        if latents.ndim != 5 or latents.shape[0] != 1 or latents.shape[1] != self._mean.shape[1]:
            raise ValueError(f"expected latents [1, {self._mean.shape[1]}, n, h, w], got {tuple(latents.shape)}")
        if latents.shape[2] < 1:
            raise ValueError("push at least one latent")
        raw = latents.to(self.device, torch.float32) / self._inv_std + self._mean
        # post_quant_conv is a 1x1x1 conv: no temporal state, so applying it per chunk equals applying it once.
        x = self.vae.post_quant_conv(raw.to(self.dtype))
        patch = self.vae.config.get("patch_size")
        frames = []
        for i in range(x.shape[2]):
            out = self.vae.decoder(
                x[:, :, i : i + 1],
                feat_cache=self._feat_map,
                feat_idx=[0],
                first_chunk=self.latents_seen == 0,
            )
            self.latents_seen += 1
            if not keep:
                continue
            if patch is not None:
                from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                out = unpatchify(out, patch_size=patch)
            # _decode clamps the concatenated output; clamping is elementwise, so per latent is the same.
            frames.append(to_uint8(out.clamp(-1.0, 1.0)))
        if not keep:
            return np.empty((0,), dtype=np.uint8)
        return np.concatenate(frames, axis=0)
