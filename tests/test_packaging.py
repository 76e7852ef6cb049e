"""The wheel keeps cli/convert under gaze_edge: no generic top-level names in site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_cli_and_convert_under_gaze_edge(tmp_path):
    # build from a clean copy: setuptools' build/ folder in a checkout can carry stale files
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".*cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(src)],
        check=True,
    )
    wheel = next(tmp_path.glob("gaze_edge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops <= {"gaze_edge", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "gaze_edge/cli.py" in names
    assert "gaze_edge/convert/__init__.py" in names
    assert "gaze_edge/runtime/build.py" in names
    # the embedded default model ships; its training checkpoint (default-hf) stays in the repo
    assert {"gaze_edge/models/default/gaze-scenes-f32.gguf",
            "gaze_edge/models/default/mmproj-gaze-scenes-f32.gguf"} <= set(names)
    assert {"gaze_edge/models/video/gaze-scenes-video-f32.gguf",
            "gaze_edge/models/video/mmproj-gaze-scenes-video-f32.gguf"} <= set(names)
    assert not any("default-hf" in n or "video-hf" in n for n in names)
    entry = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "gaze-edge = gaze_edge.cli:main" in entry
