"""Output files that appear only when complete.

Every file is written into a hidden staging folder inside OUTDIR, under a name that does not end
in .gguf, and moved to its final name (an atomic rename on the same file system) only after the
whole conversion succeeded. A failure or an interrupt removes the staging folder (and OUTDIR
itself if the conversion created it); a killed process leaves only the hidden folder, with no
.gguf in it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gaze_edge.convert.errors import ConvertError

STAGING_PREFIX = ".gaze-edge-convert-"


class Staging:
    def __init__(self, outdir: Path, folder: Path):
        self.outdir = outdir
        self.folder = folder
        self._final: dict[Path, Path] = {}

    def path(self, name: str) -> Path:
        """A scratch file path; not published."""
        return self.folder / f"{name}.partial"

    def output(self, final_name: str) -> Path:
        """Where to write what becomes OUTDIR/final_name on success."""
        staged = self.path(final_name)
        self._final[staged] = self.outdir / final_name
        return staged

    def publish(self) -> list[Path]:
        missing = [p.name for p in self._final if not p.is_file()]
        if missing:
            raise RuntimeError(f"outputs were not written: {missing}")
        for staged, final in self._final.items():
            os.replace(staged, final)
        return list(self._final.values())


@contextmanager
def staged_outputs(outdir: Path) -> Iterator[Staging]:
    """Staging for OUTDIR; call ``publish()`` at the end of the with-block to move outputs in."""
    created = not outdir.exists()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=outdir))
    except OSError as err:
        raise ConvertError(f"cannot write to {outdir}: {err}") from err
    ok = False
    try:
        yield Staging(outdir, folder)
        ok = True
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if not ok and created:
            with contextlib.suppress(OSError):
                outdir.rmdir()  # only if empty
