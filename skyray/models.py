"""Load the five model components: from a diffusers folder, a hub id, or the built-in ``tiny`` model.

The ``tiny`` model has the real architecture at toy size with deterministic random weights: the same on every
machine, built offline in about a second, so tests and the demo film run without a GPU or a model hub.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REQUIRED_PARTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
HUB_PREFIX = "Skywork/"
TINY = "tiny"
TINY_SEED = 20250601
# A small model trained on procedural scenes (skyray model train-tiny), shipped as package data: the demo model.
TINY_TRAINED = "tiny-trained"
TINY_TRAINED_DIR = Path(__file__).resolve().parent / "assets" / "tiny_trained"
# Character-level vocabulary for the tiny tokenizer: any prompt maps to real tokens, none to <unk> only.
_TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-()/&"


@dataclass(frozen=True)
class ModelFamily:
    """What the planner and the parallel layer need to know about a checkpoint without loading it."""

    name: str
    heads: int
    head_dim: int
    layers: int
    ffn_dim: int
    text_len: int = 512

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


FAMILIES = {
    "tiny": ModelFamily("tiny", heads=4, head_dim=12, layers=2, ffn_dim=32),
    "1.3B": ModelFamily("1.3B", heads=12, head_dim=128, layers=30, ffn_dim=8960),
    "14B": ModelFamily("14B", heads=40, head_dim=128, layers=40, ffn_dim=13824),
}


@dataclass
class Components:
    """A loaded model: modules in eval mode on ``device``, plus its family."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any
    family: ModelFamily
    source: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def scheduler_for(self, shift: float) -> Any:
        """A fresh scheduler with the film's flow shift (the stored one is never mutated)."""
        return type(self.scheduler).from_config(self.scheduler.config, flow_shift=float(shift))

    def to(self, device: torch.device | str, offload: bool = False) -> Components:
        """Move to ``device`` as ``placement`` says: with ``offload`` only the VAE moves now and the text encoder
        and transformer stay on the CPU until a stage needs them (weights never all on a small GPU at once); on a
        GPU the text encoder always stays on the CPU between encodings."""
        device = torch.device(device)
        for part, where in placement(device, offload).items():
            getattr(self, part).to(where)
        self.device = device
        return self


def dtypes_for(device: torch.device) -> dict[str, torch.dtype]:
    """bf16 transformer and text encoder on GPU; the VAE stays fp32 (its decode is sensitive); fp32 on CPU."""
    if device.type == "cuda":
        return {"transformer": torch.bfloat16, "text_encoder": torch.bfloat16, "vae": torch.float32}
    return {"transformer": torch.float32, "text_encoder": torch.float32, "vae": torch.float32}


def family_from_config(cfg: dict[str, Any]) -> ModelFamily:
    heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    for fam in FAMILIES.values():
        if (fam.heads, fam.head_dim, fam.layers) == (heads, head_dim, int(cfg["num_layers"])):
            return fam
    return ModelFamily("custom", heads=heads, head_dim=head_dim, layers=int(cfg["num_layers"]), ffn_dim=int(cfg["ffn_dim"]))


def family_of(model: str) -> ModelFamily:
    """Family of a model reference without loading weights (reads transformer/config.json for folders)."""
    if model == TINY:
        return FAMILIES["tiny"]
    if "://" in model:
        from skyray.output.location import OutputLocation

        data = OutputLocation(model).read_bytes("transformer/config.json")
        if data is None:
            raise ValueError(f"model {OutputLocation(model).redacted!r} has no transformer/config.json")
        return family_from_config(json.loads(data))
    path = TINY_TRAINED_DIR if model == TINY_TRAINED else Path(model)
    cfg_path = path / "transformer" / "config.json"
    if cfg_path.is_file():
        return family_from_config(json.loads(cfg_path.read_text()))
    for key in ("14B", "1.3B"):
        if key in model and model.startswith(HUB_PREFIX):
            return FAMILIES[key]
    raise ValueError(f"cannot tell the model family of {model!r}: not 'tiny', a diffusers folder, or a Skywork hub id")


# ---------------------------------------------------------------------------------------------------------- tiny


def tiny_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in _TINY_CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_configs() -> dict[str, dict[str, Any]]:
    fam = FAMILIES["tiny"]
    return {
        "transformer": dict(
            patch_size=(1, 2, 2), num_attention_heads=fam.heads, attention_head_dim=fam.head_dim, in_channels=16,
            out_channels=16, text_dim=32, freq_dim=256, ffn_dim=fam.ffn_dim, num_layers=fam.layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32, inject_sample_info=True,
        ),
        "vae": dict(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        ),
        "text_encoder": dict(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0,
        ),
    }


