"""The wheel keeps cli/convert under gaze_edge: no generic top-level names in site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_cli_and_convert_under_gaze_edge(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    wheel = next(tmp_path.glob("gaze_edge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops <= {"gaze_edge", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "gaze_edge/cli.py" in names
    assert "gaze_edge/convert/__init__.py" in names
    assert "gaze_edge/runtime/build.py" in names
    entry = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "gaze-edge = gaze_edge.cli:main" in entry
