"""TeaCache on the engine_vs_reference shot: fraction of forwards skipped, time saved, latent difference.

The bench transformer (4 layers, 8 heads x 12, random weights) renders the 97-frame 64x64 shot, sync and async,
with TeaCache off and at several thresholds.  It is a ``custom`` family, so the rescaling is the identity (the
fitted 1.3B/14B polynomials describe trained weights, not random ones): the thresholds here are in units of raw
relative L1 change of the time embedding and are not comparable to the 0.1-0.3 used with the real checkpoints.
Each row: forwards (batch items), the fraction whose block stack was skipped, median seconds, speed-up over no
cache, and max |latent difference| against no cache (absolute, and relative to the largest latent).  The last
line is the fraction skipped and the speed-up at the headline threshold.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_vs_reference import MODES, bench_components, run_ours  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.0, 0.3, 0.6, 1.0, 2.0])
    ap.add_argument("--headline", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comps = bench_components()
    print(f"bench transformer ({comps.family.name} family: identity rescaling), 97 frames at 64x64, "
          f"{args.steps} steps, CFG batched, {args.threads} threads")

    rows = []
    for m in args.modes:
        base = None
        run_ours(comps, 2, **MODES[m])  # warm-up
        for th in args.thresholds:
            times, skipped = [], 0.0
            for _ in range(args.runs):
                t = time.perf_counter()
                out, predict = run_ours(comps, args.steps, **MODES[m], teacache=th)
                times.append(time.perf_counter() - t)
                skipped = predict.skipped / predict.forwards
            if base is None:
                base = (out, statistics.median(times))
            diff = (out - base[0]).abs().max().item()
            rows.append((m, th, predict.forwards, skipped, statistics.median(times), base[1] / statistics.median(times),
                         diff, diff / base[0].abs().max().item()))

    print(f"{'mode':<6} {'threshold':>9} {'forwards':>8} {'skipped':>8} {'seconds':>8} {'speed-up':>8} "
          f"{'max |diff|':>10} {'relative':>8}")
    for m, th, fw, sk, s, up, d, rel in rows:
        print(f"{m:<6} {th:>9g} {fw:>8} {sk:>8.1%} {s:>8.3f} {up:>7.2f}x {d:>10.2e} {rel:>8.2e}")
    for m, th, _, sk, _, up, d, _ in rows:
        if th == args.headline:
            print(f"{m}: threshold {th:g} skips {sk:.1%} of forwards, {up:.2f}x faster, max |diff| {d:.2e}")


if __name__ == "__main__":
    main()
