"""``skyray batch prompts.jsonl``: many independent shot requests through Ray Data.

Each line is one JSON object (``prompt``, ``frames`` or ``duration``, optional ``seed``, ``image``, ``end_image``
and sampling settings).  Every line becomes a one-shot storyboard validated like any other, so a bad line is
reported in the index with the same clear message and the others still render.  Valid requests flow through
``map_batches`` over a pool of renderer actors (one model replica each, loaded once).
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
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
        # The request's files travel as bytes: the renderer actor may be on a node that cannot see this one's disk.
        inputs = {}
        shot = data["shots"][0]
        for key in ("image", "end_image"):
            if shot.get(key):
                name = f"{key}{Path(shot[key]).suffix}"
                inputs[name] = (path.parent / shot[key]).read_bytes()
                shot[key] = name
        valid.append({"id": rid, "line": n, "request": line, "storyboard": json.dumps(data),
                      "inputs": json.dumps({k: base64.b64encode(v).decode() for k, v in inputs.items()})})
    return valid, invalid


class BatchRenderer:
    """Ray Data actor: one render session (one model replica) rendering requests one at a time.

    Each request renders into this node's own scratch folder; its film comes back in the row as bytes and the
    driver writes it into ``--out``, so renderer actors on any node of a cluster work."""

    def __init__(self, model: str, device: str | None = None) -> None:
        from skyray.session import RenderSession, SessionConfig

        self.session = RenderSession(SessionConfig(model, executor="local", device=device, progress=False))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows: dict[str, list] = {k: [] for k in ("id", "line", "request", "status", "film", "seconds", "error")}
        for rid, line, request, sb, inputs in zip(batch["id"], batch["line"], batch["request"], batch["storyboard"],
                                                  batch["inputs"]):
            t0 = time.perf_counter()
            status, film, error = "done", None, None
            work = Path(tempfile.mkdtemp(prefix=f"skyray-batch-{rid}-"))
            try:
                for name, data in json.loads(inputs).items():
                    (work / name).write_bytes(base64.b64decode(data))
                board = storyboard_from_data(json.loads(sb), work, f"request {rid}")
                # Requests with "enhance": true get their prompt rewritten first (cached, its own actor).
                _, plan = self.session.prepare(board)
                self.session.render(plan, work / "out")
                film = (work / "out" / "film.mp4").read_bytes()
            except Exception as err:  # one failed request must not stop the batch
                status, error = "failed", f"{type(err).__name__}: {err}"
            finally:
                shutil.rmtree(work, ignore_errors=True)
            for k, v in (("id", rid), ("line", int(line)), ("request", request), ("status", status),
                         ("film", film), ("seconds", round(time.perf_counter() - t0, 3)), ("error", error)):
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
    address: str | None = None,
) -> list[dict]:
    """Render every valid request into ``out_dir`` (a folder or a ``pyarrow.fs`` URI) as ``<id>.mp4``; write
    ``index.jsonl`` (one row per input line, in line order).  ``address`` joins an existing Ray cluster."""
    import ray

    from skyray.executors.ray import EMULATED_SLOT, ensure_ray
    from skyray.output.location import OutputLocation

    out = OutputLocation(out_dir)
    film = {"model": model, "resolution": resolution, "fps": fps, "defaults": dict(defaults or {})}
    valid, invalid = parse_requests(requests, film)
    rows = list(invalid)
    if valid:
        ensure_ray(address)
        gpu = bool(ray.cluster_resources().get("GPU", 0)) if use_gpu is None else use_gpu
        emulated = ray.cluster_resources().get(EMULATED_SLOT, 0) >= 1
        ds = ray.data.from_items(valid).map_batches(
            BatchRenderer,
            fn_constructor_kwargs={"model": model, "device": "cuda" if gpu else "cpu"},
            batch_size=1,
            concurrency=groups,
            num_gpus=1 if gpu else 0,
            num_cpus=1 if gpu or not emulated else 0,
            # Without GPUs a renderer takes one CPU-emulated group slot where the cluster has them, else a CPU.
            resources={EMULATED_SLOT: 1} if not gpu and emulated else None,
        )
        for r in ds.iter_rows():
            film_bytes = r.pop("film")
            r["output"] = None
            if film_bytes is not None:
                out.write_bytes(f"{r['id']}.mp4", film_bytes)
                r["output"] = out.redacted.rstrip("/") + f"/{r['id']}.mp4"
            rows.append(r)
    rows.sort(key=lambda r: r["line"])
    index = "".join(json.dumps({k: r[k] for k in ("id", "line", "request", "status", "output", "seconds", "error")})
                    + "\n" for r in rows)
    out.write_bytes("index.jsonl", index.encode())
    return rows
