"""Streaming decode must equal one-shot ``vae.decode`` of the whole sequence, frame for frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.video_processor import VideoProcessor

from skyray import models
from skyray.engine.decode import StreamingDecoder, to_uint8

LATENTS = 7  # 25 frames at 64x64


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return models.build_tiny().vae


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(1, 16, LATENTS, 8, 8, generator=torch.Generator().manual_seed(0))


def reference_video(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The reference pipeline's decode: denormalize as it does, then one ``vae.decode``."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
    with torch.no_grad():
        return vae.decode(latents / inv_std + mean).sample


@pytest.fixture(scope="module")
def reference(vae: torch.nn.Module, latents: torch.Tensor) -> np.ndarray:
    video = reference_video(vae, latents)
    frames = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="np")[0]
    return (frames * 255).round().astype(np.uint8)


def diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_reference_is_not_trivial(reference: np.ndarray) -> None:
    assert reference.shape == (1 + 4 * (LATENTS - 1), 64, 64, 3)
    assert reference.std() > 1.0


def test_to_uint8_matches_postprocess_video(vae: torch.nn.Module, latents: torch.Tensor, reference: np.ndarray):
    video = reference_video(vae, latents)
    assert diff(to_uint8(video), reference) == 0
    # export_to_video truncates ((x * 255).astype(uint8)); we round: never more than one level apart.
    truncated = (VideoProcessor().postprocess_video(video, output_type="np")[0] * 255).astype(np.uint8)
    assert diff(to_uint8(video), truncated) <= 1


@pytest.mark.parametrize("chunks", [[1, 2, 3, 1], [1] * LATENTS, [LATENTS], [3, 4]])
def test_chunked_push_equals_one_shot(vae, latents, reference, chunks: list[int]) -> None:
    dec = StreamingDecoder(vae)
    outs, start = [], 0
    for n in chunks:
        outs.append(dec.push(latents[:, :, start : start + n]))
        start += n
    # The first latent of a sequence decodes to 1 frame, every later one to 4.
    assert [len(o) for o in outs] == [4 * n - 3 * (i == 0) for i, n in enumerate(chunks)]
    assert all(o.dtype == np.uint8 for o in outs)
    assert diff(np.concatenate(outs), reference) == 0
    assert dec.latents_seen == LATENTS and dec.frames_seen == len(reference)


@pytest.mark.parametrize("prefix", [1, 3])
def test_warm_then_push_equals_tail(vae, latents, reference, prefix: int) -> None:
    dec = StreamingDecoder(vae)
    dec.warm(latents[:, :, :prefix])
    tail = np.concatenate([dec.push(latents[:, :, prefix : prefix + 1]), dec.push(latents[:, :, prefix + 1 :])])
    assert diff(tail, reference[1 + 4 * (prefix - 1) :]) == 0


def test_reset_starts_a_new_sequence(vae, latents, reference) -> None:
    dec = StreamingDecoder(vae)
    dec.push(latents[:, :, :4])
    dec.reset()
    assert diff(dec.push(latents), reference) == 0


def test_stream_survives_other_uses_of_the_vae(vae, latents, reference) -> None:
    dec = StreamingDecoder(vae)
    first = dec.push(latents[:, :, :2])
    reference_video(vae, latents[:, :, :3])  # vae.decode clears the VAE's own cache, not ours
    rest = dec.push(latents[:, :, 2:])
    assert diff(np.concatenate([first, rest]), reference) == 0


def test_cache_does_not_grow(vae, latents) -> None:
    def cached_elements(dec: StreamingDecoder) -> int:
        return sum(t.numel() for t in dec._feat_map if isinstance(t, torch.Tensor))

    dec = StreamingDecoder(vae)
    dec.push(latents[:, :, :3])
    early = cached_elements(dec)
    dec.push(latents[:, :, 3:])
    assert cached_elements(dec) == early > 0


def test_rejects_bad_shapes(vae, latents) -> None:
    dec = StreamingDecoder(vae)
    with pytest.raises(ValueError):
        dec.push(latents[:, :, :0])
    with pytest.raises(ValueError):
        dec.push(torch.cat([latents, latents]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_latents_into_a_cuda_vae(vae, latents, reference) -> None:
    import copy

    dec = StreamingDecoder(copy.deepcopy(vae).to("cuda"))
    frames = np.concatenate([dec.push(latents[:, :, :1]), dec.push(latents[:, :, 1:])])
    # Different kernels than the CPU reference: allow one level of rounding disagreement.
    assert diff(frames, reference) <= 1
