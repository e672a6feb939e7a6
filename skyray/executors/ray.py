"""Ray executor: windows on GPU-group actors, decoding on chain-writer actors, latents as object references.

Each group is a placement group of ``gpus_per_group`` one-GPU bundles (STRICT_PACK: one node) with one worker
actor per bundle; the group loads the model once and stays warm across shots.  On a machine without GPUs the
same code creates CPU-emulated groups whose bundles ask for a custom ``skyray_slot`` resource instead of a GPU.

A window's three results (output, hand-off, metadata) are separate objects: the next window's actor receives the
hand-off reference, the chain writer receives the output reference, and the driver only ever fetches metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from skyray.executors.base import Executor, WindowError, WindowMeta
from skyray.executors.worker import WindowJob

log = logging.getLogger("skyray.ray")
EMULATED_SLOT = "skyray_slot"


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` (a cluster), or start a local Ray whose CPU-emulated groups have slots to bind."""
    if ray.is_initialized():
        return
    # Actor logs and tqdm_ray bars are shown by this (driver) process.
    if address:
        ray.init(address=address)
    else:
        ray.init(resources={EMULATED_SLOT: 64}, include_dashboard=False)


class _GroupWorker:
    """Ray actor body: one rank of a group. ``setup`` joins the group's process group (K > 1) and loads the model."""

    def __init__(self, model: str, name: str, device: str | None, offload: bool = False) -> None:
        self.model, self.name, self.device, self.offload = model, name, device, offload
        self.worker = None

    def placement(self):
        from skyray.executors.distributed import current_placement

        return current_placement()

    def rendezvous(self) -> str:
        from skyray.executors.distributed import init_method

        return init_method()

    def setup(self, rank: int, world: int, method: str | None, layout, guidance: bool, env: dict,
              timeout_s: float, local_rank: int = 0, progress: bool = True) -> str:
        from skyray.executors.worker import Worker

        parallel, device = None, self.device
        if world > 1:
            from skyray.engine.parallel import GroupParallel
            from skyray.executors.distributed import init_group
            from skyray.models import family_of

            dev = init_group(rank, world, method, timeout_s=timeout_s, local_rank=local_rank, env=env)
            device = str(dev)
            parallel = GroupParallel.build(layout, family_of(self.model).heads, guidance, timeout_s)
        self.worker = Worker(self.model, device, parallel=parallel, name=self.name, broadcast=world > 1,
                             offload=self.offload)
        if rank == 0 and progress:
            self.worker.on_row = self._progress
        self._bar = None
        return self.name

    def _progress(self, shot: str, window: int, row: int, rows: int) -> None:
        # Live per-window progress from the actor, rendered by the driver's console (tqdm_ray).
        from ray.experimental import tqdm_ray

        if row == 0:
            self._bar = tqdm_ray.tqdm(total=rows, desc=f"{self.name} {shot} w{window}", unit="step")
        if self._bar is not None:
            self._bar.update(1)
            if row + 1 == rows:
                self._bar.close()
                self._bar = None

    def render_window(self, job: WindowJob, handoff: Any):
        from skyray.output.chain_writer import load_handoff

        if isinstance(handoff, str):
            handoff = load_handoff(handoff)
        out = self.worker.render_window(job, handoff)
        meta = {"shot_id": out.shot_id, "index": out.index, "seconds": out.seconds, "forwards": out.forwards,
                "worker": out.worker}
        log.info("%s: shot %s window %d/%d in %.2f s (%d forwards)", self.name, job.shot_id, out.index + 1,
                 job.windows, out.seconds, out.forwards)
        return out, out.handoff, meta


class _ChainWriterActor:
    def __init__(self, model: str, width: int, height: int, fps: int, shots_dir: str, device: str = "cpu") -> None:
        from skyray import models
        from skyray.output.chain_writer import ChainWriter

        self.writer = ChainWriter(models.load_vae(model, device), shots_dir, width, height, fps)

    def begin(self, shot_id, parent, parent_tail, save_latents) -> None:
        from skyray.output.chain_writer import load_handoff

        tail = load_handoff(parent_tail).tail if parent_tail else None
        self.writer.begin(shot_id, parent, tail, save_latents)

    def add(self, shot_id, output, handoff, checkpoint, meta) -> int:
        return self.writer.add(shot_id, output, handoff, checkpoint, meta)

    def finish(self, shot_id, keep_state):
        return self.writer.finish(shot_id, keep_state)

    def abort_all(self) -> None:
        self.writer.abort_all()


