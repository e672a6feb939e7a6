"""torch.distributed set-up for the ranks of one GPU group (Ray actors, spawned processes or torchrun).

The recipe is vLLM's for Ray actors: the driver picks ``tcp://<driver ip>:<free port>`` and collects the
``NCCL_*`` / ``GLOO_*`` environment to forward as the actors' ``runtime_env``; actors are ranked by (node ip, GPU
id) so neighbouring ranks share a node; every rank selects its device by local rank, joins the group and runs one
all-reduce so a broken network fails at start-up with a message naming the rank, world and address rather than
hanging in the first attention layer.  A group does not survive a member's restart: destroy and rebuild it whole.

Ray is optional here (used for the node address when a Ray worker is running); the same functions serve plain
``torch.multiprocessing`` processes, which is how the tests use them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Environment that tunes or debugs collectives; forwarded from the driver to every rank.
COLLECTIVE_ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "TORCH_GLOO_")
DEFAULT_TIMEOUT_S = 600.0


def node_ip() -> str:
    """This node's address as other nodes see it (Ray's view when inside Ray, else the default route's)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    # Without Ray, the address this host's name resolves to (no probe traffic to any outside address).
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return ip


def free_port(host: str = "") -> int:
    """A TCP port that is free now (the usual race: someone may take it before the group binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_method(ip: str | None = None, port: int | None = None) -> str:
    """``tcp://ip:port`` for ``init_group``; called on the driver (rank 0 binds the port)."""
    ip = ip or node_ip()
    port = port or free_port()
    host = f"[{ip}]" if ":" in ip else ip
    return f"tcp://{host}:{port}"


def collective_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's ``NCCL_*``/``GLOO_*``/``TORCH_NCCL_*`` variables, for ``runtime_env={"env_vars": ...}``."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(COLLECTIVE_ENV_PREFIXES)}


@dataclass(frozen=True)
class Placement:
    """Where one actor landed: its node address and the GPU ids Ray gave it."""

    node_ip: str
    gpu_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RankAssignment:
    rank: int
    local_rank: int  # index among the group's ranks on the same node


def assign_ranks(placements: list[Placement], driver_ip: str | None = None) -> list[RankAssignment]:
    """Rank of every actor (in the order given): sorted by node (the driver's first), then GPU id.

    Ranks on one node are consecutive, so the innermost (Ulysses) groups of ``engine.parallel`` stay on NVLink.
    """
    def key(i: int) -> tuple:
        p = placements[i]
        return (p.node_ip != driver_ip, p.node_ip, p.gpu_ids or (i,))

    order = sorted(range(len(placements)), key=key)
    out: list[RankAssignment | None] = [None] * len(placements)
    seen: dict[str, int] = {}
    for rank, i in enumerate(order):
        ip = placements[i].node_ip
        out[i] = RankAssignment(rank, seen.get(ip, 0))
        seen[ip] = seen.get(ip, 0) + 1
    return out  # type: ignore[return-value]


