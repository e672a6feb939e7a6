"""The first thing to run on a GPU: the real-size paths of skyray that a CPU cannot exercise, in one table.

    python bench/gpu_check.py                 # one H100/H200: about 3-5 minutes, nothing downloaded
    python bench/gpu_check.py --cpu-smoke     # the same steps scaled down on the CPU (CI: tests/test_gpu_check.py)
    python bench/gpu_check.py --json out.json # also write the rows

On a machine without our stack (no diffusers, pydantic, Ray), prepare the wheels once where there is a network
(``bench/prepare_gpu_wheels.sh``), carry ``.gpu_wheels`` along and install them there first (the script says how).
This file imports only torch, diffusers' transformer and VAE classes, transformers (for the tiny text encoder) and
skyray's engine, loader and memory model: no Ray, Serve or pydantic.

Rows (each prints what it measured and, where there is one, the bound it is held to):

1. **load <model>**: the 1.3B and 14B transformers built from their configs as meta skeletons and filled tensor by
   tensor with random bf16 weights on the GPU (``skyray.loading``); peak GPU memory of the build against the
   weight bytes (bound 1.15x, issue 14 item 1).
2. **step <model> 540p**: one guided step of a 540p window (25 latents, 51,000 tokens; CFG as one batch-2
   forward), timed after a warm-up step; MFU = 2 x ``schedule.transformer_flops`` / time / peak; peak memory of
   the step against ``skyray.memory``'s prediction of the sample phase (weights + activations + text K/V).
3. **causal 1.3B 540p**: one batch-1 forward with block-causal attention (blocks of 5 latents), timed, its peak
   against the prediction (with the block workspace).
4. **tiny cuda-bf16 vs cpu-fp32**: a two-window shot of the tiny model sampled on the GPU in bf16 and on the CPU
   in fp32 from the same noise and text embeddings; relative L2 error of the final latents.  Bound 3e-2: bf16
   keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); the weights, every activation and every step's model
   input are rounded to it, and the sampler integrates the velocity over the steps, so a few times the unit
   roundoff is expected (the CPU's own bf16 run, ``--cpu-smoke``, measures ~1e-2) and an error beyond ~8x it
   means a real difference (a dtype lost, a kernel wrong), not rounding.

Exit status 1 when a bound fails.  Measured results go into bench/README.md (section gpu_check).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from skyray import loading, memory  # noqa: E402
from skyray.engine import schedule  # noqa: E402
from skyray.models import FAMILIES  # noqa: E402

LOAD_BOUND = 1.15
TINY_BOUND = 3e-2
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


@dataclass
class Row:
    check: str
    seconds: float | None = None
    mfu: float | None = None
    measured: float | None = None  # bytes (memory rows) or a ratio / error
    predicted: float | None = None
    bound: str = ""
    ok: bool | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------- measuring


class Peak:
    """Peak bytes allocated by torch inside the ``with`` block, above what was allocated when it began: the CUDA
    allocator's statistics on a GPU, the profiler's allocation events on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
            return
        self._prof.__exit__(*exc)
        events = sorted(
            (e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"),
            key=lambda e: e.start_ns(),
        )
        held = 0
        for e in events:
            held += e.nbytes()
            self.bytes = max(self.bytes, held)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# ------------------------------------------------------------------------------------------------------- models


def transformer_config(spec: memory.ModelSpec, layers: int) -> dict:
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=spec.heads, attention_head_dim=spec.head_dim, in_channels=16,
        out_channels=16, text_dim=spec.text_dim, freq_dim=spec.freq_dim, ffn_dim=spec.ffn_dim, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, inject_sample_info=True,
    )


def random_transformer(spec: memory.ModelSpec, layers: int, device: torch.device, dtype: torch.dtype):
    """A skeleton filled with random weights made on ``device`` in their final dtypes (as a checkpoint load
    would fill it, tensor by tensor, without a host copy)."""
    from diffusers import SkyReelsV2Transformer3DModel

    model = loading.skeleton(lambda: SkyReelsV2Transformer3DModel(**transformer_config(spec, layers)))
    keep = tuple(model._keep_in_fp32_modules) if dtype != torch.float32 else ()
    gen = torch.Generator(device).manual_seed(0)

    def stream():
        for name, p in model.named_parameters():
            t = torch.empty(p.shape, dtype=loading.final_dtype(name, dtype, keep), device=device)
            yield name, t.normal_(0.0, 0.02, generator=gen) if name.endswith("weight") else t.zero_()

    return loading.assign(model, stream(), dtype, device, keep)


# -------------------------------------------------------------------------------------------------------- checks


