"""The Python side talks to the patched llama.cpp build, not a stock wheel."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from gaze_edge.runtime import build


def test_installed_runtime_is_the_current_patched_build():
    assert build.installed_key() == build.BuildSpec.from_env().key, (
        "the installed llama-cpp-python is not the build of the current patches; run `make runtime`"
    )


def test_gaze_version_comes_from_the_patched_library():
    from gaze_edge.runtime import bindings

    header = (build.source_dir() / "include/llama.h").read_text()
    want = int(re.search(r"#define LLAMA_GAZE_VERSION (\d+)", header).group(1))
    assert bindings.gaze_version() == want
    # the library llama-cpp-python loaded is the one installed with our build marker
    lib = Path(bindings.library_path()).resolve()
    assert (lib.parent.parent / build.MARKER).exists()


def test_a_stock_library_is_refused_with_the_build_command(monkeypatch):
    """A library without the gaze symbols (here: ggml-base) gives RuntimeMissing, not a crash."""
    from gaze_edge.runtime import bindings

    ggml = next(Path(bindings.library_path()).parent.glob("libggml-base.*"))
    monkeypatch.setattr(bindings, "_lib", ctypes.CDLL(str(ggml)))
    with pytest.raises(bindings.RuntimeMissing, match="gaze-edge runtime build"):
        bindings._bind("llama_gaze_version", [], ctypes.c_int32)
