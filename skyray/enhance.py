"""Prompt enhancer: an instruction-tuned LLM rewrites short shot prompts into detailed video captions.

SkyReels-V2 was trained on long structured captions (shot type, subject, motion, scene, light, camera), and its
reference scripts offer a rewrite by Qwen2.5-32B-Instruct for text-to-video (never for image-to-video, where the
picture already fixes the scene).  Here that is an optional storyboard stage:

    storyboard (validated) -> enhance -> plan -> executor

It runs after validation and before the video model loads, then releases the LLM (in-process: freed and the CUDA
cache emptied; on Ray: its own actor, killed).  Which prompts it rewrites: those of shots with ``enhance`` on
(``defaults.enhance`` or the shot's own); a shot opening from a first-frame ``image`` only when the shot itself says
``enhance: true``.  A prompt list (prompt travel) is rewritten element by element.

Every rewrite is cached on disk by a hash of everything that decides it (model and its files, instruction,
prompt, settings), so a rerun or a second render of the same film never calls the LLM.  Each prompt is generated
on its own with the generator re-seeded: its text depends on nothing else in the film, which is what makes a
per-prompt cache sound.

The enhanced storyboard carries the rewritten prompts in ``prompt``, what was written in ``original_prompt``, and
``enhance: false``; ``skyray enhance`` writes it as a file that loads like any other storyboard.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import logging
import os
import re
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyray.storyboard import Storyboard, load_storyboard, parse_storyboard

if TYPE_CHECKING:
    from skyray.plan import FilmPlan

log = logging.getLogger("skyray.enhance")

# What SkyReels-V2's own rewriter loads.  Qwen/Qwen2.5-7B-Instruct is a lighter choice (about 16 GB in bf16).
DEFAULT_MODEL = "Qwen/Qwen2.5-32B-Instruct"
# The video model's text encoder reads 512 tokens; a longer caption is cut off there anyway.
DEFAULT_MAX_NEW_TOKENS = 512
CACHE_ENV = "SKYRAY_CACHE_DIR"
ACTOR_PREFIX = "skyray-enhancer-"  # Ray actor names, so the dashboard shows what holds a GPU

SYSTEM_PROMPT = """\
You turn a short prompt for a text-to-video model into one detailed caption of a single continuous shot.
Write one paragraph of plain English, about 60 to 120 words, covering in this order:
1. the kind of shot: wide, full, medium, close-up or extreme close-up;
2. the main subject and what it does, with concrete detail: colours, materials, textures, clothing, expressions;
3. what moves or changes during the shot: what starts, slows, turns, rises or falls;
4. the setting: foreground and background, and where things stand relative to each other;
5. light and mood: time of day, light sources, weather, atmosphere;
6. the camera: static, handheld, pan, tilt, dolly or zoom. If the subject hardly moves, move the camera so the
clip stays alive.
Keep every fact of the short prompt and add nothing that contradicts it.

Example.
Short prompt: a cat on a windowsill
Caption: Close-up of a ginger tabby cat curled on a white wooden windowsill, its tail flicking slowly while its ears \
turn toward a sound outside. Raindrops run down the glass behind it and blur a grey street of parked cars. Soft \
overcast daylight falls across its fur and the chipped paint of the sill. The camera pushes in slowly toward the \
cat's half-closed amber eyes.

Reply with the caption only: no title, no list, no quotation marks, no preamble."""
# The instruction is part of every cache key: editing it invalidates earlier rewrites.
SYSTEM_PROMPT_VERSION = hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest()[:16]

_FULL_HASH_BYTES = 32 << 20  # configs, tokenizers and templates are hashed whole; weight shards by head and tail
_EDGE_BYTES = 1 << 20


class EnhancerModelNotFound(FileNotFoundError):
    """The enhancer LLM is neither a local folder nor on (or reachable from) the Hugging Face hub."""


@dataclass(frozen=True)
class Enhancer:
    """Settings of the enhancer stage (the storyboard's ``enhancer:`` block, with defaults filled in)."""

    model: str = DEFAULT_MODEL
    """A hub id of an instruction-tuned causal LM with a chat template, or a local folder holding one."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    """0: greedy decoding; above 0: sampling at this temperature (reproducible through ``seed``)."""
    seed: int = 0
    """Seeds the generator before every prompt (only matters when sampling)."""

    @classmethod
    def from_storyboard(cls, storyboard: Storyboard) -> Enhancer:
        block = storyboard.enhancer
        if block is None:
            return cls()
        values = {k: v for k, v in block.model_dump().items() if v is not None}
        return cls(**values)

    def settings(self) -> dict[str, Any]:
        """What decides a rewrite besides the model and the prompt (the seed only when sampling)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": float(self.temperature),
            "seed": self.seed if self.temperature > 0 else None,
        }


