"""Where a film's outputs live: a local folder, or any ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``file://`` ...).

The location is the one source of truth for a render: finished shots, window checkpoints, the film and its
manifest are written here by the driver as they arrive (from whichever node produced them), and a resumed or
retried render reads them back from here, never from a path on some other node.  ffmpeg needs real files, so the
film is assembled in a local scratch folder (``scratch()``) and uploaded.

A URI may carry credentials (``?access_key=...&secret_key=...`` or ``user:pass@``); ``redacted`` is the form that
may appear in manifests, events and logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

# Query parameters of a pyarrow.fs URI that are secrets (S3, GCS, Azure spellings).
_SECRET_KEYS = {"access_key", "secret_key", "session_token", "access_token", "account_key", "sas_token",
                "password", "token", "credential", "credentials"}


def is_uri(target: str | Path) -> bool:
    return "://" in str(target)


def redact(target: str | Path) -> str:
    """``target`` with any credentials replaced by ``***`` (user info and secret query parameters)."""
    text = str(target)
    if not is_uri(text):
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = urlencode([(k, "***" if k.lower() in _SECRET_KEYS else v) for k, v in parse_qsl(parts.query)],
                      safe="*:")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _filesystem(target: str):
    """``pyarrow.fs.FileSystem.from_uri``, but S3 gets patient timeouts and retries: the SDK's 3 s request timeout
    turns a busy store into failed uploads."""
    import pyarrow.fs as pafs

    parts = urlsplit(target)
    if parts.scheme != "s3":
        return pafs.FileSystem.from_uri(target)
    q = dict(parse_qsl(parts.query))
    known = {"region", "scheme", "endpoint_override", "allow_bucket_creation", "allow_bucket_deletion"}
    if set(q) - known:
        return pafs.FileSystem.from_uri(target)  # let pyarrow name what it does not understand
    user, _, host = parts.netloc.rpartition("@")
    key, _, secret = user.partition(":")
    fs = pafs.S3FileSystem(
        access_key=unquote(key) or None, secret_key=unquote(secret) or None, region=q.get("region"),
        scheme=q.get("scheme", "https"), endpoint_override=q.get("endpoint_override"),
        allow_bucket_creation=q.get("allow_bucket_creation", "").lower() in ("1", "true"),
        allow_bucket_deletion=q.get("allow_bucket_deletion", "").lower() in ("1", "true"),
        request_timeout=60, connect_timeout=10, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=6))
    return fs, f"{host}{parts.path}"


def _retrying(put, what: str, attempts: int = 4) -> None:
    """Run a whole-object write again when the store fails it (object stores have transient errors: a throttled
    or dropped multipart completion); writing the same object again is harmless."""
    import time

    for i in range(attempts):
        try:
            put()
            return
        except OSError as err:
            if i + 1 == attempts:
                raise OSError(f"{what} failed {attempts} times: {redact(str(err))}") from None
            time.sleep(0.5 * 2**i)


class OutputLocation:
    """Read and write files relative to the location's root (``rel`` paths use ``/``)."""

    def __init__(self, target: str | Path) -> None:
        self.target = str(target)
        self.remote = is_uri(target)
        self.redacted = redact(self.target)
        self._scratch: Path | None = None
        if self.remote:
            self._fs, self._root = _filesystem(self.target)
            self._root = self._root.rstrip("/")
            # One upload at a time from this process (the render loop and the progress thread both write): some
            # S3-compatible stores fail multipart uploads that complete concurrently.
            self._lock = threading.Lock()
        else:
            self.root = Path(target)

    # A location is sent to actors (Serve replicas) by its target string; the filesystem is rebuilt there.
    def __reduce__(self):
        return (OutputLocation, (self.target,))

    def _path(self, rel: str) -> str:
        return f"{self._root}/{rel}" if self._root else rel

    def local_path(self, rel: str) -> Path | None:
        """The file's path on this machine for a local location (for ``FileResponse``); None for a URI."""
        return None if self.remote else self.root / rel

    # --------------------------------------------------------------------------------------------------- write
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` whole: a reader never sees a half-written local file."""
        if not self.remote:
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
            return
        # Object stores make a finished upload visible at once, never part of one.
        path = self._path(rel)

        def put() -> None:
            self._fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self._fs.open_output_stream(path) as out:
                out.write(data)

        with self._lock:
            _retrying(put, f"writing {rel} to {self.redacted}")

    def upload(self, rel: str, src: str | Path) -> None:
        """Copy the local file ``src`` to ``rel`` in 8 MiB pieces (clips and films can be large)."""
        if not self.remote:
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if Path(src).resolve() != dest.resolve():
                tmp = dest.with_name(f".{dest.name}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
            return
        path = self._path(rel)

        def put() -> None:
            self._fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with open(src, "rb") as f, self._fs.open_output_stream(path) as out:
                for chunk in iter(lambda: f.read(8 << 20), b""):
                    out.write(chunk)

        with self._lock:
            _retrying(put, f"uploading {rel} to {self.redacted}")

    # ---------------------------------------------------------------------------------------------------- read
    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (self.root / rel).is_file()
        import pyarrow.fs as pafs

        return self._fs.get_file_info(self._path(rel)).type == pafs.FileType.File

    def size(self, rel: str) -> int | None:
        """Size in bytes, or None when the file is not there."""
        if not self.remote:
            p = self.root / rel
            return p.stat().st_size if p.is_file() else None
        import pyarrow.fs as pafs

        info = self._fs.get_file_info(self._path(rel))
        return info.size if info.type == pafs.FileType.File else None

    def read_bytes(self, rel: str) -> bytes | None:
        """The whole file, or None when it is not there."""
        if not self.remote:
            p = self.root / rel
            return p.read_bytes() if p.is_file() else None
        try:
            with self._fs.open_input_stream(self._path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def open_input(self, rel: str) -> Iterator:
        """A seekable binary file (``seek``, ``read``, ``tell``): Range downloads and header-only reads."""
        if not self.remote:
            with open(self.root / rel, "rb") as f:
                yield f
            return
        with self._fs.open_input_file(self._path(rel)) as f:
            yield f

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        with self.open_input(rel) as f:
            f.seek(offset)
            return f.read(length)

    def list(self, rel_dir: str) -> list[str]:
        """Names of the files directly in ``rel_dir`` (sorted; empty when it does not exist)."""
        if not self.remote:
            d = self.root / rel_dir
            return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self._path(rel_dir), allow_not_found=True)
        return sorted(f.base_name for f in self._fs.get_file_info(sel) if f.type == pafs.FileType.File)

    def download(self, rel: str, dest: str | Path) -> Path:
        """Copy ``rel`` to the local file ``dest`` (for tools that need a path: ffmpeg, the contact sheet)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.open_input(rel) as src, open(dest, "wb") as out:
            for chunk in iter(lambda: src.read(8 << 20), b""):
                out.write(chunk)
        return dest

    # -------------------------------------------------------------------------------------------------- delete
    def delete(self, rel: str) -> None:
        if not self.remote:
            with contextlib.suppress(FileNotFoundError):
                (self.root / rel).unlink()
            return
        with contextlib.suppress(FileNotFoundError, OSError):
            self._fs.delete_file(self._path(rel))

    def delete_tree(self, rel_dir: str) -> None:
        if not self.remote:
            shutil.rmtree(self.root / rel_dir, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError, OSError):
            self._fs.delete_dir(self._path(rel_dir))

    # ------------------------------------------------------------------------------------------------- scratch
    def scratch(self) -> Path:
        """A local folder for files that tools must see as paths: the location's own folder when it is local,
        else a folder under this machine's temp dir, named for the location (reused by a rerun)."""
        if not self.remote:
            self.root.mkdir(parents=True, exist_ok=True)
            return self.root
        if self._scratch is None:
            digest = hashlib.sha256(self.target.encode()).hexdigest()[:16]
            self._scratch = Path(tempfile.gettempdir()) / "skyray-scratch" / digest
            self._scratch.mkdir(parents=True, exist_ok=True)
        return self._scratch

    def local_copy(self, rel: str) -> Path:
        """A local path holding ``rel``: the file itself for a local location, a scratch copy for a URI."""
        if not self.remote:
            return self.root / rel
        return self.download(rel, self.scratch() / rel)

    def clear_scratch(self) -> None:
        if self.remote and self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
