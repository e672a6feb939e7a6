"""Peak memory and seconds per window of a single long shot with 1, 2, 4, 8 (and --max) windows.

Each render runs in a fresh process so peak RSS is its own. Goal: memory flat in the number of windows
(streaming decode, only the hand-off tail kept between windows), time linear. Prints ratios last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, tempfile, time
from skyray.executors.local import LocalExecutor
from skyray.plan import compile_plan
from skyray.render import render_film
from skyray.storyboard import parse_storyboard
windows, size = int(sys.argv[1]), int(sys.argv[2])
frames = 17 + 12 * (windows - 1)          # base 17 frames (5 latents), overlap 5 frames (2 latents): +3 latents/window
sb = parse_storyboard(f'''
title: long
model: tiny
resolution: {size}x{size}
fps: 8
defaults: {{steps: 2, base_num_frames: 17, overlap_history: 5, addnoise_condition: 20}}
shots: [{{id: take, prompt: a long take over a valley, frames: {frames}}}]
''', tempfile.mkdtemp(), "long.yaml")
plan = compile_plan(sb)
ex = LocalExecutor("tiny", "cpu")
t = time.perf_counter()
render_film(plan, tempfile.mkdtemp(), ex)
dt = time.perf_counter() - t
print(json.dumps({"windows": len(plan.shots[0].windows), "frames": frames, "seconds": dt,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--windows", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    args = ap.parse_args()
    rows = []
    for n in args.windows:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.size)], capture_output=True, text=True,
                             check=True, cwd=tempfile.gettempdir())
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'windows':>8} {'frames':>7} {'seconds':>8} {'s/window':>9} {'peak MB':>8}")
    for r in rows:
        print(f"{r['windows']:>8} {r['frames']:>7} {r['seconds']:>8.2f} {r['seconds'] / r['windows']:>9.3f} "
              f"{r['peak_mb']:>8.0f}")
    by = {r["windows"]: r for r in rows}
    if 2 in by and 8 in by:
        print(f"peak memory 8 vs 2 windows: {by[8]['peak_mb'] / by[2]['peak_mb']:.3f}x (goal < 1.10x)")
    lo, hi = rows[0], rows[-1]
    print(f"seconds per window {hi['windows']} vs {lo['windows']} windows: "
          f"{(hi['seconds'] / hi['windows']) / (lo['seconds'] / lo['windows']):.2f}x (linear time = ~1.0x)")


if __name__ == "__main__":
    main()