@dataclass(frozen=True)
class EnhanceResult:
    storyboard: Storyboard
    """A resolved copy with the rewritten prompts, ``original_prompt`` set on every rewritten shot, enhance off."""
    prompts: dict[str, str]
    """Original -> rewritten, for every prompt the stage handled (a prompt used twice is rewritten once)."""
    shots: tuple[str, ...]
    """Ids of the shots whose prompts were rewritten."""
    generated: int
    """Prompts the LLM wrote in this run (0 when everything came from the cache)."""
    cached: int
    model: str


# ---------------------------------------------------------------------------------------------- which prompts


def wants_enhance(storyboard: Storyboard, index: int, all_shots: bool = False) -> bool:
    """Whether shot ``index``'s prompts are rewritten.  A shot with a first-frame image only when it asks itself:
    the picture already decides the scene, and a caption that disagrees with it fights the first frame."""
    shot = storyboard.shots[index]
    if shot.image is not None:
        return shot.enhance is True
    if shot.enhance is not None:
        return shot.enhance
    return all_shots or storyboard.defaults.enhance


def needs_enhancement(storyboard: Storyboard, all_shots: bool = False) -> bool:
    return any(wants_enhance(storyboard, i, all_shots) for i in range(len(storyboard.shots)))


def prompts_to_enhance(storyboard: Storyboard, all_shots: bool = False) -> list[str]:
    """The distinct prompts the stage rewrites, in storyboard order."""
    out: dict[str, None] = {}
    for i, shot in enumerate(storyboard.shots):
        if wants_enhance(storyboard, i, all_shots):
            out.update(dict.fromkeys(shot.prompt))
    return list(out)


# ------------------------------------------------------------------------------------------------------ cache


def cache_dir() -> Path:
    """``$SKYRAY_CACHE_DIR/enhance`` (default ``~/.cache/skyray/enhance``)."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "skyray") / "enhance"


def _is_hub_id(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith((".", "/", "~")) and not Path(model).expanduser().exists()


def local_model_folder(model: str) -> Path | None:
    """``model`` as a folder on this machine: itself, or its snapshot in the Hugging Face cache (no download)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if _is_hub_id(model):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, local_files_only=True))
        except Exception:  # not in the cache (or no hub client): the caller downloads, or reports it missing
            return None
    return None


