"""Render a film plan: schedule windows on an executor, stream shots to clips, assemble the film.

The driver holds only small metadata and opaque handles.  A window can start once the window (or shot) it
continues from is done; independent chains and branches run side by side on free groups.  Every finished
window is checkpointed by its chain's writer, and every finished shot is recorded with a content hash, so an
interrupted render resumes where it stopped and a rerun reuses unchanged shots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyray.engine.sampler import SamplerConfig
from skyray.executors.base import Executor, WindowError
from skyray.executors.worker import WindowJob
from skyray.output.chain_writer import checkpoint_meta, checkpoint_path
from skyray.plan import FilmPlan, ShotPlan

Event = dict[str, Any]
MAX_RETRIES = 2


class RenderCancelled(RuntimeError):
    pass


class RenderFailed(RuntimeError):
    pass


@dataclass
class _Shot:
    plan: ShotPlan
    chain: int
    hash: str
    jobs: list[WindowJob]
    children: list[str] = field(default_factory=list)
    next: int = 0  # next window to submit
    last: Any = None  # handle of the last finished window
    windows: list[dict] = field(default_factory=list)
    started: float = 0.0
    done: bool = False
    reused: bool = False


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


def shot_jobs(plan: FilmPlan, shot: ShotPlan, keep_latents: int) -> list[WindowJob]:
    cfg = sampler_config(shot)
    n = len(shot.windows)
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
            image=shot.image if w.index == 0 else None,
            end_image=shot.end_image if w.suffix else None,
            video=shot.video if w.index == 0 else None,
            overlap_history=shot.sampling.overlap_history,
        )
        for w in shot.windows
    ]


def _file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shot_hashes(plan: FilmPlan) -> dict[str, str]:
    """Content hash of each resolved shot, its input files and (through its parent's hash) its incoming prefix."""
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
            for key in ("image", "end_image", "video"):
                record[key] = _file_digest(record[key])
            record.update(model=plan.model, size=[plan.width, plan.height], fps=plan.fps)
            record["parent"] = out.get(s.continues) if s.continues else None
            out[sid] = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return out


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("skyray", "torch", "diffusers", "transformers", "ray"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def render_film(
    plan: FilmPlan,
    out_dir: str | Path,
    executor: Executor,
    save_latents: bool = False,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Render ``plan`` into ``out_dir`` (a folder or a ``pyarrow.fs`` URI); returns the manifest."""
    from skyray.output.location import OutputLocation

    t_start = time.perf_counter()
    location = OutputLocation(out_dir)
    out = location.local
    location.pull()
    shots_dir, ckpt_dir = out / "shots", out / "checkpoints"
    shots_dir.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda e: None)
    hashes = shot_hashes(plan)

    state: dict[str, _Shot] = {}
    for chain in plan.chains:
        for sid in chain.shot_ids:
            sp = plan.shot(sid)
            children = [c.id for c in plan.shots if c.continues == sid]
            keep = max([sp.handoff_latents] + [plan.shot(c).first_prefix for c in children])
            state[sid] = _Shot(sp, chain.index, hashes[sid], shot_jobs(plan, sp, keep), children)

    for sid, st in state.items():
        rec = shots_dir / f"{sid}.json"
        if rec.is_file() and (shots_dir / f"{sid}.mp4").is_file():
            try:
                prior = json.loads(rec.read_text())
            except json.JSONDecodeError:
                continue
            tail_ok = not st.children or (shots_dir / f"{sid}.tail.safetensors").is_file()
            lat_ok = not save_latents or (shots_dir / f"{sid}.safetensors").is_file()
            if prior.get("hash") == st.hash and tail_ok and lat_ok:
                st.done = st.reused = True
                st.windows = prior.get("windows", [])
    emit({"type": "plan", "shots": len(plan.shots), "windows": sum(len(s.windows) for s in plan.shots),
          "reused": [s for s, st in state.items() if st.reused]})

    for chain in plan.chains:
        executor.open_chain(chain.index, plan.width, plan.height, plan.fps, str(shots_dir))

    free = list(range(executor.groups))
    in_flight: dict[int, tuple[Any, str, int]] = {}  # id(handle) -> (handle, shot, group)
    retries: dict[tuple[str, int], int] = {}
    results: dict[str, dict] = {}

    def ready_shots() -> list[_Shot]:
        out_ = []
        for st in state.values():
            if st.done or st.next >= len(st.jobs) or any(v[1] == st.plan.id for v in in_flight.values()):
                continue
            if st.next == 0:
                parent = state.get(st.plan.continues) if st.plan.continues else None
                if parent is not None and not parent.done:
                    continue
            out_.append(st)
        return out_

    def begin(st: _Shot) -> Any:
        parent = st.plan.continues
        parent_tail = None
        if parent:
            tail = shots_dir / f"{parent}.tail.safetensors"
            parent_tail = str(tail) if state[parent].reused else None
        executor.begin_shot(st.chain, st.plan.id, parent, parent_tail, save_latents)
        st.started = time.perf_counter()
        emit({"type": "shot_start", "shot": st.plan.id, "windows": len(st.jobs)})
        # Windows checkpointed by an interrupted run are replayed from disk, not recomputed.
        handoff: Any = None
        if parent:
            handoff = str(shots_dir / f"{parent}.tail.safetensors") if state[parent].reused else executor.handoff(state[parent].last)
        while st.next < len(st.jobs):
            ck = checkpoint_path(ckpt_dir, st.plan.id, st.next)
            meta = checkpoint_meta(ck) if ck.is_file() else {}
            if meta.get("hash") != st.hash:
                break
            executor.add_window(st.chain, st.plan.id, str(ck), None, {})
            st.windows.append({**meta.get("window_meta", {}), "resumed": True})
            handoff = str(ck)
            st.next += 1
        return handoff

    handoffs: dict[str, Any] = {}

    def submit(st: _Shot, group: int) -> None:
        if st.next == 0 or st.plan.id not in handoffs:
            handoffs[st.plan.id] = begin(st)
            if st.next >= len(st.jobs):
                finish(st)
                free.append(group)
                return
        job = st.jobs[st.next]
        h = executor.submit(group, job, handoffs[st.plan.id])
        in_flight[id(h)] = (h, st.plan.id, group)

    def finish(st: _Shot) -> None:
        res = executor.finish_shot(st.chain, st.plan.id, keep_state=bool(st.children))
        st.done = True
        record = {
            "id": st.plan.id,
            "hash": st.hash,
            "frames": res.frames,
            "seed": st.plan.seed,
            "windows": st.windows,
            "seconds": round(time.perf_counter() - st.started, 3),
            "decode_seconds": round(res.decode_seconds, 3),
            "path": os.path.relpath(res.path, out),
            "latents": os.path.relpath(res.latents_path, out) if res.latents_path else None,
        }
        if res.frames != st.plan.frames:
            raise RenderFailed(f"shot {st.plan.id!r} decoded to {res.frames} frames, the plan says {st.plan.frames}")
        _atomic_json(shots_dir / f"{st.plan.id}.json", record)
        shutil.rmtree(ckpt_dir / st.plan.id, ignore_errors=True)
        results[st.plan.id] = record
        location.push([f"shots/{st.plan.id}{ext}" for ext in (".mp4", ".tail.safetensors", ".safetensors", ".json")])
        emit({"type": "shot_done", "shot": st.plan.id, "frames": res.frames, "path": res.path})

    try:
        while True:
            if should_stop is not None and should_stop():
                raise RenderCancelled("render cancelled; finished shots and window checkpoints are kept")
            for st in ready_shots():
                if not free:
                    break
                submit(st, free.pop(0))
            if not in_flight:
                if all(st.done for st in state.values()):
                    break
                if not ready_shots():
                    raise RenderFailed("render stalled: shots remain but none can start")
                continue
            handles = [v[0] for v in in_flight.values()]
            try:
                h = executor.wait_any(handles)
            except WindowError as err:
                h = err.handle
                _, sid, group = in_flight.pop(id(h))
                st = state[sid]
                key = (sid, st.next)
                retries[key] = retries.get(key, 0) + 1
                if retries[key] > MAX_RETRIES or not executor.recover(group, err.cause):
                    raise RenderFailed(f"shot {sid!r} window {st.next} failed {retries[key]} time(s): {err.cause}") from err.cause
                emit({"type": "retry", "shot": sid, "window": st.next, "group": group, "error": str(err.cause)})
                # Resume from disk rather than from an object that may have died with the failed group.
                executor.flush(st.chain)
                prev = checkpoint_path(ckpt_dir, sid, st.next - 1)
                if st.next > 0 and prev.is_file():
                    handoffs[sid] = str(prev)
                job = st.jobs[st.next]
                nh = executor.submit(group, job, handoffs[sid])
                in_flight[id(nh)] = (nh, sid, group)
                continue
            _, sid, group = in_flight.pop(id(h))
            st = state[sid]
            meta = executor.meta(h)
            wmeta = {"index": meta.index, "seconds": round(meta.seconds, 3), "forwards": meta.forwards,
                     "worker": meta.worker, "retries": retries.get((sid, meta.index), 0)}
            st.windows.append(wmeta)
            ck = checkpoint_path(ckpt_dir, sid, meta.index)
            executor.add_window(st.chain, sid, h, str(ck), {"hash": st.hash, "shot": sid, "window": meta.index,
                                                            "window_meta": wmeta})
            handoffs[sid] = executor.handoff(h)
            st.last = h
            st.next += 1
            emit({"type": "window", "shot": sid, "window": meta.index, "windows": len(st.jobs),
                  "seconds": meta.seconds, "group": group})
            if st.next == len(st.jobs):
                finish(st)
            free.append(group)
    except BaseException:
        # Nothing half-written survives a failed or cancelled render; finished shots and checkpoints stay.
        executor.abort_open()
        raise

    shutil.rmtree(ckpt_dir, ignore_errors=True)
    film_path = _assemble(plan, out, state)
    manifest = _manifest(plan, out, state, results, film_path, time.perf_counter() - t_start, save_latents)
    _atomic_json(out / "manifest.json", manifest)
    location.push(["film.mp4", "contact_sheet.png", "manifest.json"])
    if location.remote:
        manifest["location"] = location.target
    emit({"type": "film_done", "path": str(film_path), "frames": manifest["film"]["frames"]})
    return manifest




def _assemble(plan: FilmPlan, out: Path, state: dict[str, _Shot]) -> Path:
    from skyray.output.contact_sheet import contact_sheet
    from skyray.output.encode import concat

    clips = [out / "shots" / f"{s.id}.mp4" for s in plan.shots]
    fades = [s.fade_in for s in plan.shots[1:]]
    film = concat(clips, out / "film.mp4", plan.fps, fades=fades if any(fades) else None)
    contact_sheet([(s.id, str(out / "shots" / f"{s.id}.mp4")) for s in plan.shots], out / "contact_sheet.png")
    return Path(film)


def _manifest(plan, out, state, results, film_path, seconds, save_latents) -> dict:
    from skyray.output.encode import probe

    info = probe(film_path)
    shots = []
    for s in plan.shots:
        st = state[s.id]
        rec = results.get(s.id)
        if rec is None:  # reused from an earlier run
            rec = json.loads((out / "shots" / f"{s.id}.json").read_text())
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
                "reused": st.reused,
                "render_seconds": rec.get("seconds"),
                "path": rec["path"],
                "latents": rec.get("latents") if save_latents else None,
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
        "versions": _versions(),
        "film": {"path": os.path.relpath(film_path, out), "frames": info.frames, "codec": info.codec, "fps": info.fps},
        "contact_sheet": "contact_sheet.png",
        "render_seconds": round(seconds, 3),
        "shots": shots,
    }
