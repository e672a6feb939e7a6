"""Where a Serve job's files live: its inputs, its rendered shots, film and manifest, under ``<outputs>/<id>/``.

``outputs`` is a local folder (the default, ``<data_dir>/jobs``) or any ``pyarrow.fs`` URI (``s3://...``) that
the ingress and every renderer reach.  The ingress checks a request against a local staging folder (the
storyboard validates real paths), then ``publish`` moves what it wrote into the job's folder in the location;
a renderer fetches the inputs back into a local folder and renders into the location; downloads stream from it
(Range requests included); retention deletes the job's folder there.  Nothing here names the URI with its
credentials: ``redacted`` is what logs may show.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from starlette.responses import FileResponse, Response, StreamingResponse

from skyray.output.location import OutputLocation

CHUNK = 1 << 20
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class JobFiles:
    def __init__(self, target: str | Path) -> None:
        self.location = OutputLocation(target)
        self.remote = self.location.remote
        self.redacted = self.location.redacted

    def __reduce__(self):
        return (JobFiles, (self.location.target,))

    def job_target(self, job_id: str) -> str | Path:
        """What ``render_film`` renders into for this job: its folder, or its URI prefix."""
        if not self.remote:
            return self.location.root / job_id
        return _child_uri(self.location.target, job_id)

    # ----------------------------------------------------------------------------------------------- ingress
    def publish(self, job_id: str, staging: Path) -> None:
        """Move the files the ingress wrote into ``staging`` (inputs, a continuation's parent shots) into the
        job's folder; nothing to do when the staging folder is that folder."""
        if not staging.is_dir():
            return
        if not self.remote and staging.resolve() == (self.location.root / job_id).resolve():
            return
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            self.location.upload(f"{job_id}/{path.relative_to(staging).as_posix()}", path)
        shutil.rmtree(staging, ignore_errors=True)

    def fetch(self, job_id: str, rel_dir: str, dest: Path, names: list[str] | None = None) -> list[str]:
        """Copy the files of the job's ``rel_dir`` (only ``names``, when given) into the local folder ``dest``;
        returns the names copied."""
        present = self.location.list(f"{job_id}/{rel_dir}")
        wanted = [n for n in present if names is None or n in names]
        if wanted:
            dest.mkdir(parents=True, exist_ok=True)
        for name in wanted:
            rel = f"{job_id}/{rel_dir}/{name}"
            local = self.location.local_path(rel)
            if local is not None:
                _link_or_copy(local, dest / name)
            else:
                self.location.download(rel, dest / name)
        return wanted

    # -------------------------------------------------------------------------------------------------- read
    def size(self, job_id: str, rel: str) -> int | None:
        return self.location.size(f"{job_id}/{rel}")

    def read_bytes(self, job_id: str, rel: str) -> bytes | None:
        return self.location.read_bytes(f"{job_id}/{rel}")

    def write_bytes(self, job_id: str, rel: str, data: bytes) -> None:
        self.location.write_bytes(f"{job_id}/{rel}", data)

    @contextlib.contextmanager
    def local_file(self, job_id: str, rel: str) -> Iterator[Path]:
        """A local path holding the file (for readers that need one: safetensors, ffmpeg); FileNotFoundError
        when it is not there."""
        local = self.location.local_path(f"{job_id}/{rel}")
        if local is not None:
            if not local.is_file():
                raise FileNotFoundError(rel)
            yield local
            return
        with tempfile.TemporaryDirectory(prefix="skyray-job-") as tmp:
            yield self.location.download(f"{job_id}/{rel}", Path(tmp) / Path(rel).name)

    def response(self, job_id: str, rel: str, media_type: str, range_header: str | None = None,
                 filename: str | None = None, headers: dict[str, str] | None = None) -> Response | None:
        """The file as an HTTP response honouring a single ``Range``; None when it is not there."""
        local = self.location.local_path(f"{job_id}/{rel}")
        if local is not None:
            if not local.is_file():
                return None
            return FileResponse(local, media_type=media_type, filename=filename, headers=headers)
        size = self.size(job_id, rel)
        if size is None:
            return None
        base = {"Accept-Ranges": "bytes", **(headers or {})}
        if filename:
            base["Content-Disposition"] = f'attachment; filename="{filename}"'
        span = byte_range(range_header, size)
        if span == "unsatisfiable":
            return Response(status_code=416, headers={**base, "Content-Range": f"bytes */{size}"})
        status, (start, end) = (200, (0, size - 1)) if span is None else (206, span)
        if status == 206:
            base["Content-Range"] = f"bytes {start}-{end}/{size}"
        base["Content-Length"] = str(max(0, end - start + 1))
        location, path = self.location, f"{job_id}/{rel}"

        def body() -> Iterator[bytes]:
            with location.open_input(path) as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        return
                    left -= len(chunk)
                    yield chunk

        return StreamingResponse(body(), status, headers=base, media_type=media_type)

    # ------------------------------------------------------------------------------------------------ delete
    def delete(self, job_id: str) -> None:
        self.location.delete_tree(job_id)


def byte_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """``(first, last)`` of a single ``bytes=`` range, ``"unsatisfiable"``, or None for the whole file (no
    header, a multi-range or a malformed one: RFC 9110 lets a server ignore those)."""
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:  # the last n bytes
        n = int(m[2])
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else "unsatisfiable"
    first = int(m[1])
    last = min(int(m[2]), size - 1) if m[2] else size - 1
    if first >= size or (m[2] and int(m[2]) < first):
        return "unsatisfiable"
    return first, last


def _child_uri(target: str, rel: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(target)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + rel))


def _link_or_copy(src: Path, dst: Path) -> None:
    # Finished files are never rewritten in place (every writer renames a temporary), so a hard link is safe.
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

