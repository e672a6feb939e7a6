"""Transformer time per guided step of one window on K GPUs (Ulysses / CFG parallel), with TFLOP/s and MFU.

Builds the full-size SkyReels-V2 DF transformers (1.3B and 14B configs) with random bf16 weights and times one
guided prediction (conditional + unconditional forward, what every row of the step matrix costs) of a 540p window
(25 latents at 68x120) and a 720p window (31 latents at 90x160) for K = 1, 2, 4, 8 GPUs, using the same
``executors.distributed.init_group`` and ``engine.parallel.GroupParallel`` code as a render (layout from
``ParallelConfig.auto``: cfg 2 first, then Ulysses).  K = 1 runs CFG as one batch-2 forward.

    python bench/parallel_gpu.py                          # every K the machine has, both models and sizes
    python bench/parallel_gpu.py --models 1.3B --gpus 1 2 --sizes 540p --json out.json
    torchrun --nproc_per_node 8 bench/parallel_gpu.py     # one K = 8 row (no efficiency column)
    python bench/parallel_gpu.py --cpu-smoke              # the harness on CPU/gloo with the tiny model

Without CUDA (and without --cpu-smoke) it prints "skipped: no CUDA" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from skyray.engine.parallel import GroupParallel, ParallelConfig
from skyray.engine.sampler import NoisePredictor, SamplerConfig
from skyray.engine.schedule import transformer_flops, window_tokens
from skyray.engine.text import MAX_TEXT_TOKENS, TextEmbeds
from skyray.executors.distributed import destroy_group, init_group, init_method
from skyray.models import FAMILIES, tiny_configs

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by GPU name fragment; first match wins.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)

# (name, latent frames, latent height, latent width, pixel height, pixel width)
SIZES = {
    "540p": (25, 68, 120, 544, 960),
    "720p": (31, 90, 160, 720, 1280),
}
SMOKE_SIZE = (3, 4, 8, 32, 64)
_GROUPS: dict[ParallelConfig, GroupParallel] = {}


@dataclass
class Row:
    model: str
    size: str
    gpus: int
    layout: str
    tokens: int
    step_s: float  # one guided prediction: cond + uncond forwards
    forward_s: float  # step_s / 2
    tflops: float  # achieved, over the whole group
    mfu: float | None  # tflops / (gpus * peak)
    max_mem_gib: float
    efficiency: float | None = None  # step_s(1 GPU) / (gpus * step_s)
    error: str | None = None


def transformer_config(family: str) -> dict:
    if family == "tiny":
        return tiny_configs()["transformer"]
    f = FAMILIES[family]
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=f.heads, attention_head_dim=f.head_dim, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=f.ffn_dim, num_layers=f.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, inject_sample_info=True,
    )


def build_random(family: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import SkyReelsV2Transformer3DModel

    # Built directly in the target dtype on the target device: the 14B model in fp32 would not fit next to its
    # bf16 copy on an 80 GB GPU.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = SkyReelsV2Transformer3DModel(**transformer_config(family))
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def gpu_peak_tflops(override: float | None) -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "cpu", override
    name = torch.cuda.get_device_name()
    if override:
        return name, override
    for frag, peak in BF16_PEAK_TFLOPS:
        if frag in name:
            return name, peak
    return name, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layout_for(family: str, size: str, gpus: int, args) -> ParallelConfig:
    heads = FAMILIES[family].heads
    layout = ParallelConfig.auto(gpus, heads, guidance=not args.no_cfg_parallel)
    if args.attention != "auto":
        layout = ParallelConfig(layout.ulysses, layout.ring, layout.cfg, args.attention).validate(gpus, heads)
    _, _, _, ph, pw = SMOKE_SIZE if family == "tiny" else SIZES[size]
    layout.check_frame_tokens(ph, pw)
    return layout


def measure(model, family: str, size: str, device, dtype, gpus: int, args) -> Row:
    fam = FAMILIES[family]
    latents, h, w, ph, pw = SMOKE_SIZE if family == "tiny" else SIZES[size]
    tokens = window_tokens(latents, ph, pw)
    text_len = 12 if family == "tiny" else MAX_TEXT_TOKENS
    text_dim = transformer_config(family)["text_dim"]
    layout = layout_for(family, size, gpus, args)
    if gpus > 1 and layout not in _GROUPS:  # sub-groups are made once per layout (NCCL communicators are costly)
        _GROUPS[layout] = GroupParallel.build(layout, fam.heads, guidance=True)
    parallel = _GROUPS.get(layout)

    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn((1, 16, latents, h, w), generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (1, latents), generator=g).to(device)
    text = TextEmbeds(
        torch.randn((1, text_len, text_dim), generator=g).to(device, dtype),
        torch.randn((1, text_len, text_dim), generator=g).to(device, dtype),
    )
    predict = NoisePredictor(model, SamplerConfig(guidance_scale=6.0, batched_cfg=True), parallel)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    error = None
    times: list[float] = []
    try:
        with torch.no_grad():
            for i in range(args.warmup + args.repeats):
                if dist.is_initialized():
                    dist.barrier()
                _sync(device)
                t0 = time.perf_counter()
                predict(x, t, text)
                _sync(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as exc:  # every rank runs the same shapes, so every rank fails alike
        error = f"OOM: {str(exc).splitlines()[0]}"
    step = min(times) if times else float("nan")
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if dist.is_initialized():
        both = torch.tensor([step, mem], dtype=torch.float64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        step, mem = both.tolist()
    flops = 2 * transformer_flops(tokens, text_len, fam.dim, fam.ffn_dim, fam.layers)
    tflops = flops / step / 1e12
    _, peak = gpu_peak_tflops(args.peak_tflops)
    return Row(
        family, size, gpus, layout.describe(), tokens, step, step / 2, tflops,
        tflops / (gpus * peak) if peak else None, mem, error=error,
    )


def run_rank(rank: int, world: int, address: str, args, out: dict | None) -> list[Row]:
    cpu = args.cpu_smoke
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        backend = "gloo" if cpu else "nccl"
        device = init_group(rank, world, address, backend=backend, timeout_s=args.timeout, local_rank=local_rank)
    else:
        device = torch.device("cpu" if cpu else "cuda", 0)
    dtype = torch.float32 if cpu else torch.bfloat16
    families = ("tiny",) if cpu else args.models
    sizes = ("smoke",) if cpu else args.sizes
    rows = []
    try:
        for family in families:  # reject an impossible layout before building a 28 GB model
            for size in sizes:
                layout_for(family, size, world, args)
        for family in families:
            model = build_random(family, device, dtype)
            for size in sizes:
                rows.append(measure(model, family, size, device, dtype, world, args))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        _GROUPS.clear()
        destroy_group()
    if rank == 0 and out is not None:
        out["rows"] = [asdict(r) for r in rows]
    return rows


def _spawned(rank: int, world: int, address: str, args, result_path: str) -> None:
    out: dict = {}
    run_rank(rank, world, address, args, out)
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(out["rows"], f)


def run_k(k: int, args) -> list[Row]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        # Every K in fresh processes: no CUDA context or cached memory carries over between rows.
        address = init_method("127.0.0.1") if k > 1 else ""
        mp.start_processes(_spawned, args=(k, address, args, path), nprocs=k, start_method="spawn")
        with open(path) as f:
            return [Row(**r) for r in json.load(f)]


def print_table(rows: list[Row], device: str, peak: float | None) -> None:
    print(f"device: {device}; bf16 dense peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}")
    head = f"{'model':6} {'size':5} {'K':>2} {'layout':28} {'tokens':>7} {'s/step':>8} {'s/fwd':>8} " \
           f"{'TFLOP/s':>8} {'MFU':>6} {'eff':>6} {'GiB':>6}"
    print(head)
    for r in rows:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a"
        eff = f"{r.efficiency:.0%}" if r.efficiency is not None else "n/a"
        line = f"{r.model:6} {r.size:5} {r.gpus:>2} {r.layout:28} {r.tokens:>7} {r.step_s:>8.3f} {r.forward_s:>8.3f} " \
               f"{r.tflops:>8.1f} {mfu:>6} {eff:>6} {r.max_mem_gib:>6.1f}"
        print(line + (f"  {r.error}" if r.error else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["1.3B", "14B"], choices=["1.3B", "14B"])
    p.add_argument("--sizes", nargs="+", default=["540p", "720p"], choices=sorted(SIZES))
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention", default="auto", choices=["auto", "torch", "xfuser"])
    p.add_argument("--no-cfg-parallel", action="store_true", help="Ulysses only; each rank runs both CFG branches")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the detected bf16 dense peak")
    p.add_argument("--timeout", type=float, default=1800.0, help="collective timeout (s)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--cpu-smoke", action="store_true", help="run the harness on CPU/gloo with the tiny model")
    args = p.parse_args(argv)

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("skipped: no CUDA (bench/parallel_gpu.py needs NVIDIA GPUs; --cpu-smoke checks the harness on CPU)")
        return 0
    device_name, peak = gpu_peak_tflops(args.peak_tflops)

    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: one K, this process's rank
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        rows = run_rank(rank, world, "env://", args, None) if world > 1 else run_rank(0, 1, "", args, None)
        if rank != 0:
            return 0
    else:
        available = 2 if args.cpu_smoke else torch.cuda.device_count()
        ks = [k for k in args.gpus if k <= available]
        skipped = [k for k in args.gpus if k > available]
        if skipped:
            what = "ranks in --cpu-smoke" if args.cpu_smoke else "GPUs visible"
            print(f"note: K = {skipped} skipped: only {available} {what}")
        rows = []
        for k in ks:
            rows += run_k(k, args)
        base = {(r.model, r.size): r.step_s for r in rows if r.gpus == 1 and not r.error}
        for r in rows:
            if (r.model, r.size) in base and not r.error:
                r.efficiency = base[(r.model, r.size)] / (r.gpus * r.step_s)
    print_table(rows, device_name, peak)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "peak_tflops": peak, "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