def model_fingerprint(model: str) -> str | None:
    """A digest of the model's files as found on this machine (None when it is not here): a changed checkpoint,
    tokenizer or chat template makes a different cache key."""
    folder = local_model_folder(model)
    if folder is None:
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):  # download metadata, not the model
            continue
        size = path.stat().st_size
        h.update(f"{rel.as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= _FULL_HASH_BYTES:
                h.update(f.read())
            else:
                h.update(f.read(_EDGE_BYTES))
                f.seek(size - _EDGE_BYTES)
                h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()


def cache_key(config: Enhancer, fingerprint: str | None, prompt: str) -> str:
    record = {
        "model": config.model,
        "fingerprint": fingerprint,
        "instruction": SYSTEM_PROMPT_VERSION,
        "prompt": prompt,
        "settings": config.settings(),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class PromptCache:
    """One JSON file per rewrite, named by its key; written atomically so concurrent renders can share it."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            record = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        text = record.get("enhanced") if isinstance(record, dict) else None
        return text if isinstance(text, str) and text else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- the LLM


def _missing(model: str, why: str) -> EnhancerModelNotFound:
    if _is_hub_id(model):
        fix = (
            f"download it first (hf download {model} --local-dir DIR) and set 'enhancer: {{model: DIR}}' in the "
            "storyboard (a relative DIR starts at the storyboard's folder)"
        )
    else:
        fix = (
            "point 'enhancer: {model: ...}' at a folder holding an instruction-tuned causal LM (config.json, "
            f"weights, a tokenizer with a chat template), or at a hub id such as {DEFAULT_MODEL}"
        )
    return EnhancerModelNotFound(
        f"prompt enhancer model {model!r} not found: {why}. To fix: {fix}; or turn enhancement off ('enhance: false')"
    )


def _resolve_folder(model: str) -> Path:
    """A local folder for ``model``, downloading a hub id once (like the video model)."""
    folder = local_model_folder(model)
    if folder is not None:
        return folder
    if not _is_hub_id(model):
        raise _missing(model, "no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model))
    except Exception as exc:  # offline, gated or unknown repo: say which and why
        why = f"no such folder, not in the Hugging Face cache and not downloadable ({exc.__class__.__name__})"
        raise _missing(model, why) from None


def clean_caption(text: str) -> str:
    """The caption alone: no reasoning block, no surrounding quotes or label, one line."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    text = re.sub(r"^\s*(caption|long prompt|enhanced prompt)\s*:\s*", "", text.strip(), flags=re.IGNORECASE)
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


class EnhancerModel:
    """The loaded LLM: ``rewrite`` one prompt at a time; ``close`` frees its memory before the video model loads."""

    loads = 0  # models loaded by this process (the cache tests check that a rerun loads none)

    def __init__(self, config: Enhancer, tokenizer: Any, model: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model = model

    @classmethod
    def load(cls, config: Enhancer, device: str | None = None) -> EnhancerModel:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = _resolve_folder(config.model)
        if not (folder / "config.json").is_file():
            raise _missing(config.model, f"{folder} has no config.json (not a transformers model folder)")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"prompt enhancer model {config.model!r} has no chat template: use an instruction-tuned (chat) model "
                f"such as {DEFAULT_MODEL}"
            )
        # bf16 (the checkpoint's own dtype) on GPU; fp32 on CPU, where half-precision matmuls are slow.
        dtype = "auto" if dev.type == "cuda" else torch.float32
        # Straight onto the GPU: a 32B checkpoint is 65 GB, not worth staging in host memory.
        device_map = str(dev) if dev.type == "cuda" else None
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map)
        if device_map is None:
            model.to(dev)
        model.eval()
        cls.loads += 1
        log.info("loaded prompt enhancer %s on %s", config.model, dev)
        return cls(config, tokenizer, model)

    @property
    def device(self) -> Any:
        return self.model.device

    def _chat(self, prompt: str) -> str:
        from jinja2 import TemplateError

        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"Short prompt: {prompt}"}]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:  # some templates (Gemma's) refuse a system turn: fold it into the user turn
            merged = [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\nShort prompt: {prompt}"}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def _generation_config(self) -> Any:
        gen = copy.deepcopy(self.model.generation_config)
        gen.max_new_tokens = self.config.max_new_tokens
        if self.config.temperature > 0:
            gen.do_sample, gen.temperature = True, float(self.config.temperature)
        else:
            # Neutral values, not None: generate() refills None from the checkpoint's sampling settings and warns.
            gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, 1.0, 1.0, 50
        if gen.pad_token_id is None:
            gen.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else gen.eos_token_id
        return gen

    def rewrite(self, prompt: str) -> str:
        """The detailed caption for ``prompt`` (the prompt itself, with a warning, if the model writes nothing)."""
        import torch

        text = self._chat(prompt.strip())
        # The template already holds any BOS the model wants; the tokenizer must not add a second one.
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # One prompt per call, generator re-seeded: a batch would pad, and padding changes the numerics, so a
        # prompt's caption would depend on its neighbours and the cache could not hold it on its own.
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(self.config.seed)
            out = self.model.generate(**inputs, generation_config=self._generation_config())
        caption = clean_caption(self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        if not caption:
            log.warning("the prompt enhancer wrote nothing for %r; keeping it as written", prompt)
            return prompt
        return caption

    def close(self) -> None:
        import torch

        self.model = None  # the last reference to the weights; the collection below frees them
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def rewrite_prompts(config: Enhancer, prompts: list[str], device: str | None = None) -> list[str]:
    """Load the LLM, rewrite ``prompts`` in order, free it."""
    llm = EnhancerModel.load(config, device)
    try:
        return [llm.rewrite(p) for p in prompts]
    finally:
        llm.close()


class _EnhancerActor:
    """Ray actor body: the LLM on its own GPU; the driver kills the actor when done, which frees everything."""

    def ready(self) -> bool:
        return True

    def rewrite(self, config: Enhancer, prompts: list[str]) -> list[str]:
        return rewrite_prompts(config, prompts)


ENHANCER_START_S = 120.0  # how long the enhancer actor may wait to be placed before the render stops


def _rewrite_on_ray(config: Enhancer, prompts: list[str], address: str | None,
                    start_timeout_s: float = ENHANCER_START_S) -> list[str]:
    import ray
    from ray.exceptions import GetTimeoutError, RayTaskError

    from skyray.executors.ray import ensure_ray

    ensure_ray(address)  # the same Ray the render that follows uses
    # Ask for what the cluster can give now: a free GPU, else the CPU (slower, but render groups that hold every
    # GPU must not make the enhancer wait for ever).
    gpus = 1 if ray.available_resources().get("GPU", 0) >= 1 else 0
    opts: dict[str, Any] = {}
    if Path(config.model).expanduser().is_dir():
        # A folder on this (the driver's) machine: other nodes may not have it, so the enhancer runs here.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        if not any(n.get("Alive") and n["NodeID"] == node and n["Resources"].get("GPU", 0) >= 1 for n in ray.nodes()):
            gpus = 0
    actor = ray.remote(_EnhancerActor).options(
        name=f"{ACTOR_PREFIX}{uuid.uuid4().hex[:8]}", num_cpus=1 if gpus else 0, num_gpus=gpus, max_restarts=0,
        **opts,
    ).remote()
    try:
        try:
            ray.get(actor.ready.remote(), timeout=start_timeout_s)
        except GetTimeoutError:
            raise RuntimeError(
                f"the prompt enhancer could not be placed within {start_timeout_s:.0f} s (it asks for "
                f"{gpus} GPU(s)); the cluster has {ray.available_resources()} free") from None
        return ray.get(actor.rewrite.remote(config, prompts))
    except RayTaskError as err:
        if isinstance(err.cause, (EnhancerModelNotFound, ValueError)):
            raise err.cause from None
        raise
    finally:
        ray.kill(actor, no_restart=True)


# ------------------------------------------------------------------------------------------------------ stage


def run_enhancer(
    storyboard: Storyboard,
    use_ray: bool = False,
    *,
    config: Enhancer | None = None,
    all_shots: bool = False,
    address: str | None = None,
    cache: PromptCache | None = None,
) -> EnhanceResult:
    """Rewrite the prompts of the shots that ask for it (``all_shots``: every shot without a first-frame image).

    Cached rewrites are reused; the rest are generated in one LLM session, in-process or (``use_ray``) on an
    actor of their own that is killed afterwards.  Returns a resolved copy of ``storyboard``."""
    if not storyboard.resolved:
        raise ValueError("run_enhancer needs a resolved storyboard: build it with load_storyboard or parse_storyboard")
    config = config or Enhancer.from_storyboard(storyboard)
    cache = cache or PromptCache()
    prompts = prompts_to_enhance(storyboard, all_shots)
    fingerprint = model_fingerprint(config.model) if prompts else None
    done: dict[str, str] = {}
    for p in prompts:
        hit = cache.get(cache_key(config, fingerprint, p))
        if hit is not None:
            done[p] = hit
    todo = [p for p in prompts if p not in done]
    if todo:
        log.info("rewriting %d prompt(s) with %s (%d from the cache)", len(todo), config.model, len(done))
        texts = _rewrite_on_ray(config, todo, address) if use_ray else rewrite_prompts(config, todo)
        # A hub model downloaded just now has a fingerprint it lacked before: key the new entries the way the
        # next run will look them up.
        fingerprint = model_fingerprint(config.model)
        for p, text in zip(todo, texts):
            done[p] = text
            cache.put(
                cache_key(config, fingerprint, p),
                {"model": config.model, "fingerprint": fingerprint, "instruction": SYSTEM_PROMPT_VERSION,
                 "settings": config.settings(), "prompt": p, "enhanced": text},
            )
    enhanced, shots = apply_prompts(storyboard, done, all_shots)
    return EnhanceResult(enhanced, done, shots, len(todo), len(prompts) - len(todo), config.model)


def apply_prompts(
    storyboard: Storyboard, rewrites: dict[str, str], all_shots: bool = False
) -> tuple[Storyboard, tuple[str, ...]]:
    """A copy with every enhanced shot's prompts replaced, the old ones kept in ``original_prompt``, and
    enhancement switched off everywhere (so it is not enhanced twice)."""
    sb = storyboard.model_copy(deep=True)
    shots = []
    for i, shot in enumerate(sb.shots):
        if wants_enhance(storyboard, i, all_shots):
            if shot.original_prompt is None:  # enhanced before: what the user wrote stays the original
                shot.original_prompt = list(shot.prompt)
            shot.prompt = [rewrites[p] for p in shot.prompt]
            shot.enhance = False  # explicit, so neither defaults nor `skyray enhance --all` rewrites it again
            shots.append(shot.id)
        elif shot.enhance is not None:
            shot.enhance = False
    sb.defaults.enhance = False
    return sb, tuple(shots)


def enhance_before_render(
    storyboard: Storyboard, plan: FilmPlan, use_ray: bool, address: str | None = None, quiet: bool = False
) -> tuple[Storyboard, FilmPlan]:
    """The render's enhancer stage: a no-op unless a shot asks for it; else the enhanced storyboard, re-planned."""
    if not needs_enhancement(storyboard):
        return storyboard, plan
    from skyray.plan import compile_plan

    result = run_enhancer(storyboard, use_ray, address=address)
    if not quiet:
        print(_summary(result), file=sys.stderr)
    return result.storyboard, compile_plan(result.storyboard)


def _summary(result: EnhanceResult) -> str:
    return (
        f"prompt enhancer {result.model}: {len(result.prompts)} prompt(s) in {len(result.shots)} shot(s), "
        f"{result.generated} written, {result.cached} from the cache"
    )


# ------------------------------------------------------------------------------------------- enhanced file


def enhance_storyboard(
    source: str | Path,
    out_path: str | Path | None = None,
    *,
    base_dir: str | Path | None = None,
    use_ray: bool = False,
    all_shots: bool = False,
    config: Enhancer | None = None,
    address: str | None = None,
    cache: PromptCache | None = None,
) -> EnhanceResult:
    """Enhance a storyboard file (a path) or text (YAML/JSON, relative paths against ``base_dir``), and write the
    enhanced copy to ``out_path`` if given.  The copy keeps the file's own fields, with the rewritten prompts,
    ``original_prompt`` beside them, ``enhance: false``, and relative paths re-pointed from its folder."""
    if isinstance(source, Path) or "\n" not in source:
        path = Path(source)
        text, base, name = path.read_text(encoding="utf-8"), path.parent, str(path)
        storyboard = load_storyboard(path)
    else:
        text, base, name = source, Path(base_dir or "."), "<string>"
        storyboard = parse_storyboard(text, base, name)
    result = run_enhancer(storyboard, use_ray, config=config, all_shots=all_shots, address=address, cache=cache)
    if out_path is not None:
        write_enhanced(text, base, result, out_path, source_name=name)
    return result


def write_enhanced(
    text: str, base_dir: str | Path, result: EnhanceResult, out_path: str | Path, source_name: str = "<string>"
) -> Path:
    """Write the storyboard ``text`` with ``result``'s prompts as a file that ``load_storyboard`` reads back."""
    import yaml

    out = Path(out_path)
    base, folder = Path(base_dir).expanduser().resolve(), out.parent.expanduser().resolve()
    raw = yaml.safe_load(text)
    for k, (shot, new) in enumerate(zip(raw["shots"], result.storyboard.shots)):
        if new.id in result.shots:
            shot = raw["shots"][k] = _rewritten(shot, new.prompt, new.original_prompt)
        elif "enhance" in shot:
            shot["enhance"] = False
        for key in ("image", "end_image", "video"):
            if isinstance(shot.get(key), str):
                shot[key] = _repoint(shot[key], base, folder)
    if not isinstance(raw.get("defaults"), dict):
        raw["defaults"] = {}
    raw["defaults"]["enhance"] = False
    if isinstance(raw.get("model"), str):
        raw["model"] = _repoint(raw["model"], base, folder)
    if isinstance(raw.get("enhancer"), dict) and isinstance(raw["enhancer"].get("model"), str):
        raw["enhancer"]["model"] = _repoint(raw["enhancer"]["model"], base, folder)
    folder.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        body = json.dumps(raw, indent=2, ensure_ascii=False) + "\n"
    else:
        header = (
            f"# Enhanced by `skyray enhance` from {source_name} with {result.model}.\n"
            "# 'prompt' holds the rewritten prompts, 'original_prompt' what was written; enhance is off.\n"
        )
        body = header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=120)
    out.write_text(body, encoding="utf-8")
    load_storyboard(out)  # the copy must load as it stands; a failure here is a bug in this writer
    return out


def _rewritten(shot: dict[str, Any], prompt: list[str], original: list[str]) -> dict[str, Any]:
    """The shot's mapping with the new prompt, the original right after it (written as a string if it was one),
    and ``enhance: false``."""
    one = isinstance(shot.get("prompt"), str) and len(prompt) == len(original) == 1
    out: dict[str, Any] = {}
    for key, value in shot.items():
        if key == "prompt":
            out["prompt"], out["original_prompt"] = (prompt[0], original[0]) if one else (prompt, original)
        elif key != "original_prompt":
            out[key] = value
    out["enhance"] = False
    return out


def _repoint(value: str, base: Path, folder: Path) -> str:
    """A path written relative to the source's folder, rewritten relative to the copy's (other values as is)."""
    path = Path(value).expanduser()
    if path.is_absolute() or base == folder:
        return value
    target = base / path
    if not target.exists():  # a hub id, 'tiny', or something validation already accepted as not a path
        return value
    return os.path.relpath(target.resolve(), folder)


# --------------------------------------------------------------------------------------------------------- CLI


def add_enhance_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    e = sub.add_parser("enhance", help="rewrite short prompts into detailed captions with an LLM")
    e.add_argument("storyboard")
    e.add_argument("-o", "--out", help="output storyboard (default: <name>.enhanced.yaml beside the input)")
    e.add_argument("--all", action="store_true", dest="all_shots",
                   help="rewrite every shot, not only those with enhance on (image shots still only when they ask)")
    e.add_argument("--model", help=f"enhancer model, overriding the storyboard's (default {DEFAULT_MODEL})")
    e.add_argument("--ray", action="store_true", help="run the LLM on a Ray actor (a GPU when the cluster has one)")
    e.add_argument("--address", help="Ray address with --ray (default: start a local Ray)")
    e.add_argument("--quiet", "-q", action="store_true")
    e.set_defaults(func=cmd_enhance)
    return e


def cmd_enhance(args: argparse.Namespace) -> int:
    src = Path(args.storyboard)
    out = Path(args.out) if args.out else src.with_name(f"{src.stem}.enhanced{src.suffix or '.yaml'}")
    storyboard = load_storyboard(src)
    if not needs_enhancement(storyboard, args.all_shots):
        print(
            f"error: no shot in {src} asks for enhancement: set 'enhance: true' in defaults or on a shot, or pass "
            "--all (shots with a first-frame image are enhanced only with 'enhance: true' on the shot)",
            file=sys.stderr,
        )
        return 2
    config = Enhancer.from_storyboard(storyboard)
    if args.model:
        config = replace(config, model=args.model)
    result = run_enhancer(storyboard, args.ray, config=config, all_shots=args.all_shots, address=args.address)
    write_enhanced(src.read_text(encoding="utf-8"), src.parent, result, out, source_name=str(src))
    if not args.quiet:
        for original, text in result.prompts.items():
            print(f"- {original}\n  -> {text}")
        print(_summary(result))
        print(f"wrote {out}")
    return 0
