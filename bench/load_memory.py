"""Host memory of loading a bf16 transformer: peak RSS during the load minus RSS before it, against its weight bytes.

Writes a random-weight checkpoint of the SkyReels-V2 DF-1.3B transformer config (``--layers`` to shrink it) in
bf16 to a temporary folder, then loads it in fresh processes, each measuring its own peak RSS (``VmHWM``, reset
with ``/proc/self/clear_refs`` after the imports): our loader (``skyray.loading``: meta skeleton, tensors read one
by one with plain reads, assigned in place) and, for comparison, diffusers' ``from_pretrained(torch_dtype=bf16)``.
The checkpoint is deleted afterwards.  Linux only (``/proc``).

    python bench/load_memory.py               # the 1.3B config: ~2.9 GB of bf16 weights written, loaded twice
    python bench/load_memory.py --layers 4    # a quick check (what tests/test_loading.py runs)
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024, inject_sample_info=True,
)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def write_checkpoint(folder: Path, layers: int) -> int:
    """A random bf16 (fp32 where diffusers keeps fp32) checkpoint of the config, written tensor by tensor."""
    import torch
    from diffusers import SkyReelsV2Transformer3DModel

    from skyray import loading

    cfg = dict(CONFIG_1_3B, num_layers=layers)
    model = loading.skeleton(lambda: SkyReelsV2Transformer3DModel(**cfg))
    model.save_config(folder)
    keep = tuple(model._keep_in_fp32_modules)
    items = [(n, loading.final_dtype(n, torch.bfloat16, keep), tuple(p.shape)) for n, p in model.named_parameters()]
    header, offset = {}, 0
    names = {torch.bfloat16: "BF16", torch.float32: "F32"}
    for name, dtype, shape in items:
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, dtype, shape in items:
            t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            f.write(t.view(-1).view(torch.uint8).numpy().tobytes())
    return offset


def measure(folder: Path, how: str) -> dict:
    """Runs in a fresh process: the load's peak RSS above what the process held before it."""
    import torch
    from diffusers import SkyReelsV2Transformer3DModel

    from skyray import loading

    torch.set_num_threads(2)
    cfg = SkyReelsV2Transformer3DModel.load_config(folder)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    if how == "skyray":
        model = loading.load_component(
            lambda: SkyReelsV2Transformer3DModel.from_config(cfg), folder, torch.bfloat16, "cpu",
            SkyReelsV2Transformer3DModel._keep_in_fp32_modules,
        )
    else:
        model = SkyReelsV2Transformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    peak, after = _status("VmHWM"), _status("VmRSS")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    # A memory-mapped load may not have read its pages yet: read every weight once, as the first forward will.
    for p in model.parameters():
        p.view(-1)[:: max(1, 4096 // p.element_size())].sum()
    touched = _status("VmRSS")
    return {"how": how, "weights": weights, "peak_above": peak - before, "held_after": after - before,
            "held_after_reading": touched - before}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30, help="transformer blocks (30 = the 1.3B model)")
    ap.add_argument("--loaders", nargs="+", default=["skyray", "from_pretrained"], choices=["skyray", "from_pretrained"])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--measure", nargs=2, metavar=("FOLDER", "HOW"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1])))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="skyray-load-"))
    try:
        written = write_checkpoint(tmp, args.layers)
        rows = []
        for how in args.loaders:
            out = subprocess.run([sys.executable, __file__, "--measure", str(tmp), how], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"1.3B transformer config, {args.layers} layers, bf16: {written / 1e9:.3f} GB of weights on disk")
    print(f"{'loader':<16}{'weights GB':>12}{'peak above GB':>15}{'held after GB':>15}{'after reading GB':>18}"
          f"{'peak / weights':>16}")
    for r in rows:
        r["ratio"] = r["peak_above"] / r["weights"]
        print(f"{r['how']:<16}{r['weights'] / 1e9:>12.3f}{r['peak_above'] / 1e9:>15.3f}{r['held_after'] / 1e9:>15.3f}"
              f"{r['held_after_reading'] / 1e9:>18.3f}{r['ratio']:>16.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
