"""Terminal progress: the state and lines from render events, and a real render under tmux and into a log."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from skyray.plan import compile_plan
from skyray.progress import FilmState, LineLog, RenderProgress, clock
from skyray.storyboard import storyboard_from_data

ROOT = Path(__file__).resolve().parents[1]
FILM = {
    "title": "progress check", "model": "tiny", "resolution": "32x32", "fps": 8, "seed": 1,
    "defaults": {"steps": 3, "base_num_frames": 17, "overlap_history": 5},
    "shots": [
        {"id": "open", "prompt": "a harbor at night", "frames": 25},  # 2 windows
        {"id": "more", "continue": True, "prompt": "a boat leaves", "frames": 16},  # 2 windows
        # Over the text encoder's 512 tokens: the actor that encodes it logs a warning, which must reach the user.
        {"id": "cut", "prompt": "a long prompt " + " ".join(["red square moving"] * 210), "frames": 9},
    ],
}


def plan_of(tmp_path):
    return compile_plan(storyboard_from_data(FILM, tmp_path, "film"))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_state_counts_eta_and_gpu_seconds(tmp_path):
    plan = plan_of(tmp_path)
    s = FilmState({p.id: len(p.windows) for p in plan.shots}, gpus_per_window=4)
    assert s.total == 5 and s.eta(0) is None
    s.update({"type": "plan", "shots": 3, "windows": 5, "reused": ["open"]}, 10.0)
    assert s.finished == 2
    s.update({"type": "shot_start", "shot": "more", "windows": 2}, 10.0)
    s.update({"type": "row", "shot": "more", "window": 0, "row": 1, "rows": 3}, 11.0)
    assert s.open["more"].row == (2, 3)
    s.update({"type": "window", "shot": "more", "window": 0, "windows": 2, "seconds": 1.5, "group": 0}, 12.0)
    # 2 s for this run's one window, 2 windows left; 1.5 s on a 4-GPU group.
    assert (s.finished, s.eta(12.0), s.gpu_seconds, s.open["more"].row) == (3, 4.0, 6.0, None)
    s.update({"type": "row", "shot": "more", "window": 0, "row": 2, "rows": 3}, 12.5)  # late row of a done window
    assert s.open["more"].row is None
    s.update({"type": "shot_done", "shot": "more", "frames": 16, "path": "shots/more.mp4"}, 13.0)
    assert s.finished == 4 and "more" not in s.open
    assert clock(3725) == "1:02:05" and clock(65) == "01:05" and clock(None) == "--:--"


def test_a_log_gets_one_line_per_window(tmp_path):
    plan = plan_of(tmp_path)
    out, saved = io.StringIO(), []
    now = Clock()
    progress = RenderProgress(plan, LineLog(out), saved.append, clock_fn=now)
    events = [{"type": "plan", "shots": 3, "windows": 5, "reused": []}]
    for sid, n in (("open", 2), ("more", 2), ("cut", 1)):
        events.append({"type": "shot_start", "shot": sid, "windows": n})
        for w in range(n):
            events += [{"type": "row", "shot": sid, "window": w, "row": r, "rows": 3} for r in range(3)]
            events.append({"type": "window", "shot": sid, "window": w, "windows": n, "seconds": 0.5, "group": 0})
        events.append({"type": "shot_done", "shot": sid, "frames": 9, "path": f"shots/{sid}.mp4"})
    events.insert(8, {"type": "log", "level": "WARNING", "worker": "group0.0/b0", "message": "a prompt is cut"})
    for e in events:
        now.t += 1.0
        progress(e)
    progress({"type": "film_done", "path": "film.mp4", "frames": 50})
    progress.close()
    lines = out.getvalue().splitlines()
    windows = [ln for ln in lines if re.search(r"\] window \d+/5 ", ln)]
    assert [re.search(r"window (\d+)/5", ln)[1] for ln in windows] == ["1", "2", "3", "4", "5"]
    # 5 s since the plan for 1 window, 4 windows left: 20 s.
    assert windows[0] == "[00:05] window 1/5 | shot open 1/2 | 0.50 s | 0.5 GPU-s | ETA 00:20"
    assert any("WARNING: group0.0/b0: a prompt is cut" in ln for ln in lines)
    assert lines[-1].startswith("[00:") and "film: 50 frames -> film.mp4 | 2.5 GPU-s" in lines[-1]
    assert "row" not in out.getvalue() and "\r" not in out.getvalue()
    assert saved[-1].decode().splitlines() == lines  # render.log holds the same lines


# ---------------------------------------------------------------------------------------------- real renders

# A Ray of the render's own, as `skyray render` starts one on a machine without a cluster (address="auto"
# would join whatever other Ray runs on a shared test machine).
RUNNER = textwrap.dedent("""\
    import logging, sys
    import ray
    from skyray.executors.ray import EMULATED_SLOT
    ray.init(address="local", num_cpus=2, resources={EMULATED_SLOT: 64}, include_dashboard=False,
             log_to_driver=False, logging_level=logging.ERROR, object_store_memory=200 << 20)
    from skyray.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _setup(tmp_path: Path) -> tuple[list[str], Path]:
    import yaml

    (tmp_path / "film.yaml").write_text(yaml.safe_dump(FILM, sort_keys=False))
    (tmp_path / "run.py").write_text(RUNNER)
    out = tmp_path / "out"
    return [sys.executable, str(tmp_path / "run.py"), "render", str(tmp_path / "film.yaml"), "--out", str(out)], out


