"""``skyray`` command line: render, plan, model, batch, serve, enhance."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _load_plan(path: str):
    from skyray.plan import compile_plan
    from skyray.storyboard import load_storyboard

    sb = load_storyboard(path)
    return sb, compile_plan(sb)


def _progress(quiet: bool, total_windows: int, executor=None):
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    film = tqdm(total=total_windows, desc="film", unit="window", position=0, dynamic_ncols=True)
    bars: dict[str, tqdm] = {}
    rows: dict[str, tqdm] = {}

    def on_row(shot: str, window: int, row: int, total: int) -> None:
        # Model calls inside the current window (in-process executor only; Ray reports per window).
        key = f"{shot}/{window}"
        if key not in rows:
            for bar in rows.values():
                bar.close()
            rows.clear()
            rows[key] = tqdm(total=total, desc=f"window {window}", unit="step", position=2, leave=False,
                             dynamic_ncols=True)
        rows[key].update(1)

    worker = getattr(executor, "worker", None)
    if worker is not None:
        worker.on_row = on_row

    def on_event(e: dict) -> None:
        kind = e["type"]
        if kind == "plan":
            done = sum(1 for _ in e["reused"])
            if done:
                film.write(f"reusing {done} finished shot(s): {', '.join(e['reused'])}")
        elif kind == "shot_start":
            bars[e["shot"]] = tqdm(total=e["windows"], desc=f"shot {e['shot']}", unit="window", position=1,
                                   leave=False, dynamic_ncols=True)
        elif kind == "window":
            film.update(1)
            if e["shot"] in bars:
                bars[e["shot"]].update(1)
        elif kind == "shot_done":
            bar = bars.pop(e["shot"], None)
            if bar is not None:
                bar.close()
            film.write(f"shot {e['shot']}: {e['frames']} frames -> {e['path']}")
        elif kind == "retry":
            film.write(f"retrying shot {e['shot']} window {e['window']} on group {e['group']}: {e['error']}")

    def close() -> None:
        for b in [*rows.values(), *bars.values()]:
            b.close()
        film.close()

    return on_event, close


def cmd_plan(args) -> int:
    from skyray.plan import fit_memory, format_plan

    sb, plan = _load_plan(args.storyboard)
    _, _, layout = group_layout(args, sb, plan)
    plan = fit_memory(sb, plan, layout, args.gpu_memory)
    print(format_plan(plan, mfu=args.mfu))
    return 0


def group_layout(args, storyboard, plan):
    """Groups, GPUs per group and the parallel layout, validated against the model before anything loads."""
    from skyray.engine.parallel import ParallelConfig
    from skyray.models import family_of
    from skyray.plan import check_layout

    cluster = storyboard.cluster
    groups = args.groups or (cluster.groups if cluster else 1)
    gpus = args.gpus_per_group or (cluster.gpus_per_group if cluster else 1)
    family = family_of(storyboard.model)
    heads = family.heads
    guidance = any(s.sampling.guided for s in plan.shots)
    p = storyboard.parallel
    # yunchang/xfuser attention is opt-in (engine.parallel): only a film whose shots ask for it builds its groups.
    attention = "xfuser" if any(s.sampling.attention == "xfuser" for s in plan.shots) else "auto"
    try:
        if p is None or p.ulysses is None or p.cfg is None:
            layout = ParallelConfig.auto(gpus, heads, guidance, ring=p.ring if p else 1, attention=attention)
            if p is not None:
                layout = ParallelConfig(
                    ulysses=p.ulysses or layout.ulysses, ring=p.ring, cfg=layout.cfg if p.cfg is None else p.cfg,
                    attention=attention,
                )
        else:
            layout = ParallelConfig(ulysses=p.ulysses, ring=p.ring, cfg=p.cfg, attention=attention)
        layout.validate(gpus, heads, guidance)
        check_layout(layout, family, storyboard.height, storyboard.width)
    except ValueError as err:
        raise SystemExit(f"error: parallel layout for {gpus} GPU(s) per group on model {storyboard.model!r}: {err}") from None
    return groups, gpus, layout


def make_executor(args, storyboard, plan):
    # Offloading shots need the weights loaded off the GPU from the start, not just moved between stages.
    offload = any(s.sampling.offload for s in plan.shots)
    if args.executor == "local":
        from skyray.executors.local import LocalExecutor

        return LocalExecutor(storyboard.model, args.device, offload=offload)
    from skyray.executors.ray import RayExecutor

    groups, gpus, layout = group_layout(args, storyboard, plan)
    guidance = any(s.sampling.guided for s in plan.shots)
    return RayExecutor(storyboard.model, groups=groups, gpus_per_group=gpus, address=args.address,
                       parallel=layout if gpus > 1 else None, guidance=guidance, max_writers=args.writers,
                       decode_gpu=args.decode_gpu, progress=not args.quiet, offload=offload)


def cmd_render(args) -> int:
    from skyray.plan import fit_memory, format_plan
    from skyray.render import render_film

    sb, plan = _load_plan(args.storyboard)  # everything is validated before a model loads or a file is written
    _, _, layout = group_layout(args, sb, plan)

    def fit(sb, plan):  # per-GPU memory and the CFG mode that fits (the local executor: one device, decoding on it)
        ray = args.executor == "ray"
        return fit_memory(sb, plan, layout if ray else None, args.gpu_memory, decode_on_gpu=not ray or args.decode_gpu > 0)

    plan = fit(sb, plan)
    if args.dry_run:
        print(format_plan(plan))
        return 0
    out = args.out or str(Path("renders") / Path(args.storyboard).stem)  # a folder or a pyarrow.fs URI
    from skyray.enhance import enhance_before_render  # before the video model loads; frees its LLM after

    sb, plan = enhance_before_render(sb, plan, args.executor == "ray", args.address, args.quiet)
    plan = fit(sb, plan)
    executor = make_executor(args, sb, plan)
    on_event, close = _progress(args.quiet, sum(len(s.windows) for s in plan.shots), executor)
    try:
        manifest = render_film(plan, out, executor, save_latents=args.save_latents, on_event=on_event)
    finally:
        close()
        executor.shutdown()
    if not args.quiet:
        print(f"film: {out}/{manifest['film']['path']} ({manifest['film']['frames']} frames at {plan.fps} fps)")
    return 0


def cmd_model(args) -> int:
    from skyray import models

    if args.action == "export":
        comps = models.load(args.model, "cpu")
        path = models.export(comps, args.dir)
        print(f"wrote {args.model} as a diffusers folder: {path}")
        return 0
    if args.action == "info":
        fam = models.family_of(args.model)
        print(f"{args.model}: family {fam.name}, {fam.heads} heads x {fam.head_dim}, {fam.layers} layers")
        return 0
    raise SystemExit(f"unknown model action {args.action!r}")


def cmd_batch(args) -> int:
    import json

    from skyray.batch import run_batch

    defaults = json.loads(args.defaults) if args.defaults else {}
    rows = run_batch(args.requests, args.out, model=args.model, resolution=args.resolution, fps=args.fps,
                     defaults=defaults, groups=args.groups)
    done = sum(r["status"] == "done" for r in rows)
    print(f"{done}/{len(rows)} requests rendered; index: {Path(args.out) / 'index.jsonl'}")
    for r in rows:
        if r["status"] != "done":
            print(f"  line {r['line']}: {r['status']}: {r['error']}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skyray", description="Render long multi-shot films with SkyReels-V2.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render a storyboard to an encoded film")
    r.add_argument("storyboard")
    r.add_argument("--out", help="output folder or pyarrow.fs URI such as s3://bucket/film (default: renders/<name>)")
    r.add_argument("--executor", choices=["local", "ray"], default="ray")
    r.add_argument("--address", help="Ray address ('auto', 'ray://host:10001'); default: start a local Ray")
    r.add_argument("--groups", type=int, help="GPU groups (model replicas)")
    r.add_argument("--gpus-per-group", type=int, help="GPUs per group (sequence/CFG parallel inside a group)")
    r.add_argument("--writers", type=int, default=2, help="decoder/encoder actors (ray executor)")
    r.add_argument("--decode-gpu", type=float, default=0.0,
                   help="GPU share per decoder actor on GPU clusters (0: decode on CPU)")
    r.add_argument("--device", help="torch device for the local executor (default: cuda if available)")
    r.add_argument("--save-latents", action="store_true", help="also write shots/<id>.safetensors")
    r.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    r.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU the memory check fits the film into")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_render)

    pl = sub.add_parser("plan", help="print the render plan of a storyboard")
    pl.add_argument("storyboard")
    pl.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for GPU-seconds")
    pl.add_argument("--gpus-per-group", type=int, help="GPUs per group (default: the storyboard's cluster, or 1)")
    pl.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU the memory check fits the film into")
    pl.set_defaults(groups=None)
    pl.set_defaults(func=cmd_plan)

    b = sub.add_parser("batch", help="render many independent shot requests (JSON lines) with Ray Data")
    b.add_argument("requests", help="JSONL file: one {prompt, frames|duration, seed?, image?, ...} per line")
    b.add_argument("--out", required=True)
    b.add_argument("--model", default="tiny")
    b.add_argument("--resolution", default="540p")
    b.add_argument("--fps", type=int, default=24)
    b.add_argument("--defaults", help="JSON object of sampling defaults, e.g. '{\"steps\": 30}'")
    b.add_argument("--groups", type=int, default=1, help="renderer actors (one model replica each)")
    b.set_defaults(func=cmd_batch)

    from skyray.serve.cli import add_serve_parser

    add_serve_parser(sub)

    m = sub.add_parser("model", help="model utilities")
    m.add_argument("action", choices=["export", "info"])
    m.add_argument("model", help="'tiny', a diffusers folder or a hub id")
    m.add_argument("dir", nargs="?", help="output folder (export)")
    m.set_defaults(func=cmd_model)

    from skyray.enhance import add_enhance_parser

    add_enhance_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from skyray.storyboard import StoryboardError

    try:
        return args.func(args)
    except StoryboardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
