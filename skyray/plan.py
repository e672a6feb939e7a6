"""Storyboard -> plan: the chains, shots and windows a film renders as, and what each costs.

Pure arithmetic on a resolved :class:`~skyray.storyboard.Storyboard`; nothing here loads a model.  Executors render
``FilmPlan.chains`` (a chain is a tree of shots linked by continuation: a child needs its parent's final latents),
and the ``plan`` command prints :func:`format_plan` so a film's cost is known before a GPU is touched.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from skyray import memory
from skyray.engine import schedule
from skyray.storyboard import Storyboard, video_prefix_latents

if TYPE_CHECKING:
    from skyray.models import ModelFamily


@dataclass(frozen=True)
class Sampling:
    """Resolved settings of one shot (film defaults with the shot's overrides applied)."""

    steps: int
    guidance_scale: float
    shift: float
    base_num_frames: int
    overlap_history: int
    addnoise_condition: float
    ar_step: int
    causal_block_size: int
    causal_attention: bool
    negative_prompt: str
    fps: int
    # Acceleration (skyray.engine.sampler.SamplerConfig): cfg_batch, compile and attention move the latents only by
    # floating-point rounding, offload not at all; TeaCache approximates (skipped block stacks).
    cfg_batch: bool = True
    teacache: float = 0.0  # threshold; 0: off
    compile: bool = False
    attention: str = "sdpa"
    offload: bool = False

    @property
    def base_latents(self) -> int:
        return schedule.latent_frames(self.base_num_frames)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1


@dataclass(frozen=True)
class WindowPlan:
    """One window: ``prefix`` clean latents, ``new`` to denoise, ``suffix`` clean (an end image), and its cost."""

    index: int
    prefix: int
    new: int
    suffix: int
    prompt: str
    rows: int
    forwards: int
    tflops: float

    @property
    def total(self) -> int:
        return self.prefix + self.new + self.suffix

    @property
    def shape(self) -> schedule.WindowShape:
        return schedule.WindowShape(self.index, self.prefix, self.new, self.suffix)


@dataclass(frozen=True)
class ShotPlan:
    id: str
    index: int
    seed: int
    frames: int
    new_latents: int
    continues: str | None  # id of the shot whose final latents open this one
    handoff_latents: int  # latents passed window to window (and to shots continuing this one)
    first_prefix: int  # clean latents opening the first window: 0 fresh, 1 image, handoff, or video tail
    image: str | None
    end_image: str | None
    video: str | None
    video_frames: int | None
    fade_in: float  # seconds of transition into this shot (cuts only)
    prompts: tuple[str, ...]
    sampling: Sampling
    windows: tuple[WindowPlan, ...]
    enhance: bool
    duration: float | None = None  # the seconds asked for, when the shot gave a duration instead of frames
    original_prompts: tuple[str, ...] | None = None  # as written, when the prompt enhancer rewrote ``prompts``

    @property
    def seconds(self) -> float:
        return self.frames / self.sampling.fps

    @property
    def total_latents(self) -> int:
        """Latents the shot ends with (its prefix included): what a continuing shot takes its handoff from."""
        return self.first_prefix + self.new_latents

    @property
    def last_window_latents(self) -> int:
        """Latents of the last window a continuing shot can take its prefix from (prefix + new, no suffix)."""
        last = self.windows[-1]
        return last.prefix + last.new

    @property
    def forwards(self) -> int:
        return sum(w.forwards for w in self.windows)

    @property
    def tflops(self) -> float:
        return sum(w.tflops for w in self.windows)


@dataclass(frozen=True)
class Chain:
    """Shots linked by continuation, parents before children (a shot continued by several makes it a tree)."""

    index: int
    shot_ids: tuple[str, ...]


@dataclass(frozen=True)
class FilmPlan:
    title: str
    model: str
    width: int
    height: int
    fps: int
    seed: int
    shots: tuple[ShotPlan, ...]  # storyboard order
    chains: tuple[Chain, ...]
    storyboard_hash: str
    family: str
    warnings: tuple[str, ...] = ()
    memory: MemoryPlan | None = None  # per-rank GPU memory, from fit_memory

    def shot(self, id: str) -> ShotPlan:
        for s in self.shots:
            if s.id == id:
                return s
        raise KeyError(f"no shot {id!r} in the plan (shots: {', '.join(s.id for s in self.shots)})")

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.shots)

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    @property
    def forwards(self) -> int:
        return sum(s.forwards for s in self.shots)

    @property
    def tflops(self) -> float:
        return sum(s.tflops for s in self.shots)


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak GPU memory of one rank for every shot (``skyray.memory``), within ``gpu_memory``."""

    gpu_memory: int  # bytes per GPU
    layout: memory.Layout
    shots: tuple[tuple[str, memory.Estimate], ...]  # storyboard order, with the CFG mode each shot renders with
    sequential_cfg: tuple[str, ...] = ()  # guided shots switched to sequential CFG because batch 2 would not fit

    @property
    def peak(self) -> tuple[str, memory.Estimate]:
        return max(self.shots, key=lambda kv: kv[1].peak)


@functools.lru_cache(maxsize=1024)
def _rows(steps: int, prefix: int, new: int, suffix: int, ar_step: int, causal_block_size: int) -> int:
    return schedule.step_matrix(list(range(steps, 0, -1)), prefix, new, suffix, ar_step, causal_block_size).rows


def compile_plan(storyboard: Storyboard) -> FilmPlan:
    """Turn a resolved storyboard into chains, shots and windows; raises :class:`StoryboardError` on what only
    the window layout reveals (more prompts than windows, a handoff longer than the shot it comes from)."""
    # models imports torch; the planner only needs the family table, so keep `import skyray.plan` light.
    from skyray.models import family_of

    sb = storyboard
    if not sb.resolved:
        raise ValueError(
            "compile_plan needs a resolved storyboard: build it with load_storyboard, "
            "parse_storyboard or storyboard_from_data"
        )
    try:
        family = family_of(sb.model)
    except ValueError as exc:
        raise sb.error(("model",), str(exc)) from None
    height, width = sb.height, sb.width
    shots = tuple(_shot_plan(sb, i, family, height, width) for i in range(len(sb.shots)))
    by_id = {s.id: s for s in shots}
    for s in shots:
        parent = by_id.get(s.continues) if s.continues else None
        if parent is not None and s.first_prefix > parent.total_latents:
            key = "continue" if sb.shots[s.index].continue_ else "continue_from"
            raise sb.error(
                ("shots", s.index, key),
                f"needs the last {s.first_prefix} latents of '{parent.id}' (overlap_history "
                f"{s.sampling.overlap_history}), but '{parent.id}' has only {parent.total_latents}; "
                f"lengthen '{parent.id}' or lower this shot's overlap_history",
            )
        if parent is not None and s.first_prefix > parent.last_window_latents:
            # The worker hands a child the tail of the parent's last window (its prefix and new latents), not of
            # the whole shot: a longer need would be refused by the worker after every rank has loaded.
            loc = sb.setting_loc(s.index, "overlap_history")
            last = parent.windows[-1]
            raise sb.error(
                loc,
                f"overlap_history {s.sampling.overlap_history} needs the last {s.first_prefix} latents of "
                f"'{parent.id}', but its last window holds only {parent.last_window_latents} "
                f"({last.prefix} prefix + {last.new} new); lower this shot's overlap_history to at most "
                f"{schedule.video_frames(parent.last_window_latents)} frames or change the length of '{parent.id}' "
                f"so that its last window is longer",
            )
    return FilmPlan(
        title=sb.title,
        model=sb.model,
        width=width,
        height=height,
        fps=sb.fps,
        seed=sb.seed,
        shots=shots,
        chains=_chains(shots),
        storyboard_hash=hashlib.sha256(sb.canonical_json().encode()).hexdigest(),
        family=family.name,
        warnings=sb.warnings,
    )


def fit_memory(
    storyboard: Storyboard,
    plan: FilmPlan,
    layout=None,
    gpu_memory_gib: float = memory.DEFAULT_GPU_MEMORY_GIB,
    decode_on_gpu: bool = True,
) -> FilmPlan:
    """``plan`` with each rank's predicted peak GPU memory, and the CFG mode every shot fits with.

    ``layout`` is the group's ``ParallelConfig`` (anything with ``ulysses``, ``ring`` and ``cfg``; None: one GPU).
    A guided shot whose batched-CFG forward (the default) would not fit in ``gpu_memory_gib`` runs its two
    branches sequentially; one whose ``cfg_batch: true`` was written out is an error saying so, and a shot that
    fits in neither mode is an error too, raised before anything loads.
    """
    from skyray import models

    sb = storyboard
    folder = str(models.TINY_TRAINED_DIR) if sb.model == models.TINY_TRAINED else sb.model
    lay = memory.Layout(layout.ulysses, layout.ring, bool(layout.cfg)) if layout is not None else memory.Layout()
    spec = memory.ModelSpec.of_model(folder, models.family_of(sb.model))
    budget = int(gpu_memory_gib * memory.GiB)
    shots, estimates, sequential = [], [], []
    for s in plan.shots:
        sp = s.sampling

        def predict(cfg_batch: bool, s: ShotPlan = s, sp: Sampling = sp) -> memory.Estimate:
            return memory.estimate(
                spec, plan.height, plan.width, max(w.total for w in s.windows), lay, guided=sp.guided,
                cfg_batch=cfg_batch, causal_block_size=sp.causal_block_size if sp.causal_attention else None,
                decode_on_gpu=decode_on_gpu, offload=sp.offload,
            )

        est = predict(sp.cfg_batch)
        if est.peak > budget and est.batch == 2:
            alone = predict(False)
            if _explicit(sb, s.index, "cfg_batch"):
                raise sb.error(
                    sb.setting_loc(s.index, "cfg_batch"),
                    f"cfg_batch: true runs both CFG branches as one batch-2 forward, predicted at "
                    f"{memory.human(est.peak)} per GPU, more than the {memory.human(budget)} available "
                    f"(--gpu-memory); sequential CFG would need {memory.human(alone.peak)}: set cfg_batch: false, "
                    "or leave it out to let the plan choose",
                )
            if alone.peak <= budget:
                sp = replace(sp, cfg_batch=False)
                sequential.append(s.id)
            est = alone  # fitting or not, the smaller of the two is what the shot is measured by
        if est.peak > budget:
            weights_only = est.weights + est.runtime > budget
            raise sb.error(
                ("model",) if weights_only else sb.setting_loc(s.index, "base_num_frames"),
                f"shot '{s.id}' cannot fit in {memory.human(budget)} per GPU (--gpu-memory) with "
                f"{_describe_layout(lay)}: predicted {memory.describe(est)}; "
                + (
                    "the weights alone do not fit: use GPUs with more memory"
                    if weights_only
                    else "use more GPUs per group (ulysses splits the activations), shorter windows "
                    "(base_num_frames), offload: true, or GPUs with more memory"
                ),
            )
        shots.append(replace(s, sampling=sp) if sp is not s.sampling else s)
        estimates.append((s.id, est))
    mem = MemoryPlan(budget, lay, tuple(estimates), tuple(sequential))
    return replace(plan, shots=tuple(shots), memory=mem)


def _explicit(sb: Storyboard, i: int, name: str) -> bool:
    """Whether the storyboard wrote ``name`` out (on the shot or in defaults) rather than taking the default."""
    return getattr(sb.shots[i], name) is not None or name in sb.defaults.model_fields_set


def _describe_layout(lay: memory.Layout) -> str:
    return f"cfg {2 if lay.cfg else 1} x ulysses {lay.ulysses} x ring {lay.ring}"


def check_layout(layout, family: ModelFamily, height: int, width: int) -> None:
    """Raise ``ValueError`` when a parallel layout cannot split this model at this film size.

    ``layout`` has ``ulysses`` and ``ring`` degrees (an ``engine.parallel.ParallelConfig``).  Ulysses splits the
    attention heads, so its degree must divide them; Ulysses x ring splits every latent frame's tokens, so their
    product must divide the tokens per frame.  Checked before any rank loads a model: otherwise the first forward
    (``engine.forward.window_geometry``) fails after every rank has loaded.
    """
    if family.heads % layout.ulysses:
        choices = ", ".join(str(d) for d in range(1, family.heads + 1) if family.heads % d == 0)
        raise ValueError(
            f"ulysses degree {layout.ulysses} must divide the {family.heads} attention heads of the {family.name} "
            f"model (choose one of {choices})"
        )
    tokens = schedule.window_tokens(1, height, width)
    degree = layout.ulysses * layout.ring
    if tokens % degree:
        fits = [d for d in range(1, degree + 1) if tokens % d == 0 and family.heads % d == 0]
        raise ValueError(
            f"sequence parallel degree {degree} (ulysses {layout.ulysses} x ring {layout.ring}) must divide the "
            f"{tokens} tokens of each latent frame at {width}x{height}; choose a degree dividing {tokens} "
            f"(ulysses {fits[-1]} fits here) or another resolution"
        )


def _sampling(sb: Storyboard, i: int) -> Sampling:
    values = {name: sb.setting(i, name) for name in Sampling.__dataclass_fields__ if name != "fps"}
    values["guidance_scale"] = float(values["guidance_scale"])
    values["shift"] = float(values["shift"])
    values["addnoise_condition"] = float(values["addnoise_condition"])
    values["teacache"] = float(values["teacache"].threshold) if values["teacache"] is not None else 0.0
    return Sampling(**values, fps=sb.fps)


def _shot_plan(sb: Storyboard, i: int, family: ModelFamily, height: int, width: int) -> ShotPlan:
    shot = sb.shots[i]
    sampling = _sampling(sb, i)
    handoff = schedule.prefix_latents(sampling.overlap_history, sampling.causal_block_size)
    parent = sb.continued_index(i)
    if parent is not None:
        first_prefix, new = handoff, shot.frame_count // schedule.TEMPORAL_STRIDE
    elif shot.video is not None:
        first_prefix = video_prefix_latents(shot.video_frames, sampling.overlap_history, sampling.causal_block_size)
        new = shot.frame_count // schedule.TEMPORAL_STRIDE
    else:
        first_prefix = 1 if shot.image is not None else 0
        new = schedule.latent_frames(shot.frame_count) - first_prefix
    shapes = schedule.shot_windows(new, sampling.base_latents, handoff, first_prefix, 1 if shot.end_image else 0)
    prompts = tuple(shot.prompt)
    if len(prompts) > len(shapes):
        raise sb.error(
            ("shots", i, "prompt"),
            _too_many_prompts(len(prompts), len(shapes), sampling, first_prefix, handoff, shot.fresh),
        )
    windows = []
    for w in shapes:
        rows = _rows(sampling.steps, w.prefix, w.new, w.suffix, sampling.ar_step, sampling.causal_block_size)
        forwards = schedule.model_calls(rows, sampling.guided)
        flops = schedule.transformer_flops(
            schedule.window_tokens(w.total, height, width), family.text_len, family.dim, family.ffn_dim, family.layers
        )
        windows.append(
            WindowPlan(
                w.index,
                w.prefix,
                w.new,
                w.suffix,
                prompts[min(w.index, len(prompts) - 1)],
                rows,
                forwards,
                forwards * flops / 1e12,
            )
        )
    return ShotPlan(
        id=shot.id,
        index=i,
        seed=shot.seed,
        frames=shot.frame_count,
        new_latents=new,
        continues=sb.shots[parent].id if parent is not None else None,
        handoff_latents=handoff,
        first_prefix=first_prefix,
        image=shot.image,
        end_image=shot.end_image,
        video=shot.video,
        video_frames=shot.video_frames,
        fade_in=shot.transition.fade if shot.transition else 0.0,
        prompts=prompts,
        sampling=sampling,
        windows=tuple(windows),
        enhance=sb.setting(i, "enhance"),
        duration=shot.duration,
        original_prompts=tuple(shot.original_prompt) if shot.original_prompt else None,
    )


def _too_many_prompts(n_prompts: int, n_windows: int, s: Sampling, first_prefix: int, handoff: int, fresh: bool) -> str:
    # Latents that fill `n_prompts - 1` windows, plus one to open the next: the shortest shot with a window each.
    need = (s.base_latents - first_prefix) + (n_prompts - 2) * (s.base_latents - handoff) + 1
    frames = schedule.video_frames(first_prefix + need) if fresh else need * schedule.TEMPORAL_STRIDE
    return (
        f"{n_prompts} prompts but the shot has only {n_windows} window{'s' if n_windows > 1 else ''} "
        "(one prompt per window; the last one holds for any further windows): remove "
        f"{n_prompts - n_windows} prompt{'s' if n_prompts - n_windows > 1 else ''} or give the shot at least "
        f"{frames} frames"
    )


def _chains(shots: tuple[ShotPlan, ...]) -> tuple[Chain, ...]:
    """Connected continuation trees, each ordered parents first (ties in storyboard order), ordered by first shot."""
    children: dict[str, list[ShotPlan]] = {s.id: [] for s in shots}
    for s in shots:
        if s.continues:
            children[s.continues].append(s)
    chains = []
    for root in (s for s in shots if not s.continues):
        order, frontier = [], [root]
        while frontier:
            frontier.sort(key=lambda s: s.index)
            node = frontier.pop(0)
            order.append(node)
            frontier.extend(children[node.id])
        chains.append(order)
    chains.sort(key=lambda c: min(s.index for s in c))
    return tuple(Chain(k, tuple(s.id for s in c)) for k, c in enumerate(chains))


def format_plan(plan: FilmPlan, mfu: float = 0.4, peak_tflops: float = 989.0) -> str:
    """A human-readable plan: one row per shot, the chains, film totals and GPU-time estimates at ``mfu``."""
    rate = peak_tflops * mfu
    out = [
        f"{plan.title}: {plan.width}x{plan.height} @ {plan.fps} fps, model {plan.model} ({plan.family}), "
        f"seed {plan.seed}",
        f"GPU-seconds assume {mfu:.0%} MFU of {peak_tflops:g} TFLOP/s peak (transformer matmuls only; "
        "VAE and text encoder not counted)",
        "",
    ]
    head = ("shot", "frames", "seconds", "windows", "forwards", "TFLOPs", "GPU-s", "notes")
    rows = []
    for s in plan.shots:
        notes = [f"continues '{s.continues}'" if s.continues else "cut"]
        if s.fade_in:
            notes.append(f"fade {s.fade_in:g} s")
        if s.duration is not None:
            notes.append(f"{s.duration:g} s asked -> {s.frames} frames ({s.seconds:.2f} s)")
        if s.image:
            notes.append("image")
        if s.video:
            notes.append(f"extends video ({s.video_frames} frames)")
        if s.end_image:
            notes.append("end image")
        if len(s.prompts) > 1:
            notes.append(f"{len(s.prompts)} prompts")
        layout = " ".join(f"[{w.prefix}+{w.new}" + (f"+{w.suffix}]" if w.suffix else "]") for w in s.windows)
        notes.append(f"latents {layout}")
        if s.sampling.guided and plan.memory is not None:
            auto = " (auto: batch 2 would not fit)" if s.id in plan.memory.sequential_cfg else ""
            mode = "parallel" if plan.memory.layout.cfg else "batched" if s.sampling.cfg_batch else "sequential"
            notes.append(f"CFG {mode}{auto}")
        rows.append(
            (
                s.id,
                str(s.frames),
                f"{s.seconds:.2f}",
                str(len(s.windows)),
                str(s.forwards),
                f"{s.tflops:.4g}",
                f"{s.tflops / rate:.4g}",
                ", ".join(notes),
            )
        )
    rows.append(
        (
            "total",
            str(plan.frames),
            f"{plan.seconds:.2f}",
            str(sum(len(s.windows) for s in plan.shots)),
            str(plan.forwards),
            f"{plan.tflops:.4g}",
            f"{plan.tflops / rate:.4g}",
            "",
        )
    )
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head) - 1)]
    for k, r in enumerate([head, *rows]):
        if k == len(rows):  # a rule above the totals
            out.append("  ".join("-" * w for w in widths))
        cells = [c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells + [r[-1]]).rstrip())
    out.append("")
    for c in plan.chains:
        edges = [(plan.shot(i).continues, i) for i in c.shot_ids[1:]]
        if all(p == c.shot_ids[k] for k, (p, _) in enumerate(edges)):
            out.append(f"chain {c.index}: " + " -> ".join(c.shot_ids))
        else:
            out.append(f"chain {c.index}: {c.shot_ids[0]}; " + ", ".join(f"{p} -> {i}" for p, i in edges))
    if plan.memory is not None:
        m = plan.memory
        shot, est = m.peak
        out.append(
            f"memory per GPU ({_describe_layout(m.layout)}, {memory.human(m.gpu_memory)} each): peak "
            f"{memory.describe(est)} in shot '{shot}'"
        )
    out.append(f"storyboard {plan.storyboard_hash[:12]}")
    out.extend(f"warning: {w}" for w in plan.warnings)
    return "\n".join(out)
