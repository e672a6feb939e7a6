"""Weights straight into their final dtype and device: safetensors read tensor by tensor into empty skeletons.

``from_pretrained`` followed by ``.to(device)`` holds a model on the host in full before the GPU sees it, and a
receiver built with ``to_empty`` on the CPU in fp32 first holds twice the bf16 weights.  Here a module is built
as a *skeleton* (parameters on the meta device, no memory; buffers real, they are small and often not in the
checkpoint, e.g. the rope tables), and each checkpoint tensor is read into a fresh buffer with plain file reads
(not a memory map, whose resident pages would count a second time), cast to its final dtype, moved to its final
device and assigned in place of the meta parameter.  The extra memory of a load is one tensor at a time.

The same stream feeds ``executors.distributed.broadcast_tensors``: the rank that reads the files sends each tensor
as it is read, and the other ranks assign what they receive; nobody else touches the disk.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names (the file header) -> torch
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint file: its name, dtype and shape, and where its bytes are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in ``file``
    nbytes: int


def weight_files(folder: str | Path) -> list[Path]:
    """The ``*.safetensors`` files of a component folder (one file or shards), in name order."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (other formats are not supported)")
    return files


def read_header(file: Path) -> list[TensorEntry]:
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        out.append(TensorEntry(name, dtype, tuple(info["shape"]), file, 8 + size + start, end - start))
    return out


def checkpoint_entries(folder: str | Path) -> list[TensorEntry]:
    """Every tensor of a component's checkpoint, in file order (the order they are read in)."""
    return [e for f in weight_files(folder) for e in sorted(read_header(f), key=lambda e: e.offset)]


def read_tensors(entries: Iterable[TensorEntry]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for each entry, read into memory of its own, one at a time."""
    handles: dict[Path, object] = {}
    try:
        for e in entries:
            f = handles.get(e.file)
            if f is None:
                f = handles[e.file] = open(e.file, "rb")  # noqa: SIM115 - closed below, several files stay open
            t = torch.empty(e.shape, dtype=e.dtype)
            view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
            f.seek(e.offset)
            if f.readinto(view) != e.nbytes:
                raise OSError(f"{e.file}: tensor {e.name!r} is truncated")
            yield e.name, t
    finally:
        for f in handles.values():
            f.close()


@contextlib.contextmanager
def _meta_parameters() -> Iterator[None]:
    # accelerate's init_empty_weights(include_buffers=False), without accelerate (the GPU check's machine lacks
    # it): every parameter moves to the meta device as it is registered, so the initialisers that follow run on
    # meta tensors (free) and buffers, registered otherwise, stay real.
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def skeleton(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` with its parameters on the meta device (no memory, no random init); buffers are real."""
    with _meta_parameters():
        module = build()
    if hasattr(module, "tie_weights"):  # transformers ties embeddings after init, which init_empty_weights skips
        module.tie_weights()
    return module.eval().requires_grad_(False)


def final_dtype(name: str, dtype: torch.dtype, keep_fp32: Iterable[str] = ()) -> torch.dtype:
    """The dtype parameter ``name`` ends in: fp32 inside a module named in ``keep_fp32`` (diffusers'
    ``_keep_in_fp32_modules``, matched on whole name parts as ``from_pretrained`` does), else ``dtype``."""
    keep = tuple(keep_fp32)
    if keep and any(k in name.split(".") for k in keep):
        return torch.float32
    return dtype


def _alias_groups(module: torch.nn.Module) -> dict[str, list[str]]:
    # Names that share one parameter (tied embeddings): a checkpoint stores only one of them.
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: names for names in by_id.values() for n in names}


def assign(
    module: torch.nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device | str,
    keep_fp32: Iterable[str] = (),
) -> torch.nn.Module:
    """Fill a skeleton's meta parameters from ``tensors`` (each cast and moved as it arrives); returns ``module``.

    Every parameter must arrive (tied names once for all); buffers the stream does not carry move to ``device``.
    """
    device = torch.device(device)
    keep = tuple(keep_fp32)
    aliases = _alias_groups(module)
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    done: set[str] = set()
    for name, t in tensors:
        if name in params:
            target = final_dtype(name, dtype, keep) if t.is_floating_point() else t.dtype
            value = torch.nn.Parameter(t.to(device=device, dtype=target), requires_grad=False)
            for alias in aliases[name]:
                owner, _, leaf = alias.rpartition(".")
                module.get_submodule(owner)._parameters[leaf] = value
                done.add(alias)
        elif name in buffers:
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner)._buffers[leaf] = t.to(device=device, dtype=buffers[name].dtype)
            done.add(name)
        else:
            raise KeyError(f"{type(module).__name__}: the checkpoint has {name!r}, which the model does not")
        del t
    missing = sorted(set(params) - done)
    if missing:
        raise KeyError(f"{type(module).__name__}: the checkpoint lacks {len(missing)} parameters: {missing[:5]}")
    for name, b in module.named_buffers():
        if name not in done and b.device != device:
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner)._buffers[leaf] = b.to(device)
    return module


def load_component(
    build: Callable[[], torch.nn.Module],
    folder: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    keep_fp32: Iterable[str] = (),
) -> torch.nn.Module:
    """A module built by ``build`` with the weights of ``folder`` in ``dtype`` on ``device``."""
    module = skeleton(build)
    return assign(module, read_tensors(checkpoint_entries(folder)), dtype, device, keep_fp32)
