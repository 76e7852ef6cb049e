"""Files users hand us and files we write.

``local_file``: the path of an image or video the user named (not a URL, present, not a folder).
``write_atomic``: a crash leaves the old file or the new one, never a half-written one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def local_file(source: str | os.PathLike, what: str, error: type[Exception]) -> Path:
    """``source`` as a local file's path; ``error`` (one line naming ``what``, e.g. "image") for a
    URL (nothing is downloaded), a path that does not exist, or a folder."""
    if isinstance(source, str) and source.lower().startswith(("http://", "https://")):
        raise error(f"{what} URLs are not downloaded; save the file and pass its path: {source[:100]}")
    path = Path(source)
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if path.is_dir():
        raise error(f"{what} path is a folder: {path}")
    return path
