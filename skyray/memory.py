"""Predicted peak GPU memory of one rank rendering a window: weights, activations, workspaces, decode.

Pure arithmetic (no torch), so ``skyray plan`` can refuse a film that cannot fit before anything loads, and choose
between batched and sequential classifier-free guidance.  A rank's render goes through three phases, and its peak
is the largest of them:

- **encode**: the text encoder visits the GPU to embed a window's new prompts (``executors.worker``), while the
  transformer and VAE are resident;
- **sample**: the transformer's forward over the window's tokens (the text encoder is back on the CPU);
- **decode**: the VAE decodes the window's latents one at a time (``engine.decode.StreamingDecoder``), when the
  decoder runs on this GPU (the local executor; Ray's chain writers decode on the CPU unless ``--decode-gpu``).

Weights are counted exactly from the architecture (``tests/test_memory.py`` checks the counts against the
diffusers/transformers modules built on the meta device).  Activations are bytes per element of the rank's
``[batch, tokens, dim]`` hidden state, at the peak of one block of ``engine.forward``: measured on the CPU in bf16
at the 1.3B and 14B widths with ``torch.profiler``'s allocation events (``bench/gpu_check.py --cpu-smoke`` and
``tests/test_memory.py`` re-measure them), so they follow the code's own temporaries, not a guess.  The CUDA
caching allocator's rounding and fragmentation and the CUDA context (~0.5 GiB, outside ``max_memory_allocated``)
come on top as a fixed ``RUNTIME_BYTES`` reserve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GiB = 1024**3
DEFAULT_GPU_MEMORY_GIB = 80.0

BF16, FP32 = 2, 4
TEXT_TOKENS = 512

# Peak bytes per element of the rank's hidden state [B, n, dim] inside one transformer block (bf16 weights and
# activations).  Two phases compete: the FFN (input, GELU input and output of width ffn_dim: 4 bytes per ffn
# element, plus ACT_FFN_BASE per dim element for the residuals around it) and self-attention (q, k, v, their
# normalised and rotated copies, the fp32 rope and RMSNorm temporaries, the output).  Measured on the CPU
# (torch 2.13, bf16, df_forward of 2+ blocks): 1.3B widths 33.5 B/elem (FFN phase), 14B widths 26.2 B/elem
# (attention phase).
ACT_FFN_BASE = 10.2
ACT_FFN_PER_RATIO = 4.0
ACT_ATTENTION = 26.2
# Ulysses' all-to-all holds the send and receive buffers of q, k and v while the originals are alive.  Measured
# with gloo over 2 ranks at the 14B ffn/dim ratio: 30.3 B/elem in the attention phase (at the 1.3B widths the
# FFN stays the peak, 33.7).  One run out of several saw 42.3 on one of the two ranks, which we take to be gloo's
# own staging buffers (NCCL keeps its buffers outside torch's allocator); the GPU check will tell.
ACT_ULYSSES_EXTRA = 4.2
# What the CUDA runtime holds outside torch's tensors (context, cuBLAS/cuDNN workspaces) plus allocator rounding.
RUNTIME_BYTES = int(0.75 * GiB)
# Wan VAE decoder: peak bytes per output pixel while decoding one latent (4 frames) at base_dim 96, its causal
# conv caches included (~9,500 of them: two frames of every causal conv's input), measured on the CPU in fp32 at
# 64x64 and 128x128 pixels (21,516 and 21,186).  The CPU's unfolded 3-D convolutions likely take more transient
# memory than cuDNN's: an upper bound until bench/gpu_check.py measures it on a GPU.
VAE_DECODE_BYTES_PER_PIXEL = 21200.0


@dataclass(frozen=True)
class TextEncoderSpec:
    vocab: int
    d_model: int
    d_kv: int
    heads: int
    d_ff: int
    layers: int
    buckets: int

    @property
    def params(self) -> int:
        """UMT5 encoder (gated GELU, per-layer relative attention bias, embedding tied to the input)."""
        inner = self.heads * self.d_kv
        per_layer = 4 * self.d_model * inner + self.buckets * self.heads + 2 * self.d_model + 3 * self.d_model * self.d_ff
        return self.vocab * self.d_model + self.layers * per_layer + self.d_model


UMT5_XXL = TextEncoderSpec(vocab=256384, d_model=4096, d_kv=64, heads=64, d_ff=10240, layers=24, buckets=32)
TINY_UMT5 = TextEncoderSpec(vocab=64, d_model=32, d_kv=8, heads=4, d_ff=64, layers=2, buckets=8)
WAN_VAE_PARAMS = 126_892_531  # AutoencoderKLWan() (Wan2.1, base_dim 96, z_dim 16)
TINY_VAE_PARAMS = 13_861  # models.tiny_configs()["vae"] (base_dim 3)


@dataclass(frozen=True)
class ModelSpec:
    """The sizes memory depends on: a ``models.ModelFamily`` plus the text and VAE sides of the checkpoint."""

    name: str
    heads: int
    head_dim: int
    layers: int
    ffn_dim: int
    text_dim: int = 4096
    freq_dim: int = 256
    channels: int = 16
    text_encoder: TextEncoderSpec = UMT5_XXL
    vae_params: int = WAN_VAE_PARAMS
    vae_base_dim: int = 96

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @classmethod
    def of(cls, family) -> ModelSpec:
        """From a ``models.ModelFamily`` (duck-typed: name, heads, head_dim, layers, ffn_dim)."""
        base = dict(name=family.name, heads=family.heads, head_dim=family.head_dim, layers=family.layers,
                    ffn_dim=family.ffn_dim)
        if family.name.startswith("tiny"):
            return cls(**base, text_dim=32, text_encoder=TINY_UMT5, vae_params=TINY_VAE_PARAMS, vae_base_dim=3)
        return cls(**base)

    @classmethod
    def of_model(cls, model: str, family) -> ModelSpec:
        """For a model reference: a diffusers folder's own configs where there is one (any size), else the
        family's released checkpoint sizes."""
        root = Path(model)
        if family.name.startswith("tiny") or not (root / "transformer" / "config.json").is_file():
            return cls.of(family)
        tr = json.loads((root / "transformer" / "config.json").read_text())
        spec = dict(name=family.name, heads=family.heads, head_dim=family.head_dim, layers=family.layers,
                    ffn_dim=family.ffn_dim, text_dim=int(tr.get("text_dim", 4096)),
                    freq_dim=int(tr.get("freq_dim", 256)), channels=int(tr.get("in_channels", 16)))
        te_path = root / "text_encoder" / "config.json"
        if te_path.is_file():
            te = json.loads(te_path.read_text())
            spec["text_encoder"] = TextEncoderSpec(
                vocab=int(te["vocab_size"]), d_model=int(te["d_model"]), d_kv=int(te["d_kv"]),
                heads=int(te["num_heads"]), d_ff=int(te["d_ff"]), layers=int(te["num_layers"]),
                buckets=int(te.get("relative_attention_num_buckets", 32)),
            )
        vae_path = root / "vae" / "config.json"
        if vae_path.is_file():
            base = int(json.loads(vae_path.read_text()).get("base_dim", 96))
            # Conv weights grow with the square of the channel width.
            spec.update(vae_base_dim=base, vae_params=WAN_VAE_PARAMS * base * base // (96 * 96))
        return cls(**spec)

    def transformer_params(self) -> tuple[int, int]:
        """(bf16, fp32) parameter counts of ``SkyReelsV2Transformer3DModel`` (T2V, ``inject_sample_info``): the
        fp32 ones are diffusers' ``_keep_in_fp32_modules`` (time embedder, modulation tables, norms)."""
        d, f = self.dim, self.ffn_dim
        attn = 4 * (d * d + d) + 2 * d  # q, k, v, out + RMS norms of q and k
        block = 2 * attn + (d * f + f + f * d + d)
        top = (
            self.channels * 4 * d + d  # patch embedding (1, 2, 2)
            + 6 * d * d + 6 * d  # time projection
            + self.text_dim * d + d + d * d + d  # text embedder
            + 2 * d + (d * d + d) + (6 * d * d + 6 * d)  # fps embedding and projection
            + d * self.channels * 4 + self.channels * 4  # output projection
        )
        fp32 = self.freq_dim * d + d + d * d + d + self.layers * (6 * d + 2 * d) + 2 * d
        return self.layers * block + top, fp32


@dataclass(frozen=True)
class Layout:
    """How a group splits a window (``engine.parallel.ParallelConfig``'s degrees)."""

    ulysses: int = 1
    ring: int = 1
    cfg: bool = False

    @property
    def sequence(self) -> int:
        return self.ulysses * self.ring


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes on one rank; ``peak`` is the largest phase plus the runtime reserve."""

    transformer_bf16: int
    transformer_fp32: int
    text_encoder: int  # resident only while encoding (``encode`` phase)
    vae: int
    activations: int  # one forward's block peak
    text_cache: int  # the window's cross-attention keys and values of every block
    attention: int  # block-causal attention's extra workspace (0 for full attention: in ``activations``)
    vae_decode: int  # 0 when the decoder is not on this GPU
    batch: int  # forward batch: 2 for batched CFG on one rank, else 1
    tokens: int  # the window's tokens (all ranks)
    offload: bool = False  # the transformer leaves the GPU while encoding and decoding
    runtime: int = RUNTIME_BYTES

    @property
    def weights(self) -> int:
        return self.transformer_bf16 + self.transformer_fp32 + self.vae

    @property
    def phases(self) -> dict[str, int]:
        transformer = self.transformer_bf16 + self.transformer_fp32
        others = 0 if self.offload else transformer
        return {
            "encode": others + self.vae + self.text_encoder + _text_encoder_activations(self.text_encoder),
            "sample": transformer + self.vae + self.activations + self.text_cache + self.attention,
            "decode": others + self.vae + self.vae_decode,
        }

    @property
    def peak_phase(self) -> str:
        return max(self.phases.items(), key=lambda kv: kv[1])[0]

    @property
    def peak(self) -> int:
        return max(self.phases.values()) + self.runtime


def _text_encoder_activations(weights: int) -> int:
    # 512 tokens through UMT5: tens of MB for XXL; scale with the model so the tiny one stays tiny.
    return weights // 100


def estimate(
    model: ModelSpec,
    height: int,
    width: int,
    window_latents: int,
    layout: Layout = Layout(),
    guided: bool = True,
    cfg_batch: bool = True,
    causal_block_size: int | None = None,
    decode_on_gpu: bool = True,
    offload: bool = False,
) -> Estimate:
    """Peak memory of one rank for a window of ``window_latents`` latent frames at ``height`` x ``width``.

    ``causal_block_size`` (not None) is block-causal attention with blocks of that many latent frames.
    """
    per_frame = (height // 16) * (width // 16)
    tokens = window_latents * per_frame
    batch = 2 if guided and cfg_batch and not layout.cfg else 1
    elems = batch * (tokens // layout.sequence) * model.dim
    ffn = ACT_FFN_BASE + ACT_FFN_PER_RATIO * model.ffn_dim / model.dim
    attn = ACT_ATTENTION + (ACT_ULYSSES_EXTRA if layout.sequence > 1 else 0.0)
    activations = int(elems * max(ffn, attn))
    branches = 1 if not guided or layout.cfg else 2  # a CFG-parallel rank holds its own branch's text only
    text_cache = model.layers * 2 * branches * TEXT_TOKENS * model.dim * BF16 + branches * TEXT_TOKENS * model.dim * BF16
    attention = 0
    if causal_block_size is not None:
        # Beyond full attention's output: one causal block's SDPA result and log-sum-exp, this rank's heads
        # (engine.attention.block_causal_bytes minus the output already in the activations).
        block = min(causal_block_size, window_latents) * per_frame
        attention = batch * (model.heads // layout.ulysses) * block * (model.head_dim * BF16 + FP32)
    bf16, fp32 = model.transformer_params()
    decode = 0
    if decode_on_gpu:
        decode = int(VAE_DECODE_BYTES_PER_PIXEL * model.vae_base_dim / 96 * height * width)
    return Estimate(
        transformer_bf16=bf16 * BF16,
        transformer_fp32=fp32 * FP32,
        text_encoder=model.text_encoder.params * BF16,
        vae=model.vae_params * FP32,
        activations=activations,
        text_cache=text_cache,
        attention=attention,
        vae_decode=decode,
        batch=batch,
        tokens=tokens,
        offload=offload,
    )


def human(n: float) -> str:
    """Bytes as GiB (or MiB below one GiB)."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def describe(e: Estimate) -> str:
    """One line: the peak, its phase, and what it is made of."""
    act = f"activations {human(e.activations)} (batch {e.batch})"
    parts = [
        f"transformer {human(e.transformer_bf16)} bf16 + {human(e.transformer_fp32)} fp32",
        f"VAE {human(e.vae)} fp32",
        f"text encoder {human(e.text_encoder)} bf16 (on the GPU only while encoding)",
        act,
        f"text K/V {human(e.text_cache)}",
    ]
    if e.attention:
        parts.append(f"block-causal workspace {human(e.attention)}")
    if e.vae_decode:
        parts.append(f"VAE decode {human(e.vae_decode)}")
    return f"{human(e.peak)} at {e.peak_phase} ({', '.join(parts)}, runtime {human(e.runtime)})"