@dataclass
class _Group:
    index: int
    pg: Any
    actors: list[Any]
    generation: int = 0


@dataclass(frozen=True)
class RayHandle:
    group: int
    out: Any
    handoff: Any
    meta: Any
    others: tuple = ()  # metadata refs of the group's other ranks (they fail loudly if a rank dies)


class RayExecutor(Executor):
    def __init__(
        self,
        model: str,
        groups: int = 1,
        gpus_per_group: int = 1,
        address: str | None = None,
        parallel=None,
        use_gpu: bool | None = None,
        start_timeout_s: float = 300.0,
        guidance: bool = True,
        collective_timeout_s: float = 600.0,
        max_writers: int = 2,
        decode_gpu: float = 0.0,
        progress: bool = True,
        placement_group=None,
        offload: bool = False,
    ) -> None:
        ensure_ray(address)
        self.model = model
        self.groups = groups
        self.gpus_per_group = gpus_per_group
        self.layout = parallel
        self.guidance = guidance
        self.collective_timeout_s = collective_timeout_s
        if gpus_per_group > 1 and parallel is None:
            raise ValueError("a group of several GPUs needs a parallel layout (engine.parallel.ParallelConfig)")
        self.use_gpu = bool(ray.cluster_resources().get("GPU", 0)) if use_gpu is None else use_gpu
        self.start_timeout_s = start_timeout_s
        self.max_writers = max(1, max_writers)
        self.decode_gpu = decode_gpu
        self.progress = progress
        # A placement group reserved by someone else (a Serve replica's own bundles): rank actors go into it and
        # it is never removed here.
        if placement_group is not None and groups != 1:
            raise ValueError("an existing placement group holds exactly one group")
        self._external_pg = placement_group
        self.offload = offload
        self._groups = [self._start_group(g) for g in range(groups)]
        self._writers: dict[int, Any] = {}
        self._chain_writer: dict[int, int] = {}
        self._pending_adds: dict[int, list[Any]] = {}
        self.recoveries = 0

    # ------------------------------------------------------------------------------------------------ groups
    def _bundle(self) -> dict[str, float]:
        return {"GPU": 1, "CPU": 1} if self.use_gpu else {EMULATED_SLOT: 1}

    def _start_group(self, index: int, generation: int = 0) -> _Group:
        from skyray.executors.distributed import assign_ranks, collective_env, node_ip

        k = self.gpus_per_group
        pg = self._external_pg or placement_group([self._bundle() for _ in range(k)], strategy="STRICT_PACK")
        try:
            ray.get(pg.ready(), timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            self._release(pg)
            raise RuntimeError(
                f"could not reserve group {index} ({k} x {self._bundle()}) within "
                f"{self.start_timeout_s:.0f} s; cluster has {ray.cluster_resources()}"
            ) from err
        cls = ray.remote(_GroupWorker)
        env = collective_env()
        actors = []
        for b in range(k):
            opts = dict(
                num_cpus=0,
                num_gpus=1 if self.use_gpu else 0,
                max_restarts=0,
                runtime_env={"env_vars": env} if env else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=b),
            )
            if not self.use_gpu:
                opts["resources"] = {EMULATED_SLOT: 1}
            actors.append(cls.options(**opts).remote(self.model, f"group{index}.{generation}/b{b}",
                                                     "cuda" if self.use_gpu else "cpu", self.offload))
        try:
            if k == 1:
                ray.get(actors[0].setup.remote(0, 1, None, None, self.guidance, {}, 0.0, 0, self.progress),
                        timeout=self.start_timeout_s)
            else:
                # vLLM's recipe: ranks sorted by node (the driver's first) and GPU id, rendezvous on rank 0's node.
                ranks = assign_ranks(ray.get([a.placement.remote() for a in actors]), driver_ip=node_ip())
                actors = [a for _, a in sorted(zip((r.rank for r in ranks), actors), key=lambda x: x[0])]
                ranks = sorted(ranks, key=lambda r: r.rank)
                method = ray.get(actors[0].rendezvous.remote())
                ray.get([a.setup.remote(r.rank, k, method, self.layout, self.guidance, env,
                                        self.collective_timeout_s, r.local_rank, self.progress)
                         for a, r in zip(actors, ranks)],
                        timeout=self.start_timeout_s)
        except Exception:
            for a in actors:
                ray.kill(a, no_restart=True)
            self._release(pg)
            raise
        return _Group(index, pg, actors, generation)

    def _release(self, pg) -> None:
        if pg is not self._external_pg:
            remove_placement_group(pg)

    def recover(self, group: int, error: BaseException) -> bool:
        old = self._groups[group]
        log.warning("group %d failed (%s); recreating it", group, error)
        for a in old.actors:
            ray.kill(a, no_restart=True)
        self._release(old.pg)
        try:
            self._groups[group] = self._start_group(group, old.generation + 1)
        except Exception as err:  # no resources left for a replacement: the render stops with this error
            log.error("could not recreate group %d: %s", group, err)
            return False
        self.recoveries += 1
        return True

    def actors(self, group: int) -> list[Any]:
        return list(self._groups[group].actors)

    # ------------------------------------------------------------------------------------------------ windows
    def submit(self, group: int, job: WindowJob, handoff: Any) -> RayHandle:
        # Every rank runs the same window (they split each forward); rank 0's results are the window's.
        refs = [a.render_window.options(num_returns=3).remote(job, handoff) for a in self._groups[group].actors]
        out, hand, meta = refs[0]
        return RayHandle(group, out, hand, meta, tuple(r[2] for r in refs[1:]))

    def wait_any(self, handles: list[RayHandle]) -> RayHandle:
        by_ref = {}
        for h in handles:
            for ref in (h.meta, *h.others):
                by_ref[ref] = h
        done, _ = ray.wait(list(by_ref), num_returns=1)
        h = by_ref[done[0]]
        try:
            ray.get(done[0])
            ray.get([h.meta, *h.others])  # the ranks of a group finish together (their collectives tie them)
        except (RayActorError, RayTaskError, WorkerCrashedError) as err:
            raise WindowError(h, err) from err
        return h

    def meta(self, handle: RayHandle) -> WindowMeta:
        return WindowMeta(**ray.get(handle.meta))

    def handoff(self, handle: RayHandle) -> Any:
        return handle.handoff

    # ------------------------------------------------------------------------------------------------ writers
    def open_chain(self, chain: int, width: int, height: int, fps: int, shots_dir: str) -> None:
        # A small pool of writer actors (each holds one VAE) serves all chains; a chain always uses the same one,
        # whose calls run in submission order, so its shots decode in order.
        slot = chain % self.max_writers
        if slot not in self._writers:
            # Writers decode on the CPU unless given a share of a GPU (decode_gpu): the fp32 VAE at 540p wants one.
            opts: dict[str, Any] = {"num_cpus": 0 if not self.use_gpu else 1}
            device = "cpu"
            if self.use_gpu and self.decode_gpu > 0:
                opts["num_gpus"], device = self.decode_gpu, "cuda"
            self._writers[slot] = ray.remote(_ChainWriterActor).options(**opts).remote(
                self.model, width, height, fps, shots_dir, device
            )
            self._pending_adds[slot] = []
        self._chain_writer[chain] = slot

    def _writer(self, chain: int):
        return self._writers[self._chain_writer[chain]]

    def begin_shot(self, chain, shot_id, parent, parent_tail, save_latents) -> None:
        ref = self._writer(chain).begin.remote(shot_id, parent, parent_tail, save_latents)
        self._pending_adds[self._chain_writer[chain]].append(ref)

    def add_window(self, chain, shot_id, handle, checkpoint, meta) -> None:
        w = self._writer(chain)
        if isinstance(handle, str):
            ref = w.add.remote(shot_id, handle, None, None, None)
        else:
            ref = w.add.remote(shot_id, handle.out, handle.handoff, checkpoint, meta)
        self._pending_adds[self._chain_writer[chain]].append(ref)

    def flush(self, chain: int) -> None:
        slot = self._chain_writer[chain]
        ray.get(self._pending_adds[slot])
        self._pending_adds[slot] = []

    def finish_shot(self, chain, shot_id, keep_state):
        result = ray.get(self._writer(chain).finish.remote(shot_id, keep_state))
        self.flush(chain)
        return result

    def abort_open(self) -> None:
        ray.get([w.abort_all.remote() for w in self._writers.values()])

    def shutdown(self) -> None:
        for w in self._writers.values():
            ray.kill(w)
        self._writers.clear()
        for g in self._groups:
            for a in g.actors:
                ray.kill(a)
            self._release(g.pg)
        self._groups.clear()