def build_tiny() -> Components:
    """The built-in tiny model: fixed seed, so identical weights everywhere."""
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = tiny_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        text_encoder = UMT5EncoderModel(UMT5Config(**cfg["text_encoder"]))
        torch.manual_seed(TINY_SEED + 1)
        transformer = SkyReelsV2Transformer3DModel(**cfg["transformer"])
        torch.manual_seed(TINY_SEED + 2)
        vae = AutoencoderKLWan(**cfg["vae"])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    for m in (text_encoder, transformer, vae):
        m.eval().requires_grad_(False)
    return Components(tiny_tokenizer(), text_encoder, transformer, vae, scheduler, FAMILIES["tiny"], TINY)


# ------------------------------------------------------------------------------------------------------- folders


def _is_hub_id(model: str) -> bool:
    return "/" in model and not model.startswith((".", "/", "~")) and model.count("/") == 1 and "://" not in model


def local_model_folder(model: str) -> str | None:
    """The folder a ``model:`` names on this machine's disk, or None when every node finds the model by itself
    (the built-in models, a hub id, an object-store URI)."""
    if model in (TINY, TINY_TRAINED) or "://" in model:
        return None
    path = Path(model).expanduser()
    if _is_hub_id(model) and not path.exists():
        return None
    return str(path.resolve())


def fetch_model_uri(uri: str) -> Path:
    """Copy a diffusers folder from an object store (``s3://bucket/models/x``) to this node's cache, once."""
    import hashlib
    import os

    import pyarrow.fs as pafs

    from skyray.output.location import redact

    cache = Path(os.environ.get("SKYRAY_MODEL_CACHE", Path.home() / ".cache" / "skyray" / "models"))
    dest = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / ".complete").is_file():
        return dest
    fs, root = pafs.FileSystem.from_uri(uri)
    root = root.rstrip("/")
    files = [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"model {redact(uri)!r}: no files at that URI")
    for f in files:
        out = dest / f.path[len(root) + 1 :]
        out.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f.path) as src, open(out, "wb") as w:
            for chunk in iter(lambda: src.read(8 << 20), b""):
                w.write(chunk)
    (dest / ".complete").write_text(redact(uri))
    return dest


def resolve_model_path(model: str) -> Path:
    """A local diffusers folder for ``model``: the folder itself, a hub snapshot or an object-store copy, fetched
    once per node."""
    if model == TINY_TRAINED:
        return TINY_TRAINED_DIR
    if "://" in model:
        return fetch_model_uri(model)
    path = Path(model).expanduser()
    if path.exists():
        return path
    if _is_hub_id(model):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model))
        except Exception as exc:  # offline, gated or unknown repo: say which and why
            raise FileNotFoundError(
                f"model {model!r} is not a local folder and could not be fetched from the hub ({exc.__class__.__name__}: "
                f"{exc}). Download it first (huggingface-cli download {model} --local-dir DIR) and set model: DIR"
            ) from exc
    raise FileNotFoundError(f"model folder {model!r} does not exist (expected 'tiny', a diffusers folder or a hub id)")


