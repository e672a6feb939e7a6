"""Ray executor: windows on GPU-group actors, decoding on chain-writer actors, latents as object references.

Each group is a placement group of ``gpus_per_group`` one-GPU bundles (STRICT_PACK: one node) with one worker
actor per bundle; the group loads the model once and stays warm across shots.  On a machine without GPUs the
same code creates CPU-emulated groups whose bundles ask for a custom ``skyray_slot`` resource instead of a GPU.

A window's three results (checkpoint bytes, hand-off, metadata) are separate objects: the next window's actor
receives the hand-off reference, the chain writer receives the checkpoint reference, and the driver fetches the
metadata and the checkpoint bytes (it stores them in the output location).  No actor is ever given a path.

Failures are sorted by whether a retry can succeed (``classify``).  A lost group is replaced in the background:
its new placement group waits for resources (a node that rejoins) while the other groups go on rendering.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import exceptions as rex
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from skyray.executors.base import Executor, ResourcesUnavailable, WindowError, WindowMeta, WriterLost
from skyray.executors.worker import WindowJob
from skyray.output.artifacts import ShotArtifacts
from skyray.scheduler import Failure

log = logging.getLogger("skyray.ray")
EMULATED_SLOT = "skyray_slot"
# Resources are waited for `start_timeout_s`; loading a model once they are there (a 14B checkpoint over a
# network volume) may take much longer, and is not what that timeout is about.
LOAD_TIMEOUT_S = 1800.0
MAX_START_FAILURES = 3  # a replacement group that fails to start this often will not start
# Errors that mean a process, node or object went away: a retry elsewhere can succeed.
_LOST_PROCESS = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.OutOfMemoryError,
                 rex.LocalRayletDiedError, rex.RaySystemError)
_LOST_OBJECT = (rex.ObjectLostError, rex.ObjectFetchTimedOutError)


def ensure_ray(address: str | None = None, quiet: bool = False) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, or one started with ``ray start`` on this machine);
    with none to join, start a local Ray whose CPU-emulated groups have slots to bind.  A cluster that is joined is
    never given ``resources=``: Ray refuses that, and the cluster's own resources are what they are."""
    if ray.is_initialized():
        return
    # quiet: workers' output stays in Ray's log files and Ray's own start-up messages below ERROR are not printed
    # (skyray.progress brings actors' progress and warnings to the driver as events instead).
    opts: dict[str, Any] = {"log_to_driver": not quiet, **({"logging_level": logging.ERROR} if quiet else {})}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], **opts)
        return
    try:
        ray.init(address="auto", **opts)
    except ConnectionError:
        ray.init(address="local", resources={EMULATED_SLOT: 64}, include_dashboard=False, **opts)


def classify(err: BaseException) -> Failure:
    """Whether a failed window can succeed on a retry, and whether its group is gone."""
    cause = err.cause if isinstance(err, rex.RayTaskError) and err.cause is not None else err
    if isinstance(err, _LOST_PROCESS) or isinstance(cause, _LOST_PROCESS):
        return Failure.GROUP_LOST
    if isinstance(err, _LOST_OBJECT) or isinstance(cause, _LOST_OBJECT):
        return Failure.INPUT_LOST
    if _is_collective_error(cause):
        # A collective broken by a dead peer fails on the live ranks too: the group must be rebuilt whole.
        return Failure.GROUP_LOST
    return Failure.FATAL


def _is_collective_error(err: BaseException) -> bool:
    import torch.distributed as dist

    backend = getattr(dist, "DistBackendError", None)
    if backend is not None and isinstance(err, backend):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(k in text for k in ("Gloo", "gloo", "NCCL", "Connection reset",
                                                                       "Connection closed by peer"))


