"""llama.cpp's and mtmd's log lines: out of the way unless verbose, and kept for error messages.

llama-cpp-python 0.3.36 maps ggml's log levels one off (its table reads WARN as ERROR), so its
non-verbose setting still prints warnings such as Qwen2-VL's ``load_hparams:`` lines. This module
installs one callback for llama.cpp, mtmd and clip with ggml.h's own levels: everything goes to
stderr when verbose; otherwise nothing is printed, and the last error lines are kept so that a
failure (a GGUF llama.cpp refuses, a projector mtmd refuses) can say why in one line.
"""

from __future__ import annotations

import collections
import ctypes
import sys
import threading

# enum ggml_log_level in ggml/include/ggml.h of the pinned tree
GGML_LOG_LEVEL_DEBUG, GGML_LOG_LEVEL_INFO, GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 1, 2, 3, 4, 5

_state = {"verbose": False, "level": 0}
_errors: collections.deque[str] = collections.deque(maxlen=8)
_lock = threading.Lock()
_callback = None  # the ctypes callback object, kept alive while llama.cpp holds it


def _on_log(level: int, text: bytes, user_data) -> None:
    if level != GGML_LOG_LEVEL_CONT:
        _state["level"] = level
    message = text.decode("utf-8", errors="replace") if text else ""
    if _state["verbose"]:
        print(message, end="", file=sys.stderr, flush=True)
    if _state["level"] == GGML_LOG_LEVEL_ERROR and message.strip():
        with _lock:
            _errors.append(message.strip())


def install(verbose: bool) -> None:
    """Route llama.cpp's, mtmd's and clip's logs here; print them only when ``verbose``."""
    global _callback
    from gaze_edge.runtime import bindings

    _state["verbose"] = bool(verbose)
    if _callback is None:
        llama_cpp = bindings._llama_cpp
        _callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
        bindings._mtmd_cpp.mtmd_helper_log_set(_callback, ctypes.c_void_p(0))


def take_errors() -> str:
    """The error lines logged since the last call, joined into one line ("" if none)."""
    with _lock:
        lines = list(_errors)
        _errors.clear()
    return "; ".join(lines)