def check_model_folder(path: Path) -> None:
    missing = [p for p in REQUIRED_PARTS if not (path / p).is_dir()]
    if not (path / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise FileNotFoundError(
            f"model folder {str(path)!r} is incomplete: missing {', '.join(missing)} "
            f"(a SkyReels-V2 DF diffusers folder has {', '.join(('model_index.json',) + REQUIRED_PARTS)})"
        )


def load_folder(path: Path, device: torch.device, offload: bool = False) -> Components:
    """A diffusers folder's components, each tensor read straight into its final dtype and device
    (``skyray.loading``): the load holds one tensor beyond the weights, on the host and on the GPU."""
    from skyray import loading

    comps = skeletons(str(path))
    dt, where = dtypes_for(device), placement(device, offload)
    for part in WEIGHT_PARTS:
        module = getattr(comps, part)
        entries = loading.checkpoint_entries(path / part)
        loading.assign(module, loading.read_tensors(entries), dt[part], where[part], keep_fp32(module, dt[part]))
    comps.device = torch.device(device)
    return comps


def load(model: str, device: torch.device | str | None = None, offload: bool = False) -> Components:
    """Load ``model`` ('tiny', a diffusers folder or a hub id) for ``device`` (default: cuda if present), in that
    device's dtypes; ``offload`` leaves the text encoder and transformer on the CPU (see ``Components.to``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model == TINY:
        comps = build_tiny()
        dt = dtypes_for(device)
        if dt["transformer"] != torch.float32:
            # Cast only what bf16 suits; rope, norms, time embedding and modulation tables stay fp32 as in
            # diffusers' _keep_in_fp32_modules.
            keep = tuple(comps.transformer._keep_in_fp32_modules)
            for name, module in comps.transformer.named_modules():
                if name and not any(k in name.split(".") for k in keep) and not list(module.children()):
                    module.to(dt["transformer"])
            comps.text_encoder.to(dt["text_encoder"])
        return comps.to(device, offload)
    return load_folder(resolve_model_path(model), device, offload)


WEIGHT_PARTS = ("text_encoder", "transformer", "vae")


def placement(device: torch.device | str, offload: bool = False) -> dict[str, torch.device]:
    """Where each module lives between stages.  The VAE on ``device``; the transformer too unless offloading;
    the text encoder on the CPU whenever ``device`` is a GPU (UMT5-XXL is 11 GB of bf16 the sampler never reads:
    it visits the GPU only to encode a window's new prompts, see ``executors.worker``) or when offloading."""
    device = torch.device(device)
    cpu = torch.device("cpu")
    return {
        "text_encoder": cpu if offload or device.type == "cuda" else device,
        "transformer": cpu if offload else device,
        "vae": device,
    }


def keep_fp32(module: torch.nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Module names kept in fp32 when ``module`` is loaded in ``dtype``, as ``from_pretrained`` would: diffusers
    keeps its ``_keep_in_fp32_modules`` for any lower precision, transformers only for fp16."""
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    if dtype == torch.float32:
        return ()
    if type(module).__module__.startswith("transformers.") and dtype != torch.float16:
        return ()
    return keep


def skeletons(model: str) -> Components:
    """The model's modules with their parameters on the meta device (no memory: ``loading.skeleton``), with
    the real tokenizer and scheduler; ``loading.assign`` (or ``executors.distributed.load_broadcast``) fills them."""
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from skyray import loading

    if model == TINY:
        cfg = tiny_configs()
        tokenizer = tiny_tokenizer()
        te_cfg = UMT5Config(**cfg["text_encoder"])
        tr_cfg, vae_cfg = cfg["transformer"], cfg["vae"]
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    else:
        path = resolve_model_path(model)
        check_model_folder(path)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        te_cfg = UMT5Config.from_pretrained(path / "text_encoder")
        tr_cfg = SkyReelsV2Transformer3DModel.load_config(path / "transformer")
        vae_cfg = AutoencoderKLWan.load_config(path / "vae")
        scheduler = UniPCMultistepScheduler.from_config(
            UniPCMultistepScheduler.load_config(path / "scheduler"),
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
        )
    text_encoder = loading.skeleton(lambda: UMT5EncoderModel(te_cfg))
    transformer = loading.skeleton(lambda: SkyReelsV2Transformer3DModel.from_config(tr_cfg))
    vae = loading.skeleton(lambda: AutoencoderKLWan.from_config(vae_cfg))
    fam = family_from_config(dict(transformer.config))
    return Components(tokenizer, text_encoder, transformer, vae, scheduler, fam, model)


def weight_stream(model: str, part: str):
    """(name, CPU tensor) of one component's checkpoint, one at a time (the built-in tiny model: its state)."""
    from skyray import loading

    if model == TINY:
        module = getattr(build_tiny(), part)
        return iter(module.state_dict().items())
    return loading.read_tensors(loading.checkpoint_entries(resolve_model_path(model) / part))


def load_vae(model: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Only the VAE (for decoder/writer processes that never run the transformer)."""
    if model == TINY:
        return build_tiny().vae.to(device)
    from diffusers import AutoencoderKLWan

    path = resolve_model_path(model)
    check_model_folder(path)
    return AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=torch.float32).eval().requires_grad_(False).to(device)


def export(components: Components, out_dir: str | Path) -> Path:
    """Write ``components`` as a diffusers folder that ``SkyReelsV2DiffusionForcingPipeline`` loads."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    out = Path(out_dir)
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=components.tokenizer,
        text_encoder=components.text_encoder,
        transformer=components.transformer,
        vae=components.vae,
        scheduler=copy.deepcopy(components.scheduler),
    )
    pipe.save_pretrained(out)
    return out