def check_model_on_nodes(model: str, timeout_s: float = 60.0) -> None:
    """A ``model:`` folder must be readable on every node that may run a group or a writer: check now, before any
    window renders, and name the node and the path that fail."""
    from skyray.models import TINY, local_model_folder

    folder = local_model_folder(model) if model != TINY else None
    if folder is None:
        return

    @ray.remote(num_cpus=0)
    def probe(path: str) -> tuple[str, bool]:
        from pathlib import Path

        from skyray.executors.distributed import node_ip

        return node_ip(), (Path(path) / "model_index.json").is_file()

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(folder)
            for n in nodes]
    bad = [ip for ip, ok in ray.get(refs, timeout=timeout_s) if not ok]
    if bad:
        raise FileNotFoundError(
            f"model folder {folder!r} is not readable on node(s) {', '.join(sorted(set(bad)))}: every node of the "
            f"cluster must see it (a shared volume), or use a hub id or an object-store URI (s3://...) that each "
            f"node loads itself")


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

    def ping(self) -> str:
        return self.name

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
        if progress:  # rows and warnings go to the driver's display as events, never through stdout
            from skyray.progress import ActorReporter

            reporter = ActorReporter(self.name)
            reporter.forward_logs()
            if rank == 0:
                self.worker.on_row = reporter.row
        return self.name

    def render_window(self, job: WindowJob, handoff: Any):
        from skyray.executors.local import render_to_checkpoint

        checkpoint, hand, meta = render_to_checkpoint(self.worker, job, handoff)
        log.info("%s: shot %s window %d/%d in %.2f s (%d forwards)", self.name, job.shot_id, meta.index + 1,
                 job.windows, meta.seconds, meta.forwards)
        return checkpoint, hand, meta.__dict__


class _ChainWriterActor:
    def __init__(self, model: str, width: int, height: int, fps: int, device: str = "cpu") -> None:
        from skyray import models
        from skyray.output.chain_writer import ChainWriter

        self.writer = ChainWriter(models.load_vae(model, device), width, height, fps)

    def ping(self) -> bool:
        return True

    def begin(self, shot_id, parent, history, keep_history) -> None:
        self.writer.begin(shot_id, parent, history, keep_history)

    def add(self, shot_id, checkpoint: bytes) -> int:
        return self.writer.add(shot_id, checkpoint)

    def finish(self, shot_id, keep_state) -> ShotArtifacts:
        return self.writer.finish(shot_id, keep_state)

    def forget(self, shot_id) -> None:
        self.writer.forget(shot_id)

    def abort_all(self) -> None:
        self.writer.abort_all()


@dataclass
class _Group:
    index: int
    pg: Any
    actors: list[Any]
    generation: int = 0


@dataclass
class _Replacement:
    """A lost group's new placement group, waiting for resources."""

    pg: Any
    generation: int
    since: float = field(default_factory=time.monotonic)
    failed_starts: int = 0