def _check_common(text: str, out: Path) -> None:
    assert "(pid=" not in text and "it/s" not in text and "INFO" not in text, text
    assert "WARNING: group0.0/b0: a prompt of" in text, text  # the actor's warning, as an event
    assert f"film: {out}/film.mp4 (50 frames at 8 fps)" in text
    log = (out / "render.log").read_text()
    assert len(re.findall(r"\] window \d+/5 ", log)) == 5 and "a prompt of" in log


@pytest.mark.slow
def test_a_ray_render_in_a_log_is_one_line_per_window(tmp_path):
    cmd, out = _setup(tmp_path)
    env = {**os.environ, "RAY_ADDRESS": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    windows = [ln for ln in text.splitlines() if re.search(r"\] window \d+/5 ", ln)]
    assert len(windows) == 5 and "\x1b" not in text and "\r" not in text, text
    _check_common(text, out)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by the README's test command")
def test_a_ray_render_on_a_tty_is_one_display(tmp_path):
    cmd, out = _setup(tmp_path)
    session = f"skyray-{uuid.uuid4().hex[:8]}"
    done = tmp_path / "rc"
    shell = " ".join(f"'{c}'" for c in cmd) + f"; echo $? > '{done}'; sleep 600"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "140", "-y", "40", shell], check=True,
                   cwd=ROOT, env={**os.environ, "RAY_ADDRESS": "", "TERM": "xterm-256color"})
    try:
        deadline, seen_live = time.monotonic() + 400, False
        while not done.exists() and time.monotonic() < deadline:
            pane = _pane(session)
            seen_live |= bool(re.search(r"shot \w+ .*window \d/\d", pane))  # the live display, mid-render
            time.sleep(0.3)
        pane = _pane(session)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    assert done.exists() and done.read_text().strip() == "0", pane
    _check_common(pane, out)
    # One film line, updated in place (not a new bar per refresh), and the lines above it in order.
    assert len(re.findall(r"5/5 windows \| \S+ elapsed \| ETA \S+ \| [\d.]+ GPU-s", pane)) == 1, pane
    assert pane.count("shot open: 25 frames") == 1 and "] window" not in pane, pane  # windows: in the display
    assert seen_live


def _pane(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-200"], capture_output=True,
                          text=True).stdout
