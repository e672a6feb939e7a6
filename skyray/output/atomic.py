"""Atomic file writes: write under a temporary name in the destination folder, rename only on success.

Readers (the Serve job store, a resumed render checking which shots exist) then never see a partial file: a path
either holds a complete output or does not exist. The temporary name lives in the same folder so the final
``os.replace`` is a rename within one filesystem, which is atomic on POSIX.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path_for(path: str | os.PathLike) -> Path:
    """A unique hidden sibling of ``path`` (same folder, so a rename onto ``path`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on normal exit it replaces ``path``, on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
