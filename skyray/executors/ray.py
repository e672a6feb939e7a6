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

from skyray.executors.base import Executor, WindowMeta
from skyray.executors.worker import WindowJob

log = logging.getLogger("skyray.ray")
EMULATED_SLOT = "skyray_slot"


class _GroupWorker:
    """Ray actor body: a Worker plus hand-off loading from checkpoint paths."""

    def __init__(self, model: str, name: str, device: str | None) -> None:
        from skyray.executors.worker import Worker

        self.worker = Worker(model, device, name=name)

    def ready(self) -> str:
        return self.worker.name

    def render_window(self, job: WindowJob, handoff: Any):
        from skyray.output.chain_writer import load_handoff

        if isinstance(handoff, str):
            handoff = load_handoff(handoff)
        out = self.worker.render_window(job, handoff)
        meta = {"shot_id": out.shot_id, "index": out.index, "seconds": out.seconds, "forwards": out.forwards,
                "worker": out.worker}
        return out, out.handoff, meta


class _ChainWriterActor:
    def __init__(self, model: str, width: int, height: int, fps: int, shots_dir: str) -> None:
        from skyray import models
        from skyray.output.chain_writer import ChainWriter

        self.writer = ChainWriter(models.load_vae(model, "cpu"), shots_dir, width, height, fps)

    def begin(self, shot_id, parent, parent_tail, save_latents) -> None:
        from skyray.output.chain_writer import load_handoff

        tail = load_handoff(parent_tail).tail if parent_tail else None
        self.writer.begin(shot_id, parent, tail, save_latents)

    def add(self, shot_id, output, handoff, checkpoint, meta) -> int:
        return self.writer.add(shot_id, output, handoff, checkpoint, meta)

    def finish(self, shot_id, keep_state):
        return self.writer.finish(shot_id, keep_state)


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
    ) -> None:
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(resources={EMULATED_SLOT: 64}, include_dashboard=False, log_to_driver=False)
        self.model = model
        self.groups = groups
        self.gpus_per_group = gpus_per_group
        self.parallel = parallel
        self.use_gpu = bool(ray.cluster_resources().get("GPU", 0)) if use_gpu is None else use_gpu
        self.start_timeout_s = start_timeout_s
        self._groups = [self._start_group(g) for g in range(groups)]
        self._writers: dict[int, Any] = {}
        self._pending_adds: dict[int, list[Any]] = {}
        self.recoveries = 0

    # ------------------------------------------------------------------------------------------------ groups
    def _bundle(self) -> dict[str, float]:
        return {"GPU": 1, "CPU": 1} if self.use_gpu else {EMULATED_SLOT: 1}

    def _start_group(self, index: int, generation: int = 0) -> _Group:
        if self.gpus_per_group > 1:
            # Ranks beyond 0 would need the group's process group (engine.parallel); see executors.distributed.
            raise NotImplementedError(
                "gpus_per_group > 1 (sequence/CFG parallel inside a group) is not wired into the Ray executor yet"
            )
        pg = placement_group([self._bundle() for _ in range(self.gpus_per_group)], strategy="STRICT_PACK")
        try:
            ray.get(pg.ready(), timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            remove_placement_group(pg)
            raise RuntimeError(
                f"could not reserve group {index} ({self.gpus_per_group} x {self._bundle()}) within "
                f"{self.start_timeout_s:.0f} s; cluster has {ray.cluster_resources()}"
            ) from err
        cls = ray.remote(_GroupWorker)
        actors = []
        for rank in range(self.gpus_per_group):
            opts = dict(
                num_cpus=0,
                num_gpus=1 if self.use_gpu else 0,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            )
            if not self.use_gpu:
                opts["resources"] = {EMULATED_SLOT: 1}
            name = f"group{index}.{generation}/rank{rank}"
            actors.append(cls.options(**opts).remote(self.model, name, "cuda" if self.use_gpu else "cpu"))
        ray.get([a.ready.remote() for a in actors], timeout=self.start_timeout_s)
        return _Group(index, pg, actors, generation)

    def recover(self, group: int, error: BaseException) -> bool:
        old = self._groups[group]
        log.warning("group %d failed (%s); recreating it", group, error)
        for a in old.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(old.pg)
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
        lead = self._groups[group].actors[0]
        out, hand, meta = lead.render_window.options(num_returns=3).remote(job, handoff)
        return RayHandle(group, out, hand, meta)

    def wait_any(self, handles: list[RayHandle]) -> RayHandle:
        from skyray.render import WindowError

        by_ref = {h.meta: h for h in handles}
        done, _ = ray.wait(list(by_ref), num_returns=1)
        h = by_ref[done[0]]
        try:
            ray.get(h.meta)
        except (RayActorError, RayTaskError, WorkerCrashedError) as err:
            raise WindowError(h, err) from err
        return h

    def meta(self, handle: RayHandle) -> WindowMeta:
        return WindowMeta(**ray.get(handle.meta))

    def handoff(self, handle: RayHandle) -> Any:
        return handle.handoff

    # ------------------------------------------------------------------------------------------------ writers
    def open_chain(self, chain: int, width: int, height: int, fps: int, shots_dir: str) -> None:
        opts = {"num_cpus": 0} if not self.use_gpu else {"num_cpus": 1}
        self._writers[chain] = ray.remote(_ChainWriterActor).options(**opts).remote(
            self.model, width, height, fps, shots_dir
        )
        self._pending_adds[chain] = []

    def begin_shot(self, chain, shot_id, parent, parent_tail, save_latents) -> None:
        self._pending_adds[chain].append(self._writers[chain].begin.remote(shot_id, parent, parent_tail, save_latents))

    def add_window(self, chain, shot_id, handle, checkpoint, meta) -> None:
        w = self._writers[chain]
        if isinstance(handle, str):
            ref = w.add.remote(shot_id, handle, None, None, None)
        else:
            ref = w.add.remote(shot_id, handle.out, handle.handoff, checkpoint, meta)
        self._pending_adds[chain].append(ref)

    def flush(self, chain: int) -> None:
        ray.get(self._pending_adds[chain])
        self._pending_adds[chain] = []

    def finish_shot(self, chain, shot_id, keep_state):
        result = ray.get(self._writers[chain].finish.remote(shot_id, keep_state))
        self.flush(chain)
        return result

    def shutdown(self) -> None:
        for w in self._writers.values():
            ray.kill(w)
        self._writers.clear()
        for g in self._groups:
            for a in g.actors:
                ray.kill(a)
            remove_placement_group(g.pg)
        self._groups.clear()