def current_placement() -> Placement:
    """This process's placement: Ray's GPU ids inside a Ray actor, else ``CUDA_VISIBLE_DEVICES``."""
    gpu_ids: tuple[int, ...] = ()
    try:
        import ray

        if ray.is_initialized():
            gpu_ids = tuple(int(g) for g in ray.get_gpu_ids())
    except ImportError:
        pass
    if not gpu_ids:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        gpu_ids = tuple(int(g) for g in visible.split(",") if g.strip().isdigit())
    return Placement(node_ip(), gpu_ids)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def select_device(local_rank: int) -> torch.device:
    """The device a rank works on: ``cuda:local_rank``, or ``cuda:0`` when the runtime shows each process one GPU
    (Ray's default isolation via ``CUDA_VISIBLE_DEVICES``); the CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1:
        index = 0
    elif local_rank < count:
        index = local_rank
    else:
        raise RuntimeError(f"local rank {local_rank} has no GPU: this process sees {count} devices")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_group(
    rank: int,
    world: int,
    init_method: str,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    local_rank: int | None = None,
    env: dict[str, str] | None = None,
) -> torch.device:
    """Join the group as ``rank`` of ``world`` and check it with one all-reduce; returns this rank's device.

    ``timeout_s`` bounds every collective of the group (gloo enforces it; NCCL's watchdog aborts on it).
    ``env`` (from ``collective_env`` on the driver) is applied before the backend starts.
    """
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group; call destroy_group() first")
    for k, v in (env or {}).items():
        os.environ.setdefault(k, v)
    backend = backend or default_backend()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(local_rank) if backend == "nccl" else torch.device("cpu")
    where = f"rank {rank}/{world} at {init_method} ({backend})"
    try:
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            world_size=world,
            rank=rank,
            timeout=timedelta(seconds=timeout_s),
        )
    except Exception as exc:
        raise RuntimeError(f"{where}: could not join the process group: {exc}") from exc
    try:
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        got = probe.item()
    except Exception as exc:
        destroy_group()
        raise RuntimeError(
            f"{where}: the start-up all-reduce failed ({exc.__class__.__name__}: {exc}); check that every rank "
            f"can reach the address and that NCCL_*/GLOO_* interface settings match the network"
        ) from exc
    if got != world:
        destroy_group()
        raise RuntimeError(f"{where}: the start-up all-reduce summed to {got}, expected {world}")
    return device


def destroy_group() -> None:
    """Leave the group (and all sub-groups); a no-op when none is initialised."""
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_stream(
    tensors: Iterable[tuple[str, torch.Tensor]] | None,
    layout: list[tuple[str, str, tuple[int, ...]]] | None,
    device: torch.device,
    src: int = 0,
    group: dist.ProcessGroup | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Send a checkpoint from ``src`` to every rank one tensor at a time; yields (name, tensor on ``device``).

    On ``src`` ``tensors`` is the stream read from disk and ``layout`` its (name, dtype, shape) in the same
    order, with the dtypes the tensors are sent in (their final ones); elsewhere both are None and the layout
    arrives first.  ``device`` is the one the backend sends from (the rank's GPU for NCCL, the CPU for gloo): each
    tensor is there only until the caller moves it to its final place, so no rank ever holds a whole module twice.
    """
    rank = dist.get_rank(group)
    box = [layout] if rank == src else [None]
    dist.broadcast_object_list(box, src=src, group=group)
    entries = box[0]
    source = iter(tensors) if rank == src else None
    for name, dtype_name, shape in entries:
        dtype = getattr(torch, dtype_name.removeprefix("torch."))
        if source is not None:
            sent_name, t = next(source)
            if sent_name != name:
                raise RuntimeError(f"checkpoint stream out of order: got {sent_name!r}, the layout says {name!r}")
            t = t.to(device=device, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=src, group=group)
        yield name, t


def load_broadcast(
    model: str, device: torch.device | str, offload: bool = False, src: int = 0, group: dist.ProcessGroup | None = None
):
    """Every rank's ``models.Components`` of ``model``, read from disk by ``src`` only and broadcast.

    Each rank builds meta skeletons (no memory) and assigns every tensor it receives in its final dtype on its
    final device (``models.placement``), so a rank holds the weights once plus one tensor in flight.
    """
    from skyray import loading, models

    device = torch.device(device)
    comps = models.skeletons(model)
    wire = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    dtypes, where = models.dtypes_for(device), models.placement(device, offload)
    is_src = dist.get_rank(group) == src
    for part in models.WEIGHT_PARTS:
        module = getattr(comps, part)
        keep = models.keep_fp32(module, dtypes[part])
        tensors = layout = None
        if is_src:
            if model == models.TINY:
                items = list(models.weight_stream(model, part))
                tensors, shapes = iter(items), [(n, t.dtype, tuple(t.shape)) for n, t in items]
            else:
                entries = loading.checkpoint_entries(models.resolve_model_path(model) / part)
                tensors, shapes = loading.read_tensors(entries), [(e.name, e.dtype, e.shape) for e in entries]
            layout = [
                (n, str(loading.final_dtype(n, dtypes[part], keep) if dt.is_floating_point else dt), s)
                for n, dt, s in shapes
            ]
        stream = broadcast_stream(tensors, layout, wire, src, group)
        loading.assign(module, stream, dtypes[part], where[part], keep)
    comps.device = device
    return comps
