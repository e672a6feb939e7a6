"""``skyray batch prompts.jsonl``: many independent shot requests through Ray Data.

Each line is one JSON object (``prompt``, ``frames`` or ``duration``, optional ``seed``, ``image``, ``end_image``
and sampling settings).  Every line becomes a one-shot storyboard validated like any other, so a bad line is
reported in the index with the same clear message and the others still render.  Valid requests flow through
``map_batches`` over a pool of renderer actors (one model replica each, loaded once).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from skyray.storyboard import SAMPLING_FIELDS, InputLimits, StoryboardError, storyboard_from_data

SHOT_FIELDS = {"prompt", "frames", "duration", "seed", "image", "end_image"}


def parse_requests(
    path: str | Path, film: dict[str, Any], limits: InputLimits | None = None
) -> tuple[list[dict], list[dict]]:
    """(valid rows, index rows of invalid lines); validation only, no model.  Each line is held to ``limits``
    (those of one storyboard), and a line that is not UTF-8 or nests too deeply is one invalid line."""
    path, limits = Path(path), limits or InputLimits()
    valid, invalid = [], []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        rid = f"r{n:05d}"
        line = raw.decode("utf-8", errors="replace")
        try:
            if len(raw) > limits.max_bytes:
                raise ValueError(f"the line is {len(raw)} bytes, over the limit of {limits.max_bytes}")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"not UTF-8 text (byte {exc.start} of the line)") from None
            try:
                req = json.loads(line)
            except RecursionError:  # the JSON decoder recurses per nesting level
                raise ValueError(f"nested too deeply: more than {limits.max_depth} levels") from None
            if not isinstance(req, dict):
                raise ValueError("a request must be a JSON object")
            unknown = sorted(set(req) - SHOT_FIELDS - set(SAMPLING_FIELDS) - {"id"})
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(unknown)}")
            data = {**film, "title": rid, "shots": [{"id": "shot", **{k: v for k, v in req.items() if k != "id"}}]}
            storyboard_from_data(data, path.parent, f"{path.name} line {n}", limits=limits)
        except (ValueError, StoryboardError) as err:
            msg = str(err).replace("\n", "; ")
            invalid.append({"id": rid, "line": n, "request": line[:500], "status": "invalid",
                            "output": None, "seconds": 0.0, "error": f"{path.name}:{n}: {msg}"})
            continue
        valid.append({"id": rid, "line": n, "request": line, "storyboard": json.dumps(data)})
    return valid, invalid


class BatchRenderer:
    """Ray Data actor: one model replica rendering requests one at a time."""

    def __init__(self, model: str, out_dir: str, base_dir: str, device: str | None = None) -> None:
        from skyray.executors.local import LocalExecutor

        self.executor = LocalExecutor(model, device)
        self.out = Path(out_dir)
        self.base = Path(base_dir)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from skyray.plan import compile_plan
        from skyray.render import render_film

        rows: dict[str, list] = {k: [] for k in ("id", "line", "request", "status", "output", "seconds", "error")}
        for rid, line, request, sb in zip(batch["id"], batch["line"], batch["request"], batch["storyboard"]):
            t0 = time.perf_counter()
            status, output, error = "done", None, None
            try:
                from skyray.enhance import enhance_before_render

                board = storyboard_from_data(json.loads(sb), self.base, f"request {rid}")
                # Requests with "enhance": true get their prompt rewritten first (cached, its own actor).
                _, plan = enhance_before_render(board, compile_plan(board), use_ray=True, quiet=True)
                work = self.out / "work" / rid
                render_film(plan, work, self.executor)
                output = str(self.out / f"{rid}.mp4")
                shutil.copyfile(work / "film.mp4", output)
            except Exception as err:  # one failed request must not stop the batch
                status, error = "failed", f"{type(err).__name__}: {err}"
            for k, v in (("id", rid), ("line", int(line)), ("request", request), ("status", status),
                         ("output", output), ("seconds", round(time.perf_counter() - t0, 3)), ("error", error)):
                rows[k].append(v)
        return rows


def run_batch(
    requests: str | Path,
    out_dir: str | Path,
    model: str = "tiny",
    resolution: str = "540p",
    fps: int = 24,
    defaults: dict[str, Any] | None = None,
    groups: int = 1,
    use_gpu: bool | None = None,
) -> list[dict]:
    """Render every valid request; write ``index.jsonl`` (one row per input line, in line order)."""
    import ray

    from skyray.executors.ray import EMULATED_SLOT, ensure_ray

    out = Path(out_dir)
    film = {"model": model, "resolution": resolution, "fps": fps, "defaults": dict(defaults or {})}
    valid, invalid = parse_requests(requests, film)
    rows = list(invalid)
    if valid:
        ensure_ray()
        gpu = bool(ray.cluster_resources().get("GPU", 0)) if use_gpu is None else use_gpu
        out.mkdir(parents=True, exist_ok=True)
        ds = ray.data.from_items(valid).map_batches(
            BatchRenderer,
            fn_constructor_kwargs={"model": model, "out_dir": str(out), "base_dir": str(Path(requests).parent),
                                   "device": "cuda" if gpu else "cpu"},
            batch_size=1,
            concurrency=groups,
            num_gpus=1 if gpu else 0,
            num_cpus=0 if not gpu else 1,
            resources=None if gpu else {EMULATED_SLOT: 1},
        )
        rows += ds.take_all()
    rows.sort(key=lambda r: r["line"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "index.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("id", "line", "request", "status", "output", "seconds", "error")})
                    + "\n")
    return rows