def check_load(name: str, spec: memory.ModelSpec, layers: int, device, dtype) -> tuple[Row, object]:
    with Peak(device) as peak:
        t0 = time.perf_counter()
        model = random_transformer(spec, layers, device, dtype)
        _sync(device)
        seconds = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ratio = peak.bytes / weights
    row = Row(f"load {name}", seconds, measured=ratio, bound=f"<= {LOAD_BOUND}x weights", ok=ratio <= LOAD_BOUND,
              notes=[f"weights {memory.human(weights)}", f"peak {memory.human(peak.bytes)}"])
    return row, model


def _window_inputs(spec, latents: int, hw: tuple[int, int], batch: int, device, dtype):
    gen = torch.Generator("cpu").manual_seed(1)
    x = torch.randn(batch, 16, latents, *hw, generator=gen).to(device, dtype)
    t = torch.full((batch, latents), 700, dtype=torch.long, device=device)
    text = torch.randn(1, 512, spec.text_dim, generator=gen).to(device, dtype)
    return x, t, text


def check_step(name, spec, model, latents, hw, device, dtype, peak_tflops, layers) -> Row:
    """One guided step (CFG batched: one batch-2 forward) over a window, as the sampler runs it."""
    from skyray.engine.sampler import NoisePredictor, SamplerConfig
    from skyray.engine.text import TextEmbeds

    x, t, text = _window_inputs(spec, latents, hw, 1, device, dtype)
    predict = NoisePredictor(model, SamplerConfig(guidance_scale=6.0, batched_cfg=True))
    embeds = TextEmbeds(text, text.clone())
    with torch.no_grad():
        predict(x, t, embeds)  # warm-up: kernels chosen, rope and text K/V of the window computed
        _sync(device)
        with Peak(device) as peak:
            t0 = time.perf_counter()
            v = predict(x, t, embeds)
            _sync(device)
            seconds = time.perf_counter() - t0
    h, w = hw[0] * 8, hw[1] * 8
    tokens = schedule.window_tokens(latents, h, w)
    flops = 2 * schedule.transformer_flops(tokens, 512, spec.dim, spec.ffn_dim, layers)
    mfu = flops / seconds / (peak_tflops * 1e12) if peak_tflops else None
    layout_spec = memory.ModelSpec(spec.name, spec.heads, spec.head_dim, layers, spec.ffn_dim)
    est = memory.estimate(layout_spec, h, w, latents, guided=True, cfg_batch=True)
    # The window's text K/V were made by the warm-up step: the step's own peak is the block activations.
    predicted = est.activations
    ok = bool(torch.isfinite(v).all())
    return Row(f"step {name} {h}x{w}", seconds, mfu, peak.bytes, predicted, "finite velocity", ok,
               [f"{tokens} tokens", f"{flops / 1e15:.3f} PFLOP"])


def check_causal(name, spec, model, latents, hw, device, dtype, layers, block: int = 5) -> Row:
    from skyray.engine.forward import causal_block_ids, df_forward, text_context, window_geometry

    x, t, text = _window_inputs(spec, latents, hw, 1, device, dtype)
    ids = causal_block_ids(0, latents, 0, block)
    with torch.no_grad():
        ctx = text_context(model, text)
        geo = window_geometry(model, tuple(x.shape), device, ids)
        df_forward(model, x, t, ctx, 24, ids, geometry=geo)  # warm-up
        _sync(device)
        with Peak(device) as peak:
            t0 = time.perf_counter()
            out = df_forward(model, x, t, ctx, 24, ids, geometry=geo)
            _sync(device)
            seconds = time.perf_counter() - t0
        full = df_forward(model, x, t, ctx, 24, geometry=window_geometry(model, tuple(x.shape), device))
    h, w = hw[0] * 8, hw[1] * 8
    layout_spec = memory.ModelSpec(spec.name, spec.heads, spec.head_dim, layers, spec.ffn_dim)
    est = memory.estimate(layout_spec, h, w, latents, guided=False, causal_block_size=block)
    n = schedule.window_tokens(latents, h, w)
    dense = n * n  # what a dense boolean mask alone would have taken
    ok = bool(torch.isfinite(out).all()) and not torch.equal(out, full)
    return Row(f"causal {name} {h}x{w}", seconds, None, peak.bytes, est.activations + est.attention,
               "finite, differs from full", ok, [f"{n} tokens", f"a dense mask would be {memory.human(dense)}"])


