"""Loading without waste: checkpoints stream into meta skeletons in their final dtype, one tensor at a time; a
group's source rank broadcasts them as it reads; the host peak of a load stays within 1.15x the weights."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from skyray import loading, models
from skyray.executors.distributed import destroy_group, init_group, init_method, load_broadcast

REPO = Path(__file__).resolve().parents[1]
PARTS = models.WEIGHT_PARTS


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    models.export(models.build_tiny(), out)
    return out


def _reference(folder: Path, part: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel
    from transformers import UMT5EncoderModel

    cls = {"text_encoder": UMT5EncoderModel, "transformer": SkyReelsV2Transformer3DModel, "vae": AutoencoderKLWan}
    return cls[part].from_pretrained(folder / part, torch_dtype=dtype).eval()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters(remove_duplicate=False)), dict(b.named_parameters(remove_duplicate=False))
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name], pb[name]), name
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys() and all(torch.equal(ba[n], bb[n]) for n in ba)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_load_equals_from_pretrained(folder: Path, dtype: torch.dtype) -> None:
    comps = models.skeletons(str(folder))
    for part in PARTS:
        module = getattr(comps, part)
        assert all(p.is_meta for p in module.parameters())  # a skeleton holds no weights
        # What models.load_folder does for a device whose dtype is ``dtype``.
        entries = loading.checkpoint_entries(folder / part)
        loading.assign(module, loading.read_tensors(entries), dtype, "cpu", models.keep_fp32(module, dtype))
        _same(module, _reference(folder, part, dtype))
    te = comps.text_encoder
    assert te.shared.weight is te.encoder.embed_tokens.weight  # the tied embedding arrives once, stays tied


def test_folder_load_renders_like_the_tiny_model(folder: Path, tiny) -> None:
    loaded = models.load(str(folder), "cpu")
    for part in PARTS:
        _same(getattr(loaded, part), getattr(tiny, part))


def test_a_checkpoint_missing_a_tensor_is_refused(folder: Path) -> None:
    comps = models.skeletons(str(folder))
    entries = loading.checkpoint_entries(folder / "vae")[1:]
    with pytest.raises(KeyError, match="the checkpoint lacks 1 parameters"):
        loading.assign(comps.vae, loading.read_tensors(entries), torch.float32, "cpu")


def test_text_encoder_lives_on_the_cpu_next_to_a_gpu() -> None:
    gpu = models.placement("cuda")
    assert gpu["text_encoder"].type == "cpu" and gpu["transformer"].type == gpu["vae"].type == "cuda"
    off = models.placement("cuda", offload=True)
    assert (off["text_encoder"].type, off["transformer"].type, off["vae"].type) == ("cpu", "cpu", "cuda")
    assert {d.type for d in models.placement("cpu").values()} == {"cpu"}


# ------------------------------------------------------------------------------------------- broadcast in a group


def _rank_main(rank: int, world: int, address: str, sources: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    init_group(rank, world, address, backend="gloo", timeout_s=60)
    try:
        for k, model in enumerate(sources):
            comps = load_broadcast(model, "cpu")
            state = {f"{part}.{n}": t for part in PARTS for n, t in getattr(comps, part).state_dict().items()}
            torch.save({n: (t.dtype, t.clone()) for n, t in state.items()}, Path(out_dir) / f"{k}-rank{rank}.pt")
    finally:
        destroy_group()


@pytest.mark.timeout(150)
def test_broadcast_gives_every_rank_the_source_weights(folder: Path, tmp_path: Path, tiny) -> None:
    # Rank 0 streams a diffusers folder (then the built-in tiny model); rank 1 only receives.
    sources, world = [str(folder), models.TINY], 2
    ctx = mp.start_processes(_rank_main, args=(world, init_method("127.0.0.1"), sources, str(tmp_path)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + 140
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "rank processes still running"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    want = {f"{part}.{n}": t for part in PARTS for n, t in getattr(tiny, part).state_dict().items()}
    for k in range(len(sources)):
        for r in range(world):
            got = torch.load(tmp_path / f"{k}-rank{r}.pt")
            assert got.keys() == want.keys()
            for n, (dtype, t) in got.items():
                assert dtype == want[n].dtype and torch.equal(t, want[n]), (sources[k], r, n)


# ---------------------------------------------------------------------------------------------- host memory


def test_load_peak_rss_is_within_1_15x_the_weights(tmp_path: Path) -> None:
    # The 1.3B transformer's widths with 2 of its 30 blocks (~0.26 GB of bf16): the same tensors, fewer of them.
    # `python bench/load_memory.py` runs the full 1.3B config (bench/README.md has the figure).
    out = tmp_path / "load.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "load_memory.py"), "--layers", "2", "--loaders", "skyray",
                    "--json", str(out)], check=True, capture_output=True, timeout=300)
    (row,) = json.loads(out.read_text())
    assert row["weights"] > 2.5e8
    assert row["held_after"] >= 0.95 * row["weights"]  # the weights really are in this process's memory
    assert row["ratio"] <= 1.15, row
