"""Speed-up of 2 Ray groups over 1 for 4 independent shots, and the hand-off cost per window.

Both runs happen in one process on one Ray instance (ratios, not absolute times). On a CPU machine the groups
are CPU-emulated and each worker uses SKYRAY_CPU_THREADS threads (default here: 1, so two groups fit 2 cores).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("SKYRAY_CPU_THREADS", "1")

import ray  # noqa: E402
import torch  # noqa: E402

from skyray.engine.handoff import Handoff  # noqa: E402
from skyray.executors.ray import EMULATED_SLOT, RayExecutor  # noqa: E402
from skyray.plan import compile_plan  # noqa: E402
from skyray.render import render_film  # noqa: E402
from skyray.storyboard import parse_storyboard  # noqa: E402

SIZE = 96
FILM = f"""
title: four cuts
model: tiny
resolution: {SIZE}x{SIZE}
fps: 8
defaults: {{steps: 3, base_num_frames: 17, overlap_history: 5}}
shots:
""" + "".join(f"  - {{id: s{i}, prompt: shot number {i}, frames: 29}}\n" for i in range(4))


@ray.remote(num_cpus=0, resources={EMULATED_SLOT: 1})
class _Sink:
    def take(self, h: Handoff) -> int:
        return int(h.tail.numel())


def main() -> None:
    ray.init(address="local", num_cpus=os.cpu_count(), resources={EMULATED_SLOT: 64}, include_dashboard=False,
             log_to_driver=False)
    plan = compile_plan(parse_storyboard(FILM, tempfile.mkdtemp(), "four.yaml"))
    times, window_secs = {}, []
    for groups in (1, 2):
        ex = RayExecutor("tiny", groups=groups)
        t = time.perf_counter()
        m = render_film(plan, tempfile.mkdtemp(), ex)
        times[groups] = time.perf_counter() - t
        window_secs += [w["seconds"] for s in m["shots"] for w in s["windows"]]
        ex.shutdown()
    # Hand-off: a window's tail (2 latents) and RNG state, passed by reference from the driver to another actor.
    tail = Handoff(torch.randn(1, 16, 2, SIZE // 8, SIZE // 8), torch.Generator().get_state())
    sink = _Sink.remote()
    ray.get(sink.take.remote(ray.put(tail)))
    costs = []
    for _ in range(20):
        t = time.perf_counter()
        ray.get(sink.take.remote(ray.put(tail)))
        costs.append(time.perf_counter() - t)
    handoff = statistics.median(costs)
    window = statistics.median(window_secs)
    print(f"{'groups':>6} {'seconds':>8}")
    for g, s in times.items():
        print(f"{g:>6} {s:>8.2f}")
    print(f"median window compute {window:.3f} s, median hand-off {handoff * 1000:.2f} ms")
    print(f"hand-off cost per window: {handoff / window:.4f} of a window's compute")
    print(f"speed-up of 2 groups over 1 (4 independent shots, {os.cpu_count()} cores): {times[1] / times[2]:.2f}x")


if __name__ == "__main__":
    main()
