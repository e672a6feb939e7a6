"""Render a film plan: the I/O around the scheduler.

``skyray.scheduler`` decides which window runs on which group; this module does what that takes: it reads the
storyboard's input files once (their bytes travel to the workers), submits windows to an executor, stores every
finished window's checkpoint and every finished shot in the output location, rebuilds what a lost group or writer
held, and assembles the film.  The output location is the one source of truth: a rerun reuses every shot whose
content hash still matches and resumes an interrupted shot from its last checkpointed window, from any machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyray.engine.sampler import SamplerConfig
from skyray.executors.base import Executor, WindowError, WriterLost
from skyray.executors.worker import WindowJob
from skyray.output.artifacts import checkpoint_rel, header_meta
from skyray.output.location import OutputLocation
from skyray.plan import FilmPlan, ShotPlan
from skyray.scheduler import Assignment, Failure, Scheduler

Event = dict[str, Any]
MAX_RETRIES = 2
GROUP_WAIT_S = 300.0  # how long a render with every group lost waits for resources before it stops
POLL_S = 0.25


class RenderCancelled(RuntimeError):
    pass


class RenderFailed(RuntimeError):
    pass


def sampler_config(shot: ShotPlan) -> SamplerConfig:
    s = shot.sampling
    return SamplerConfig(
        steps=s.steps,
        guidance_scale=s.guidance_scale,
        shift=s.shift,
        ar_step=s.ar_step,
        causal_block_size=s.causal_block_size,
        addnoise_condition=int(round(s.addnoise_condition)),
        fps=s.fps,
        causal_attention=s.causal_attention,
        batched_cfg=s.cfg_batch,
        teacache=s.teacache,
        compile=s.compile,
        attention=s.attention,
        offload=s.offload,
    )


def read_inputs(plan: FilmPlan) -> dict[str, bytes]:
    """The bytes of every input file the plan names, read once here on the driver."""
    paths = {p for s in plan.shots for p in (s.image, s.end_image, s.video) if p}
    return {p: Path(p).read_bytes() for p in sorted(paths)}


def shot_jobs(plan: FilmPlan, shot: ShotPlan, keep_latents: int, inputs: dict[str, bytes] | None = None,
              key: str = "") -> list[WindowJob]:
    cfg = sampler_config(shot)
    n = len(shot.windows)
    data = inputs if inputs is not None else read_inputs(plan)
    return [
        WindowJob(
            shot_id=shot.id,
            window=w.shape,
            windows=n,
            prompt=w.prompt,
            negative_prompt=shot.sampling.negative_prompt,
            sampler=cfg,
            seed=shot.seed,
            height=plan.height,
            width=plan.width,
            handoff_latents=keep_latents,
            image=data[shot.image] if shot.image and w.index == 0 else None,
            end_image=data[shot.end_image] if shot.end_image and w.suffix else None,
            video=data[shot.video] if shot.video and w.index == 0 else None,
            overlap_history=shot.sampling.overlap_history,
            key=key,
        )
        for w in shot.windows
    ]


def shot_hashes(plan: FilmPlan, inputs: dict[str, bytes] | None = None) -> dict[str, str]:
    """Content hash of each resolved shot, its input files and (through its parent's hash) its incoming prefix."""
    data = inputs if inputs is not None else read_inputs(plan)
    out: dict[str, str] = {}
    for chain in plan.chains:
        for sid in chain.shot_ids:
            s = plan.shot(sid)
            record = dataclasses.asdict(s)
            record.pop("index")
            # How a shot is computed, not what it shows: changing these reuses finished shots.
            for knob in ("cfg_batch", "compile", "attention", "offload"):
                record["sampling"].pop(knob, None)
            record.pop("original_prompts")  # a record of what was written; the pixels follow `prompts`
            for k in ("image", "end_image", "video"):
                record[k] = hashlib.sha256(data[record[k]]).hexdigest() if record[k] else None
            record.update(model=plan.model, size=[plan.width, plan.height], fps=plan.fps)
            record["parent"] = out.get(s.continues) if s.continues else None
            out[sid] = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("skyray", "torch", "diffusers", "transformers", "ray"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class _Shot:
    """What the driver keeps for one shot: small metadata and opaque handles only."""

    plan: ShotPlan
    chain: int
    hash: str
    jobs: list[WindowJob]
    children: list[str]
    windows: list[dict] = field(default_factory=list)  # per finished window: seconds, worker, retries...
    last: Any = None  # handle of the shot's last finished window in this run
    started: float = 0.0
    record: dict | None = None


class FilmRender:
    """One render of one plan into one location (``render_film`` is its entry point)."""

    def __init__(self, plan: FilmPlan, location: OutputLocation, executor: Executor, save_latents: bool,
                 keep_history: bool,
                 emit: Callable[[Event], None], should_stop: Callable[[], bool] | None,
                 group_wait_s: float, on_checkpoint: Callable[[str, int, bytes], None] | None = None) -> None:
        self.plan, self.loc, self.ex = plan, location, executor
        self.save_latents = save_latents
        self.keep_history = keep_history or save_latents  # every shot's decode history, not only parents'
        self.emit = emit
        self.should_stop = should_stop or (lambda: False)
        self.group_wait_s = group_wait_s
        self.on_checkpoint = on_checkpoint or (lambda shot, window, data: None)
        inputs = read_inputs(plan)
        hashes = shot_hashes(plan, inputs)
        self.shots: dict[str, _Shot] = {}
        for chain in plan.chains:
            for sid in chain.shot_ids:
                sp = plan.shot(sid)
                children = [c.id for c in plan.shots if c.continues == sid]
                keep = max([sp.handoff_latents] + [plan.shot(c).first_prefix for c in children])
                self.shots[sid] = _Shot(sp, chain.index, hashes[sid], shot_jobs(plan, sp, keep, inputs, hashes[sid]),
                                        children)
        self.sched = Scheduler.build(((s.plan.id, len(s.jobs), s.plan.continues) for s in self.shots.values()),
                                     executor.groups, MAX_RETRIES)
        self.in_flight: dict[int, tuple[Any, Assignment]] = {}

    # ----------------------------------------------------------------------------------------- what is there
    def _record(self, sid: str) -> dict | None:
        data = self.loc.read_bytes(f"shots/{sid}.json")
        try:
            return json.loads(data) if data else None
        except json.JSONDecodeError:
            return None

    def find_finished(self) -> None:
        """Reuse shots whose record, clip and (where needed) tail and history are in the location; resume the
        others from their checkpointed windows."""
        for sid, st in self.shots.items():
            prior = self._record(sid)
            if prior and prior.get("hash") == st.hash and self.loc.exists(f"shots/{sid}.mp4"):
                needs = [f"shots/{sid}.tail.safetensors"] if st.children else []
                if st.children or self.keep_history:
                    needs.append(f"shots/{sid}.safetensors")
                if all(self.loc.exists(rel) for rel in needs):
                    self.sched.reuse(sid)
                    st.windows, st.record = prior.get("windows", []), prior
                    continue
            metas: list[dict] = []  # the run of checkpointed windows of this very shot, from window 0
            while len(metas) < len(st.jobs):
                meta = self._checkpoint_meta(sid, len(metas))
                if meta.get("hash") != st.hash:
                    break
                metas.append(meta)
            if metas:
                self.sched.resume(sid, len(metas))
                st.windows = [{**self._window_record(m), "resumed": True} for m in metas]

    def _checkpoint_meta(self, sid: str, index: int) -> dict:
        rel = checkpoint_rel(sid, index)
        if not self.loc.exists(rel):
            return {}
        try:
            with self.loc.open_input(rel) as f:
                return header_meta(f)
        except (ValueError, OSError, json.JSONDecodeError):
            return {}

    @staticmethod
    def _window_record(meta: dict, retries: int = 0) -> dict:
        return {"index": meta.get("window"), "seconds": meta.get("seconds"), "forwards": meta.get("forwards"),
                "worker": meta.get("worker"), "retries": retries}

    # --------------------------------------------------------------------------------------------- the loop
    def run(self) -> dict:
        t_start = time.perf_counter()
        self.find_finished()
        self.emit({"type": "plan", "shots": len(self.plan.shots), "windows": sum(len(s.windows) for s in self.plan.shots),
                   "reused": [sid for sid, t in self.sched.shots.items() if t.reused]})
        self.ex.reset_writers()  # writers hold one film's size and decoder states: every film gets its own
        for chain in self.plan.chains:
            self.ex.open_chain(chain.index, self.plan.width, self.plan.height, self.plan.fps)
        blocked_since: float | None = None
        try:
            while not self.sched.finished:
                self._check_stop()
                for g in self.ex.ready_groups():
                    self.sched.group_ready(g)
                    self.emit({"type": "group_ready", "group": g})
                for t in self.sched.closable():
                    self._finish(self.shots[t.id])
                self._check_stop()
                for a in self.sched.assign():
                    self._submit(a)
                if self.sched.blocked():
                    blocked_since = blocked_since or time.monotonic()
                    if not self.sched.lost_groups():
                        raise RenderFailed("render stalled: shots remain but none can start")
                    if not self.ex.replacing():
                        raise RenderFailed(f"every group was lost and none can be replaced: {self.ex.missing()}")
                    if time.monotonic() - blocked_since > self.group_wait_s:
                        raise RenderFailed(f"every group was lost and none could be replaced within "
                                           f"{self.group_wait_s:.0f} s: {self.ex.missing()}")
                    time.sleep(POLL_S)
                    continue
                blocked_since = None
                if self.in_flight:
                    self._wait()
        except BaseException:
            # Nothing half-written survives a failed or cancelled render; finished shots and checkpoints stay.
            self.ex.abort_open()
            self.ex.reset_writers()
            raise
        self.ex.reset_writers()
        self.loc.delete_tree("checkpoints")
        manifest = self._assemble(time.perf_counter() - t_start)
        self.emit({"type": "film_done", "path": manifest["film"]["path"], "frames": manifest["film"]["frames"]})
        return manifest

    def _check_stop(self) -> None:
        if self.should_stop():
            raise RenderCancelled("render cancelled; finished shots and window checkpoints are kept")

    def _handoff(self, st: _Shot, a: Assignment) -> Any:
        """What window ``a.window`` continues from: an in-memory handle of this run, else stored bytes."""
        if a.window > 0:
            if st.last is not None and not a.retry:
                return self.ex.handoff(st.last)
            return self._stored(checkpoint_rel(st.plan.id, a.window - 1))
        parent = st.plan.continues
        if parent is None:
            return None
        pst = self.shots[parent]
        if pst.last is not None and not a.retry:
            return self.ex.handoff(pst.last)
        return self._stored(f"shots/{parent}.tail.safetensors")

    def _stored(self, rel: str) -> bytes:
        data = self.loc.read_bytes(rel)
        if data is None:
            raise RenderFailed(f"{rel} is missing from {self.loc.redacted}: the render cannot continue from it")
        return data

    def _submit(self, a: Assignment) -> None:
        st = self.shots[a.shot]
        if not self.sched.shots[a.shot].opened:
            self._open(st)
        h = self.ex.submit(a.group, st.jobs[a.window], self._handoff(st, a))
        self.in_flight[id(h)] = (h, a)

    def _history(self, sid: str) -> list[bytes]:
        """Decode histories of ``sid`` and its ancestors, root first (rebuilds a lost decoder state)."""
        chain = []
        while sid is not None:
            chain.append(self._stored(f"shots/{sid}.safetensors"))
            sid = self.shots[sid].plan.continues
        return chain[::-1]

    def _open(self, st: _Shot) -> None:
        """Begin the shot's clip on its writer, and replay any windows already checkpointed."""
        sid, parent = st.plan.id, st.plan.continues
        history = None
        if parent is not None and not self.ex.has_state(st.chain, parent):
            history = self._history(parent)
        self.ex.begin_shot(st.chain, sid, parent, history, self.keep_history or bool(st.children))
        self.sched.shot_opened(sid)
        if not st.started:
            st.started = time.perf_counter()
            self.emit({"type": "shot_start", "shot": sid, "windows": len(st.jobs)})
        for i in range(self.sched.shots[sid].next):
            self.ex.add_window(st.chain, sid, self._stored(checkpoint_rel(sid, i)))
        if parent is not None and all(self.sched.shots[c].opened or self.sched.shots[c].done
                                      for c in self.shots[parent].children):
            self.ex.forget_state(st.chain, parent)

    def _wait(self) -> None:
        handles = [h for h, _ in self.in_flight.values()]
        try:
            h = self.ex.wait_any(handles, timeout=POLL_S)
            if h is None:
                return
            meta, checkpoint = self.ex.result(h)
        except WindowError as err:
            self._failed(err)
            return
        _, a = self.in_flight.pop(id(h))
        st = self.shots[a.shot]
        self.loc.write_bytes(checkpoint_rel(a.shot, a.window), checkpoint)
        self.on_checkpoint(a.shot, a.window, checkpoint)
        self.ex.add_window(st.chain, a.shot, h)
        st.last = h
        retries = self.sched.attempts.get((a.shot, a.window), 0)
        st.windows.append({"index": meta.index, "seconds": round(meta.seconds, 3), "forwards": meta.forwards,
                           "worker": meta.worker, "retries": retries})
        self.sched.window_done(a.shot, a.window)
        self.emit({"type": "window", "shot": a.shot, "window": meta.index, "windows": len(st.jobs),
                   "seconds": meta.seconds, "group": a.group})

    def _failed(self, err: WindowError) -> None:
        _, a = self.in_flight.pop(id(err.handle))
        retry = self.sched.window_failed(a.shot, a.window, err.failure)
        n = self.sched.attempts.get((a.shot, a.window), 0)
        if not retry:
            why = "will fail again" if err.failure is Failure.FATAL else f"failed {n} time(s)"
            raise RenderFailed(f"shot {a.shot!r} window {a.window} {why}: {err.cause}") from err.cause
        if err.failure is Failure.GROUP_LOST and not self.ex.recover(a.group, err.cause):
            self.sched.group_lost(a.group)  # stays lost: the render goes on with the groups it has
        self.emit({"type": "retry", "shot": a.shot, "window": a.window, "group": a.group,
                   "failure": err.failure.value, "error": str(err.cause).splitlines()[0] if str(err.cause) else ""})

    def _finish(self, st: _Shot) -> None:
        sid = st.plan.id
        if not self.sched.shots[sid].opened:  # every window was checkpointed by an interrupted run
            self._open(st)
        for attempt in range(MAX_RETRIES + 2):
            try:
                res = self.ex.finish_shot(st.chain, sid, keep_state=bool(st.children))
                break
            except WriterLost as err:
                # The replacement may land on a node that is going too: replace it again, a bounded number of times.
                if attempt == MAX_RETRIES + 1:
                    raise RenderFailed(f"shot {sid!r}: its writer was lost {attempt + 1} times: {err.cause}") from err
                self.emit({"type": "writer_lost", "chain": err.chain, "error": str(err.cause).splitlines()[0]})
                for chain in self.ex.restart_writer(st.chain):
                    for t in self.sched.open_shots():
                        if self.shots[t.id].chain == chain:
                            self._open(self.shots[t.id])
        if res.frames != st.plan.frames:
            raise RenderFailed(f"shot {sid!r} decoded to {res.frames} frames, the plan says {st.plan.frames}")
        self.loc.write_bytes(f"shots/{sid}.mp4", res.clip)
        if res.history is not None:
            self.loc.write_bytes(f"shots/{sid}.safetensors", res.history)
        if res.tail is not None:
            self.loc.write_bytes(f"shots/{sid}.tail.safetensors", res.tail)
        st.record = {
            "id": sid,
            "hash": st.hash,
            "frames": res.frames,
            "seed": st.plan.seed,
            "windows": st.windows,
            "seconds": round(time.perf_counter() - st.started, 3),
            "decode_seconds": round(res.decode_seconds, 3),
            "path": f"shots/{sid}.mp4",
            "latents": f"shots/{sid}.safetensors" if res.history is not None else None,
        }
        # The record goes last: its presence says the shot's files are all there.
        self.loc.write_bytes(f"shots/{sid}.json", json.dumps(st.record, indent=2).encode())
        self.loc.delete_tree(f"checkpoints/{sid}")
        self.sched.shot_done(sid)
        self.emit({"type": "shot_done", "shot": sid, "frames": res.frames, "path": f"shots/{sid}.mp4"})

    # -------------------------------------------------------------------------------------------- the film
    def _assemble(self, seconds: float) -> dict:
        from skyray.output.contact_sheet import contact_sheet
        from skyray.output.encode import concat, probe

        plan, loc = self.plan, self.loc
        clips = [loc.local_copy(f"shots/{s.id}.mp4") for s in plan.shots]
        scratch = loc.scratch()
        fades = [s.fade_in for s in plan.shots[1:]]
        film = Path(concat(clips, scratch / "film.mp4", plan.fps, fades=fades if any(fades) else None))
        sheet = scratch / "contact_sheet.png"
        contact_sheet([(s.id, str(c)) for s, c in zip(plan.shots, clips)], sheet)
        info = probe(film)
        loc.upload("film.mp4", film)
        loc.upload("contact_sheet.png", sheet)
        manifest = self._manifest(info, seconds)
        loc.write_bytes("manifest.json", json.dumps(manifest, indent=2, default=str).encode())
        loc.clear_scratch()
        return manifest

    def _manifest(self, info, seconds: float) -> dict:
        plan = self.plan
        shots = []
        for s in plan.shots:
            st, task = self.shots[s.id], self.sched.shots[s.id]
            rec = st.record or {}
            shots.append(
                {
                    "id": s.id,
                    "frames": s.frames,
                    "seconds": round(s.seconds, 3),
                    "seed": s.seed,
                    "continues": s.continues,
                    "prompts": list(s.prompts),
                    "original_prompts": list(s.original_prompts) if s.original_prompts else None,
                    "settings": dataclasses.asdict(s.sampling),
                    "windows": [dataclasses.asdict(w) | (st.windows[i] if i < len(st.windows) else {})
                                for i, w in enumerate(s.windows)],
                    "reused": task.reused,
                    "render_seconds": rec.get("seconds"),
                    "path": rec.get("path", f"shots/{s.id}.mp4"),
                    "latents": rec.get("latents") if self.save_latents else None,
                    "hash": st.hash,
                }
            )
        return {
            "title": plan.title,
            "storyboard_hash": plan.storyboard_hash,
            "model": plan.model,
            "family": plan.family,
            "resolution": {"width": plan.width, "height": plan.height},
            "fps": plan.fps,
            "location": self.loc.redacted,
            "versions": _versions(),
            "warnings": list(plan.warnings),
            "film": {"path": "film.mp4", "frames": info.frames, "codec": info.codec, "fps": info.fps},
            "contact_sheet": "contact_sheet.png",
            "render_seconds": round(seconds, 3),
            "retries": sum(w.get("retries", 0) for st in self.shots.values() for w in st.windows),
            "shots": shots,
        }


def render_film(
    plan: FilmPlan,
    out: str | Path | OutputLocation,
    executor: Executor,
    save_latents: bool = False,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    group_wait_s: float = GROUP_WAIT_S,
    on_checkpoint: Callable[[str, int, bytes], None] | None = None,
    keep_history: bool = False,
) -> dict:
    """Render ``plan`` into ``out`` (a folder, a ``pyarrow.fs`` URI or a location); returns the manifest.

    ``keep_history`` keeps every shot's decode history (``shots/<id>.safetensors``) so that a later film may
    continue any of them exactly (Serve's ``continue_from``); otherwise only shots with children keep it."""
    location = out if isinstance(out, OutputLocation) else OutputLocation(out)
    render = FilmRender(plan, location, executor, save_latents, keep_history, on_event or (lambda e: None), should_stop,
                        group_wait_s, on_checkpoint)
    return render.run()
