"""ctypes bindings for the gaze C API of the patched llama.cpp.

Bound on the very library llama-cpp-python has loaded (``llama_cpp.llama_cpp._lib``), in the
style of ``llama_cpp/llama_cpp_ext.py``: each binding carries its C declaration as a comment,
argtypes/restype are declared once. A stock llama-cpp-python wheel lacks these symbols; importing
this module then raises :class:`RuntimeMissing` with the command that builds the patched one.
"""

from __future__ import annotations

import ctypes
from typing import Any

# The gaze API version this module speaks (LLAMA_GAZE_VERSION in the patched llama.h).
REQUIRED_GAZE_VERSION = 1

BUILD_HINT = "build it with `gaze-edge runtime build` (or `make runtime` in a checkout)"


class RuntimeMissing(ImportError):
    """The patched llama.cpp runtime is not installed in this environment."""


try:
    from llama_cpp import llama_cpp as _llama_cpp
except ImportError as e:  # pragma: no cover - exercised only without llama-cpp-python
    raise RuntimeMissing(f"llama-cpp-python is not installed; {BUILD_HINT}") from e

_lib = _llama_cpp._lib


def _bind(name: str, argtypes: list[Any], restype: Any):
    """Declare a symbol of the loaded library once; a missing one means a stock (unpatched) build."""
    try:
        func = getattr(_lib, name)
    except AttributeError as e:
        raise RuntimeMissing(
            f"the loaded llama.cpp ({_lib._name}) has no {name}: it is not gaze-edge's patched "
            f"build; {BUILD_HINT}"
        ) from e
    func.argtypes = argtypes
    func.restype = restype
    return func


# LLAMA_API int32_t llama_gaze_version(void);
llama_gaze_version = _bind("llama_gaze_version", [], ctypes.c_int32)


def gaze_version() -> int:
    """LLAMA_GAZE_VERSION of the loaded library."""
    return int(llama_gaze_version())


def library_path() -> str:
    """Path of the llama library these bindings talk to."""
    return str(_lib._name)


if gaze_version() < REQUIRED_GAZE_VERSION:
    raise RuntimeMissing(
        f"the loaded llama.cpp has gaze API {gaze_version()}, gaze-edge needs "
        f">= {REQUIRED_GAZE_VERSION}; {BUILD_HINT}"
    )
