"""Independent shots on a cluster of CPU nodes: 2 worker nodes against 1, bytes between nodes, where time goes.

Starts its own cluster (``skyray.devcluster``: worker nodes with private /tmp, one CPU thread and one group slot
each) and drives it from this process: the same film of independent shots renders with one group on one worker
node, then with two groups on two.  Windows are made heavy (resolution, steps) so that compute dominates.

Prints
- throughput (windows per second of rendering) for 1 and 2 nodes, and their ratio;
- the compute-bound ratio: what the two nodes' window compute alone allows (sum of window seconds over the busiest
  group), i.e. the ratio on nodes that have cores of their own for the driver and the writers;
- bytes that cross nodes per window (hand-off, checkpoint to the driver and to the writer, clip) against the window's
  latent size;
- the wall time split: cluster join, group start (actor + model load), windows, writers, driver.

Needs root (``unshare``).  Run: ``python bench/multinode.py [--shots 4] [--windows 2] [--size 96] [--steps 8]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def film(shots: int, windows: int, size: int, steps: int) -> str:
    frames = 17 + (windows - 1) * 12  # base 17 frames, overlap 5: each later window adds 12
    lines = [f"title: bench\nmodel: tiny\nresolution: {size}x{size}\nfps: 8\nseed: 3",
             f"defaults: {{steps: {steps}, base_num_frames: 17, overlap_history: 5}}", "shots:"]
    lines += [f"  - {{id: s{i}, prompt: shot {i}, frames: {frames}}}" for i in range(shots)]
    return "\n".join(lines) + "\n"


def render(address: str, plan, out: Path, groups: int) -> dict:
    """Render on ``groups`` groups from this process; times and sizes of what happened."""
    import ray

    from skyray.executors.ray import RayExecutor
    from skyray.render import render_film

    t0 = time.perf_counter()
    ray.init(address=address, log_to_driver=False)
    t_join = time.perf_counter() - t0
    t1 = time.perf_counter()
    ex = RayExecutor("tiny", groups=groups, progress=False)
    t_groups = time.perf_counter() - t1
    t2 = time.perf_counter()
    ckpt_sizes: list[int] = []
    try:
        manifest = render_film(plan, out, ex, on_checkpoint=lambda shot, w, data: ckpt_sizes.append(len(data)))
    finally:
        ex.shutdown()
        ray.shutdown()
    t_render = time.perf_counter() - t2
    windows = [w for s in manifest["shots"] for w in s["windows"]]
    per_group: dict[str, float] = {}
    for w in windows:
        g = w["worker"].split("/")[0]
        per_group[g] = per_group.get(g, 0.0) + w["seconds"]
    records = [json.loads((out / "shots" / f"{s.id}.json").read_text()) for s in plan.shots]
    return {"join": t_join, "groups": t_groups, "render": t_render, "windows": len(windows),
            "window_seconds": sum(w["seconds"] for w in windows), "busiest_group": max(per_group.values()),
            "decode_seconds": sum(r["decode_seconds"] for r in records),
            "clip_bytes": sum((out / r["path"]).stat().st_size for r in records),
            "checkpoint_bytes": sum(ckpt_sizes) / len(ckpt_sizes),
            "tail_bytes": sum((out / "shots" / f"{s.id}.tail.safetensors").stat().st_size for s in plan.shots)
            / len(plan.shots)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()

    from skyray.devcluster import start_cluster, stop_cluster, unshare_problem
    from skyray.plan import compile_plan
    from skyray.storyboard import parse_storyboard

    why = unshare_problem()
    if why:
        print(f"cannot run: {why}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="skyray-bench-mn-"))
    plan = compile_plan(parse_storyboard(film(args.shots, args.windows, args.size, args.steps), work, "bench.yaml"))
    results = {}
    for nodes in (1, 2):
        cluster, head = start_cluster(work / f"logs{nodes}", workers=nodes)
        try:
            results[nodes] = render(cluster.address, plan, work / f"out{nodes}", groups=nodes)
        finally:
            stop_cluster(cluster, head)

    one, two = results[1], results[2]
    tput = {n: r["windows"] / r["render"] for n, r in results.items()}
    h, w = args.size // 8, args.size // 8
    window_latents = 5 * 16 * h * w * 4  # a full window: 5 latent frames of 16 x h x w fp32
    new_latents = two["checkpoint_bytes"]  # a window's checkpoint: its new latents, tail and RNG state
    handoff = two["tail_bytes"]  # the overlap latents handed to the next window (as stored: same tensors)
    clip = two["clip_bytes"] / two["windows"]
    print(f"film: {args.shots} independent shots x {args.windows} windows, {args.size}x{args.size}, "
          f"{args.steps} steps, tiny model, 1 CPU thread per node")
    print(f"{'':28s}{'1 node':>12s}{'2 nodes':>12s}")
    print(f"{'windows/s (render wall)':28s}{tput[1]:12.3f}{tput[2]:12.3f}")
    print(f"{'render wall (s)':28s}{one['render']:12.2f}{two['render']:12.2f}")
    print(f"{'  window compute (s, sum)':28s}{one['window_seconds']:12.2f}{two['window_seconds']:12.2f}")
    print(f"{'  busiest group (s)':28s}{one['busiest_group']:12.2f}{two['busiest_group']:12.2f}")
    print(f"{'  writers decode+encode (s)':28s}{one['decode_seconds']:12.2f}{two['decode_seconds']:12.2f}")
    drv = {n: r["render"] - r["busiest_group"] for n, r in results.items()}
    print(f"{'  driver/waiting (s)':28s}{drv[1]:12.2f}{drv[2]:12.2f}")
    print(f"{'cluster join (s)':28s}{one['join']:12.2f}{two['join']:12.2f}")
    print(f"{'group start + model (s)':28s}{one['groups']:12.2f}{two['groups']:12.2f}")
    print(f"ratio 2 nodes / 1 node, measured throughput: {tput[2] / tput[1]:.2f}x")
    print(f"ratio 2 nodes / 1 node, compute-bound (busiest group): {one['busiest_group'] / two['busiest_group']:.2f}x")
    print("bytes between nodes per window, against the window's latents "
          f"({window_latents} B):")
    print(f"  hand-off to the next window: {handoff:.0f} B ({handoff / window_latents:.2f}x)")
    print(f"  checkpoint to the driver and to the writer: 2 x {new_latents:.0f} B "
          f"({2 * new_latents / window_latents:.2f}x)")
    print(f"  clip back to the driver: {clip:.0f} B ({clip / window_latents:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
