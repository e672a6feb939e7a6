"""Rope keeps the reference's precision whatever dtype or device the transformer was cast or loaded to.

diffusers builds the rope tables from fp64 angles and stores cos/sin as fp32 buffers, kept fp32 by
``_keep_in_fp32_modules`` when loaded with ``torch_dtype``; a plain ``.to(torch.bfloat16)`` casts them, and a
meta-device load leaves them empty.  Our forward never reads those buffers.
"""

from __future__ import annotations

import copy

import torch

from skyray.engine.forward import window_geometry

SHAPE = (1, 16, 31, 90, 160)  # a 720p window: 31 latent frames of 45 x 80 patches


def fp64_tables(head_dim: int, shape: tuple[int, ...], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: angles in fp64, cos/sin rounded once to fp32, interleaved pairs, split t/h/w."""
    _, _, frames, height, width = shape
    h_dim = w_dim = 2 * (head_dim // 6)
    dims = (head_dim - h_dim - w_dim, h_dim, w_dim)
    sizes = (frames, height // 2, width // 2)
    cos, sin = [], []
    for axis, (dim, n) in enumerate(zip(dims, sizes)):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
        ang = torch.outer(torch.arange(n, dtype=torch.float64), freqs)  # [n, dim/2]
        view = [1, 1, 1, dim // 2]
        view[axis] = n
        cos.append(ang.cos().float().view(view).expand(*sizes, dim // 2))
        sin.append(ang.sin().float().view(view).expand(*sizes, dim // 2))
    # One angle per interleaved pair: the geometry keeps cos of the even and sin of the odd entries.
    return torch.cat(cos, -1).reshape(1, -1, 1, head_dim // 2), torch.cat(sin, -1).reshape(1, -1, 1, head_dim // 2)


def real_width_transformer(**kw):
    from diffusers import SkyReelsV2Transformer3DModel

    args = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", inject_sample_info=True,
    )
    return SkyReelsV2Transformer3DModel(**{**args, **kw}).eval()


def test_rope_of_a_bf16_cast_model_keeps_fp64_angles():
    model = real_width_transformer()
    ref = window_geometry(model, SHAPE, torch.device("cpu"))
    cast = copy.deepcopy(model).to(torch.bfloat16)
    assert cast.rope.freqs_cos.dtype == torch.bfloat16  # what .to() does to the stock buffers
    got = window_geometry(cast, SHAPE, torch.device("cpu"))
    want_cos, want_sin = fp64_tables(128, SHAPE)
    for geo in (ref, got):
        assert geo.cos.dtype == geo.sin.dtype == torch.float32
        assert torch.equal(geo.cos, want_cos) and torch.equal(geo.sin, want_sin)
    # The bf16 buffers would have been visibly worse (what a forward reading them would rotate with).
    bf16_cos = cast.rope(torch.empty(SHAPE, device="meta"))[0][..., 0::2]
    assert (bf16_cos.float() - want_cos).abs().max().item() > 1e-3


def test_rope_of_a_meta_loaded_model_is_computed_not_read():
    # A transformer built on the meta device (the shape of a load with assign=True) has no rope values at all.
    with torch.device("meta"):
        model = real_width_transformer()
    assert model.rope.freqs_cos.is_meta
    geo = window_geometry(model, SHAPE, torch.device("cpu"))
    want_cos, want_sin = fp64_tables(128, SHAPE)
    assert torch.equal(geo.cos, want_cos) and torch.equal(geo.sin, want_sin)


def test_tiny_model_rope_matches_its_own_fp32_buffers(tiny):
    # Our angles are the stock module's, entry for entry, for the model as built.
    shape = (2, 16, 5, 4, 8)
    geo = window_geometry(tiny.transformer, shape, torch.device("cpu"))
    cos, sin = tiny.transformer.rope(torch.empty(shape))
    assert torch.equal(geo.cos, cos[..., 0::2]) and torch.equal(geo.sin, sin[..., 1::2])
