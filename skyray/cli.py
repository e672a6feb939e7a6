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


def session_config(args, storyboard, plan):
    """The render session the command line asks for (the layout validated before anything loads)."""
    from skyray.session import SessionConfig

    # Offloading shots need the weights loaded off the GPU from the start, not just moved between stages.
    offload = any(s.sampling.offload for s in plan.shots)
    guidance = any(s.sampling.guided for s in plan.shots)
    if args.executor == "local":
        return SessionConfig(storyboard.model, executor="local", device=args.device, offload=offload,
                             guidance=guidance, progress=not args.quiet)
    groups, gpus, layout = group_layout(args, storyboard, plan)
    return SessionConfig(storyboard.model, executor="ray", address=args.address, groups=groups, gpus_per_group=gpus,
                         layout=layout, guidance=guidance, writers=args.writers, decode_gpu=args.decode_gpu,
                         progress=not args.quiet, offload=offload, start_timeout_s=args.start_timeout)


def cmd_render(args) -> int:
    from skyray.plan import fit_memory, format_plan

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
    from skyray.output.location import redact
    from skyray.progress import terminal_progress
    from skyray.session import RenderSession

    session = RenderSession(session_config(args, sb, plan))
    sb, plan = session.prepare(sb, plan, quiet=args.quiet)  # before the video model loads; frees its LLM after
    plan = fit(sb, plan)
    try:
        on_event, close = terminal_progress(plan, session.executor, out, quiet=args.quiet)
        try:
            manifest = session.render(plan, out, save_latents=args.save_latents, on_event=on_event)
        finally:
            close()
    finally:
        session.close()
    if not args.quiet:
        print(f"film: {redact(out).rstrip('/')}/{manifest['film']['path']} ({manifest['film']['frames']} frames at "
              f"{plan.fps} fps)")
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
                     defaults=defaults, groups=args.groups, address=args.address)
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
    r.add_argument("--start-timeout", type=float, default=300.0,
                   help="seconds a group may wait for its resources before the render stops (ray executor)")
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
    b.add_argument("--address", help="Ray address of an existing cluster ('auto', 'ray://host:10001')")
    b.set_defaults(func=cmd_batch)

    from skyray.serve.cli import add_serve_parser

    add_serve_parser(sub)

    m = sub.add_parser("model", help="model utilities").add_subparsers(dest="action", required=True)
    ex = m.add_parser("export", help="write a model as a diffusers folder")
    ex.add_argument("model", help="'tiny', 'tiny-trained', a diffusers folder or a hub id")
    ex.add_argument("dir", help="output folder")
    ex.set_defaults(func=cmd_model)
    info = m.add_parser("info", help="print a model's family and size (reads no weights)")
    info.add_argument("model", help="'tiny', 'tiny-trained', a diffusers folder or a hub id")
    info.set_defaults(func=cmd_model)
    from skyray.training import build

    tt = m.add_parser("train-tiny", help="train the tiny-trained model on procedural scenes (CPU, ~30 min)",
                      description=build.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_arguments(tt)
    tt.set_defaults(func=build.run)

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
    except Exception as err:
        from skyray.executors.base import ResourcesUnavailable
        from skyray.render import RenderCancelled, RenderFailed

        if not isinstance(err, (ResourcesUnavailable, RenderFailed, RenderCancelled)):
            raise
        # Finished shots and checkpoints are kept: the same command resumes.
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