@dataclass(frozen=True)
class RayHandle:
    group: int
    checkpoint: Any
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
        ensure_ray(address, quiet=True)  # never workers' stdout on the driver's terminal: see skyray.progress
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
        check_model_on_nodes(model)
        self._groups: dict[int, _Group] = {}
        self._replacing: dict[int, _Replacement] = {}
        self._start_errors: dict[int, str] = {}
        try:
            for g in range(groups):
                self._groups[g] = self._start_group(g, self._reserve(g))
        except Exception:
            self.shutdown()
            raise
        self._writers: dict[int, Any] = {}
        self._writer_size: tuple[int, int, int] | None = None
        self._chain_writer: dict[int, int] = {}
        self._pending_adds: dict[int, list[Any]] = {}
        self._state: dict[int, set[str]] = {}  # writer slot -> shots whose final decoder state it holds
        self.recoveries = 0
        self.writer_restarts = 0

    # ------------------------------------------------------------------------------------------------ groups
    def _bundle(self) -> dict[str, float]:
        return {"GPU": 1, "CPU": 1} if self.use_gpu else {EMULATED_SLOT: 1}

    def _needs(self) -> str:
        return f"{self.gpus_per_group} x {self._bundle()} on one node (STRICT_PACK)"

    def replacing(self) -> int:
        return len(self._replacing)

    def missing(self) -> str:
        failed = "".join(f"; group {g} failed to start: {e}" for g, e in sorted(self._start_errors.items()))
        return (f"{len(self._replacing)} group(s) wait for {self._needs()}; the cluster has "
                f"{_rounded(ray.available_resources())} free of {_rounded(ray.cluster_resources())}{failed}")

    def _reserve(self, index: int):
        """A ready placement group for group ``index``, or a clear error within ``start_timeout_s``."""
        pg = self._external_pg or placement_group([self._bundle() for _ in range(self.gpus_per_group)],
                                                  strategy="STRICT_PACK")
        try:
            ray.get(pg.ready(), timeout=self.start_timeout_s)
        except rex.GetTimeoutError as err:
            self._release(pg)
            raise ResourcesUnavailable(
                f"could not reserve group {index} ({self._needs()}) within {self.start_timeout_s:.0f} s; the "
                f"cluster has {_rounded(ray.available_resources())} free of {_rounded(ray.cluster_resources())}"
            ) from err
        return pg

    def _start_group(self, index: int, pg, generation: int = 0) -> _Group:
        from skyray.executors.distributed import assign_ranks, collective_env, node_ip

        k = self.gpus_per_group
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
                        timeout=LOAD_TIMEOUT_S)
            else:
                # vLLM's recipe: ranks sorted by node (the driver's first) and GPU id, rendezvous on rank 0's node.
                ranks = assign_ranks(ray.get([a.placement.remote() for a in actors]), driver_ip=node_ip())
                actors = [a for _, a in sorted(zip((r.rank for r in ranks), actors), key=lambda x: x[0])]
                ranks = sorted(ranks, key=lambda r: r.rank)
                method = ray.get(actors[0].rendezvous.remote())
                ray.get([a.setup.remote(r.rank, k, method, self.layout, self.guidance, env,
                                        self.collective_timeout_s, r.local_rank, self.progress)
                         for a, r in zip(actors, ranks)],
                        timeout=LOAD_TIMEOUT_S)
        except Exception:
            for a in actors:
                ray.kill(a, no_restart=True)
            self._release(pg)
            raise
        return _Group(index, pg, actors, generation)

    def _release(self, pg) -> None:
        if pg is not self._external_pg:
            try:
                remove_placement_group(pg)
            except Exception:  # already gone with its node
                pass

    def recover(self, group: int, error: BaseException) -> bool:
        old = self._groups.pop(group, None)
        if old is None:
            return group in self._replacing
        log.warning("group %d failed (%s); replacing it", group, str(error).splitlines()[0] if str(error) else error)
        for a in old.actors:
            ray.kill(a, no_restart=True)
        if self._external_pg is not None:
            # The bundles belong to a Serve replica: they are still reserved, so the group restarts in them now.
            try:
                self._groups[group] = self._start_group(group, self._external_pg, old.generation + 1)
            except Exception as err:
                log.error("could not recreate group %d: %s", group, err)
                return False
            self.recoveries += 1
            self._replacing[group] = _Replacement(self._external_pg, old.generation + 1)
            return True
        self._release(old.pg)
        pg = placement_group([self._bundle() for _ in range(self.gpus_per_group)], strategy="STRICT_PACK")
        self._replacing[group] = _Replacement(pg, old.generation + 1)
        return True

    def ready_groups(self) -> list[int]:
        """Replacements whose resources are there (the start of their actors blocks while they load)."""
        out = []
        for g, rep in list(self._replacing.items()):
            if g in self._groups:  # restarted in place (external placement group)
                del self._replacing[g]
                out.append(g)
                continue
            ready, _ = ray.wait([rep.pg.ready()], timeout=0)
            if not ready:
                continue
            try:
                self._groups[g] = self._start_group(g, rep.pg, rep.generation)
            except Exception as err:
                if rep.failed_starts + 1 >= MAX_START_FAILURES:  # it fails the same way each time: give up
                    log.error("replacement of group %d failed to start %d times: %s", g, rep.failed_starts + 1, err)
                    del self._replacing[g]
                    self._start_errors[g] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    continue
                # Lost again while starting (its node went too): try again with a fresh reservation.
                log.warning("replacement of group %d failed to start (%s); retrying", g, err)
                self._replacing[g] = _Replacement(
                    placement_group([self._bundle() for _ in range(self.gpus_per_group)], strategy="STRICT_PACK"),
                    rep.generation + 1, failed_starts=rep.failed_starts + 1)
                continue
            del self._replacing[g]
            self.recoveries += 1
            out.append(g)
        return out

    def actors(self, group: int) -> list[Any]:
        return list(self._groups[group].actors)

    def group_nodes(self) -> dict[int, str]:
        """Node id of each live group (rank 0's)."""
        return {g: ray.get(grp.actors[0].placement.remote()).node_id for g, grp in self._groups.items()}

    # ------------------------------------------------------------------------------------------------ windows
    def submit(self, group: int, job: WindowJob, handoff: Any) -> RayHandle:
        # Every rank runs the same window (they split each forward); rank 0's results are the window's.
        refs = [a.render_window.options(num_returns=3).remote(job, handoff) for a in self._groups[group].actors]
        ckpt, hand, meta = refs[0]
        return RayHandle(group, ckpt, hand, meta, tuple(r[2] for r in refs[1:]))

    def wait_any(self, handles: list[RayHandle], timeout: float | None = None) -> RayHandle | None:
        by_ref = {}
        for h in handles:
            for ref in (h.meta, *h.others):
                by_ref[ref] = h
        done, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if not done:
            return None
        h = by_ref[done[0]]
        self._check(h)
        return h

    def _check(self, h: RayHandle) -> None:
        """Raise ``WindowError`` if any rank of the window failed; a dead rank wins over the errors it caused."""
        failures = []
        refs = [h.meta, *h.others]
        pending = refs
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self.collective_timeout_s + 30)
            if not ready:
                failures.append((Failure.GROUP_LOST, TimeoutError(f"group {h.group} stopped answering")))
                break
            try:
                ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 - classified below
                failures.append((classify(err), err))
                if failures[-1][0] is Failure.GROUP_LOST:
                    break  # the other ranks are stuck in a collective with the dead one: no need to wait
        if not failures:
            return
        order = [Failure.GROUP_LOST, Failure.INPUT_LOST, Failure.FATAL]
        failure, err = min(failures, key=lambda f: order.index(f[0]))
        if failure is Failure.INPUT_LOST and not self._alive(h.group):
            failure = Failure.GROUP_LOST
        raise WindowError(h, _root(err), failure)

    def _alive(self, group: int) -> bool:
        grp = self._groups.get(group)
        if grp is None:
            return False
        try:
            ray.get([a.ping.remote() for a in grp.actors], timeout=30)
            return True
        except Exception:
            return False

    def result(self, handle: RayHandle) -> tuple[WindowMeta, bytes]:
        try:
            meta, checkpoint = ray.get([handle.meta, handle.checkpoint])
        except Exception as err:  # the window's node died between finishing and this fetch
            failure = classify(err)
            if failure is Failure.INPUT_LOST and not self._alive(handle.group):
                failure = Failure.GROUP_LOST
            raise WindowError(handle, _root(err), failure) from err
        return WindowMeta(**meta), checkpoint

    def handoff(self, handle: RayHandle) -> Any:
        return handle.handoff

    # ------------------------------------------------------------------------------------------------ writers
    def open_chain(self, chain: int, width: int, height: int, fps: int) -> None:
        # A small pool of writer actors (each holds one VAE) serves all chains; a chain always uses the same one,
        # whose calls run in submission order, so its shots decode in order.
        self._writer_size = (width, height, fps)
        slot = chain % self.max_writers
        if slot not in self._writers:
            self._writers[slot] = self._new_writer()
            self._pending_adds[slot] = []
            self._state[slot] = set()
        self._chain_writer[chain] = slot

    def _new_writer(self):
        # Writers decode on the CPU unless given a share of a GPU (decode_gpu): the fp32 VAE at 540p wants one.
        opts: dict[str, Any] = {"num_cpus": 0 if not self.use_gpu else 1, "max_restarts": 0}
        device = "cpu"
        if self.use_gpu and self.decode_gpu > 0:
            opts["num_gpus"], device = self.decode_gpu, "cuda"
        return ray.remote(_ChainWriterActor).options(**opts).remote(self.model, *self._writer_size, device)

    def _writer(self, chain: int):
        return self._writers[self._chain_writer[chain]]

    def begin_shot(self, chain, shot_id, parent, history, keep_history) -> None:
        ref = self._writer(chain).begin.remote(shot_id, parent, history, keep_history)
        self._pending_adds[self._chain_writer[chain]].append(ref)

    def add_window(self, chain, shot_id, window) -> None:
        ckpt = window if isinstance(window, bytes) else window.checkpoint
        ref = self._writer(chain).add.remote(shot_id, ckpt)
        self._pending_adds[self._chain_writer[chain]].append(ref)

    def finish_shot(self, chain, shot_id, keep_state) -> ShotArtifacts:
        slot = self._chain_writer[chain]
        try:
            result = ray.get(self._writers[slot].finish.remote(shot_id, keep_state))
            ray.get(self._pending_adds[slot])
        except _LOST_PROCESS as err:
            raise WriterLost(chain, err) from err
        except rex.RayTaskError as err:
            if isinstance(err.cause, _LOST_PROCESS):
                raise WriterLost(chain, err) from err
            raise
        self._pending_adds[slot] = []
        if keep_state:
            self._state[slot].add(shot_id)
        return result

    def has_state(self, chain: int, shot_id: str) -> bool:
        return shot_id in self._state.get(self._chain_writer.get(chain, -1), set())

    def forget_state(self, chain: int, shot_id: str) -> None:
        slot = self._chain_writer[chain]
        if shot_id in self._state[slot]:
            self._state[slot].discard(shot_id)
            self._writers[slot].forget.remote(shot_id)

    def restart_writer(self, chain: int) -> list[int]:
        slot = self._chain_writer[chain]
        log.warning("writer %d was lost; starting a new one and replaying its open shots", slot)
        ray.kill(self._writers[slot], no_restart=True)
        self._writers[slot] = self._new_writer()
        self._pending_adds[slot] = []
        self._state[slot] = set()
        self.writer_restarts += 1
        return [c for c, s in self._chain_writer.items() if s == slot]

    def reset_writers(self) -> None:
        for w in self._writers.values():
            ray.kill(w)
        self._writers.clear()
        self._chain_writer.clear()
        self._pending_adds.clear()
        self._state.clear()

    def writer_actor(self, chain: int):
        return self._writer(chain)

    def abort_open(self) -> None:
        refs = [w.abort_all.remote() for w in self._writers.values()]
        try:
            ray.get(refs, timeout=60)
        except Exception as err:  # a dead writer has nothing open any more
            log.warning("could not abort every open clip: %s", err)

    def shutdown(self) -> None:
        for w in getattr(self, "_writers", {}).values():
            ray.kill(w)
        self._writers = {}
        for g in self._groups.values():
            for a in g.actors:
                ray.kill(a)
            self._release(g.pg)
        self._groups.clear()
        for rep in self._replacing.values():
            self._release(rep.pg)
        self._replacing.clear()


def _root(err: BaseException) -> BaseException:
    """The user's exception inside a ``RayTaskError`` (its message is what the render reports)."""
    if isinstance(err, rex.RayTaskError) and isinstance(err.cause, BaseException):
        return err.cause
    return err


def _rounded(resources: dict) -> dict:
    """Resources a person asks for (placement groups' internal ``*_group_<id>`` entries and memory left out)."""
    return {k: round(v, 2) for k, v in sorted(resources.items())
            if not k.startswith(("node:", "memory", "object_store_memory", "bundle_group_")) and "_group_" not in k}
