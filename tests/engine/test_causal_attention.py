"""Block-causal attention without an N x N mask: equal to the dense-mask result, and O(N) memory at 720p.

The dense mask lives here only, as the reference.  Memory is counted by construction on the meta device: every
tensor an op allocates (views excluded) is recorded with its lifetime, giving the peak of live bytes and the
largest single allocation.  The fused SDPA kernel (flash / memory-efficient on GPUs, torch's flash kernel on the
CPU) is stood in for by its outputs, because on the meta device SDPA decomposes into the math path that builds
the score matrix the fused kernels never hold.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from skyray.engine.attention import LSE_BYTES, BlockCausal, attention, block_causal_bytes
from skyray.engine.forward import causal_block_ids, df_forward

TOL = 1e-5
# 720p: 121 frames = 31 latent frames of 45 x 80 patches = 3600 tokens; N = 111,600.
FRAMES_720P, TOKENS_PER_FRAME_720P = 31, 3600
N_720P = FRAMES_720P * TOKENS_PER_FRAME_720P


def dense_mask(causal: BlockCausal) -> torch.Tensor:
    blocks = torch.tensor(causal.block_ids).repeat_interleave(causal.tokens_per_frame)
    return blocks.unsqueeze(0) <= blocks.unsqueeze(1)  # [N, N]: query row sees key column


def qkv(batch: int, tokens: int, heads: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, tokens, heads, dim, generator=g) for _ in range(3))


@pytest.mark.parametrize(
    "ids",
    [
        causal_block_ids(0, 7, 0, 2),  # a partial last block
        causal_block_ids(4, 6, 1, 2),  # a handed-over prefix and an end-image suffix
        causal_block_ids(3, 5, 0, 5),  # a prefix that is not a whole block
        causal_block_ids(0, 5, 0, 1),  # every frame its own block
        [0, 0, 0, 0],  # one block: full attention
    ],
)
def test_block_causal_equals_dense_mask(ids):
    causal = BlockCausal(tuple(ids), 6)
    q, k, v = qkv(2, causal.tokens, 3, 16)
    got = attention(q, k, v, causal)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=dense_mask(causal)
    ).transpose(1, 2)
    assert got.shape == want.shape and got.is_contiguous()
    assert (got - want).abs().max().item() <= TOL
    if len(set(ids)) > 1:  # and it differs from full attention, so the pattern is really applied
        assert (attention(q, k, v) - want).abs().max().item() > 1e-2


def test_tiny_forward_block_causal_equals_dense_mask_forward(tiny, monkeypatch):
    # The whole forward: ours against the same forward with SDPA given the dense mask (patched in test only).
    from skyray.engine import forward as Fw

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 5, 4, 8, generator=g)
    t = torch.tensor([[999, 800, 600, 400, 0]] * 2)
    text = torch.randn(2, 12, 32, generator=g)
    ids = causal_block_ids(1, 4, 0, 2)
    got = df_forward(tiny.transformer, x, t, text, 24, ids)

    def dense(q, k, v, causal=None):
        mask = None if causal is None else dense_mask(causal)
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)

    monkeypatch.setattr(Fw, "attention", dense)
    want = df_forward(tiny.transformer, x, t, text, 24, ids)
    assert (got - want).abs().max().item() <= TOL
    assert (df_forward(tiny.transformer, x, t, text, 24) - want).abs().max().item() > 1e-4


def test_block_ids_must_not_decrease():
    with pytest.raises(ValueError, match="must not decrease"):
        BlockCausal((0, 1, 0), 4)
    with pytest.raises(ValueError, match="expects 24 tokens, got 20"):
        attention(*qkv(1, 20, 1, 4), BlockCausal((0, 0, 1, 1), 6))


# ------------------------------------------------------------------------------------------- memory at 720p


class AllocationCounter(TorchDispatchMode):
    """Peak live bytes, the largest allocation, and the largest product of an allocation's two longest
    dimensions (``pairwise``: N x N for a mask or a score matrix, N x width for a per-token tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: list[tuple[weakref.ref, int]] = []
        self.peak = 0
        self.largest = 0
        self.largest_shape: tuple[int, ...] = ()
        self.pairwise = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place write: no new memory
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.live.append((weakref.ref(t), n))
                if n > self.largest:
                    self.largest, self.largest_shape = n, tuple(t.shape)
                dims = sorted(t.shape, reverse=True) + [1, 1]
                self.pairwise = max(self.pairwise, dims[0] * dims[1])
        self.live = [(r, n) for r, n in self.live if r() is not None]
        self.peak = max(self.peak, sum(n for _, n in self.live))
        return out


class FusedSDPA(TorchFunctionMode):
    """Stands in for a fused SDPA kernel: allocates what it returns (the output and an fp32 log-sum-exp per
    query and head) and records each call's query and key lengths; a mask would be a failure."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            assert kwargs.get("attn_mask") is None and len(args) == 3, "SDPA was given a mask"
            self.calls.append((q.shape[-2], k.shape[-2]))
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # held with the output
            out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
            del lse
            return out
        return func(*args, **kwargs)


@pytest.mark.parametrize("heads", [12, 5])  # 1.3B on one rank; 14B (40 heads) under Ulysses 8
def test_block_causal_at_720p_holds_no_n_by_n_tensor(heads):
    causal = BlockCausal(tuple(causal_block_ids(0, FRAMES_720P, 0, 5)), TOKENS_PER_FRAME_720P)
    q, k, v = (torch.empty(1, N_720P, heads, 128, dtype=torch.bfloat16, device="meta") for _ in range(3))
    counter, sdpa = AllocationCounter(), FusedSDPA()
    with counter, sdpa:
        out = attention(q, k, v, causal)
    assert out.shape == q.shape
    # One unmasked call per block of 5 frames, each over the key prefix its block may see.
    spans = causal.spans()
    assert sdpa.calls == [(e - s, e) for s, e in spans] and len(spans) == 7
    predicted = block_causal_bytes(N_720P, FRAMES_720P, 5, heads, 128, itemsize=2)
    assert counter.peak == predicted
    # O(N): the output plus one block, far below even a bool N x N mask (12.5 GB).
    assert predicted == heads * (N_720P * 256 + 18000 * (256 + LSE_BYTES))
    assert counter.peak < 2 * N_720P * heads * 128 * 2
    assert counter.largest == N_720P * heads * 128 * 2, counter.largest_shape
    assert counter.pairwise == N_720P * 128  # per token, never per token pair


def test_counter_sees_a_dense_mask():
    # The counter would catch the old way: the dense bool mask at 720p is N x N bytes.
    causal = BlockCausal(tuple(causal_block_ids(0, FRAMES_720P, 0, 5)), TOKENS_PER_FRAME_720P)
    counter = AllocationCounter()
    with counter:
        blocks = torch.tensor(causal.block_ids, device="meta").repeat_interleave(causal.tokens_per_frame)
        mask = blocks.unsqueeze(0) <= blocks.unsqueeze(1)
    assert mask.shape == (N_720P, N_720P)
    assert counter.largest == counter.pairwise == N_720P * N_720P  # 12.45 GB


def test_whole_forward_at_720p_on_meta_holds_no_n_by_n_tensor():
    # A 1.3B-width transformer (one block) on the meta device runs a causal 720p window: no tensor anywhere in
    # the forward comes near N x N.
    from diffusers import SkyReelsV2Transformer3DModel

    with torch.device("meta"):
        model = SkyReelsV2Transformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=1, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", inject_sample_info=True,
        ).to(torch.bfloat16)
    x = torch.empty(1, 16, FRAMES_720P, 90, 160, dtype=torch.bfloat16, device="meta")
    t = torch.zeros(1, FRAMES_720P, dtype=torch.long, device="meta")
    text = torch.empty(1, 512, 4096, dtype=torch.bfloat16, device="meta")
    counter, sdpa = AllocationCounter(), FusedSDPA()
    with counter, sdpa:
        out = df_forward(model, x, t, text, 24, causal_block_ids(0, FRAMES_720P, 0, 5))
    assert out.shape == x.shape
    assert len(sdpa.calls) == 7 + 1  # the causal blocks' self-attention and one cross-attention
    # The widest tensors are per token (the feed-forward's hidden layer), never per token pair: even one
    # block's score tile (18,000 x 111,600) would be twice this.
    assert counter.pairwise == N_720P * 8960
    assert counter.largest <= N_720P * 8960 * 4, counter.largest_shape
