"""Where a film's outputs live: a local folder, or any ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``file://`` ...).

Encoding needs a real file, so a remote location renders into a local staging folder and uploads each shot as
soon as it is finished (a lost machine loses at most the shot in progress) and the film at the end.  At start
the finished shots already at the location are pulled back, so a rerun from any machine reuses them.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path


def is_uri(target: str | Path) -> bool:
    return "://" in str(target)


class OutputLocation:
    def __init__(self, target: str | Path, staging: str | Path | None = None) -> None:
        self.target = str(target)
        self.remote = is_uri(target)
        if not self.remote:
            self.local = Path(target)
            return
        import pyarrow.fs as pafs

        self._fs, self._root = pafs.FileSystem.from_uri(self.target)
        digest = hashlib.sha256(self.target.encode()).hexdigest()[:16]
        self.local = Path(staging) if staging else Path(tempfile.gettempdir()) / "skyray-staging" / digest

    def pull(self) -> list[str]:
        """Copy finished shot records and clips from the location into staging; returns what was copied."""
        if not self.remote:
            return []
        import pyarrow.fs as pafs

        shots = f"{self._root.rstrip('/')}/shots"
        info = self._fs.get_file_info(shots)
        if info.type != pafs.FileType.Directory:
            return []
        (self.local / "shots").mkdir(parents=True, exist_ok=True)
        got = []
        for f in self._fs.get_file_info(pafs.FileSelector(shots)):
            if f.type == pafs.FileType.File:
                dest = self.local / "shots" / f.base_name
                with self._fs.open_input_stream(f.path) as src, open(dest, "wb") as out:
                    out.write(src.read())
                got.append(f"shots/{f.base_name}")
        return got

    def push(self, relpaths: list[str]) -> None:
        """Upload ``relpaths`` (relative to the staging folder) that exist; a no-op for local targets."""
        if not self.remote:
            return
        for rel in relpaths:
            src = self.local / rel
            if not src.is_file():
                continue
            dest = f"{self._root.rstrip('/')}/{rel}"
            self._fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            with open(src, "rb") as f, self._fs.open_output_stream(dest) as out:
                out.write(f.read())