def check_tiny(device: torch.device, dtype: torch.dtype) -> Row:
    """The tiny model's two-window shot on ``device`` in ``dtype`` against the CPU in fp32."""
    from skyray import models
    from skyray.engine.sampler import NoisePredictor, SamplerConfig, sample_shot
    from skyray.engine.schedule import shot_windows
    from skyray.engine.text import PromptCache

    tiny = models.build_tiny()
    text = PromptCache(tiny.tokenizer, tiny.text_encoder).embeds("a lighthouse at dawn", "blurry", True)
    windows = shot_windows(7, 5, 2, 0)
    cfg = SamplerConfig(steps=8, guidance_scale=5.0, addnoise_condition=20)

    def run(transformer) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed(3)
        pred = NoisePredictor(transformer, cfg)
        return sample_shot(pred, tiny.scheduler_for(8.0), [text], windows, (8, 8), gen).float().cpu()

    reference = run(tiny.transformer)
    moved = models.build_tiny().transformer
    keep = tuple(moved._keep_in_fp32_modules)
    for name, module in moved.named_modules():
        if name and not any(k in name.split(".") for k in keep) and not list(module.children()):
            module.to(dtype)
    t0 = time.perf_counter()
    got = run(moved.to(device))
    seconds = time.perf_counter() - t0
    rel = float((got - reference).norm() / reference.norm())
    label = f"tiny {device.type}-{str(dtype).removeprefix('torch.')} vs cpu-fp32"
    return Row(label, seconds, measured=rel, bound=f"rel L2 <= {TINY_BOUND:g}", ok=rel <= TINY_BOUND,
               notes=[f"latents {tuple(got.shape)}"])


# ---------------------------------------------------------------------------------------------------------- main


def _fmt(row: Row) -> tuple[str, ...]:
    mem = "bytes" in " ".join(row.notes) or row.check.startswith(("step", "causal"))
    measured = "" if row.measured is None else (
        memory.human(row.measured) if mem and row.measured > 100 else f"{row.measured:.4g}"
    )
    predicted = "" if row.predicted is None else memory.human(row.predicted)
    ratio = f"{row.measured / row.predicted:.2f}" if row.predicted and row.measured else ""
    return (
        row.check,
        "" if row.seconds is None else f"{row.seconds:.3f}",
        "" if row.mfu is None else f"{row.mfu:.1%}",
        measured,
        predicted,
        ratio,
        row.bound,
        {True: "ok", False: "FAIL", None: ""}[row.ok],
        ", ".join(row.notes),
    )


def print_table(rows: list[Row], header: str) -> None:
    head = ("check", "seconds", "MFU", "measured", "predicted", "meas/pred", "bound", "", "notes")
    cells = [head, *(_fmt(r) for r in rows)]
    widths = [max(len(c[k]) for c in cells) for k in range(len(head) - 1)]
    print(header)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + c[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one-command GPU check of skyray's real-size paths")
    ap.add_argument("--cpu-smoke", action="store_true", help="scaled-down run on the CPU (CI)")
    ap.add_argument("--models", nargs="+", default=["1.3B", "14B"], choices=["1.3B", "14B"])
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (default: from its name)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        # The real widths with one block, a window of 3 latents at 128x128 pixels; bf16 on the CPU.
        device, dtype, layers_of = torch.device("cpu"), torch.bfloat16, {"1.3B": 1, "14B": 1}
        latents, hw, causal_latents = 3, (16, 16), 10
        torch.set_num_threads(2)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-smoke for the scaled-down check")
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        layers_of = {k: FAMILIES[k].layers for k in FAMILIES}
        latents, hw, causal_latents = 25, (68, 120), 25  # 540p: 97 frames, 544x960
    peak_tflops = _peak_tflops(device, args.peak_tflops)
    rows: list[Row] = []
    t_start = time.perf_counter()
    for name in args.models:
        spec = memory.ModelSpec.of(FAMILIES[name])
        layers = layers_of[name]
        row, model = check_load(name, spec, layers, device, dtype)
        rows.append(row)
        rows.append(check_step(name, spec, model, latents, hw, device, dtype, peak_tflops, layers))
        if name == "1.3B":
            rows.append(check_causal(name, spec, model, causal_latents, hw, device, dtype, layers))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.append(check_tiny(device, dtype))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: 1 block, small window)"
    print_table(rows, f"gpu_check on {where}, torch {torch.__version__}, peak "
                      f"{peak_tflops or 'n/a'} TFLOP/s, {time.perf_counter() - t_start:.0f} s")
    # What the bare GPU machine lacks must not be needed (diffusers comes from prepare_gpu_wheels.sh).
    absent = [m for m in ("ray", "pydantic", "imageio_ffmpeg", "fastapi") if m in sys.modules]
    print(f"modules the GPU machine lacks, imported: {', '.join(absent) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
