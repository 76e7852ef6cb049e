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
REQUIRED_GAZE_VERSION = 4

BUILD_HINT = "build it with `gaze-edge runtime build` (or `make runtime` in a checkout)"


class RuntimeMissing(ImportError):
    """The patched llama.cpp runtime is not installed in this environment."""


try:
    from llama_cpp import llama_cpp as _llama_cpp
except ImportError as e:  # pragma: no cover - exercised only without llama-cpp-python
    raise RuntimeMissing(f"llama-cpp-python is not installed; {BUILD_HINT}") from e

_lib = _llama_cpp._lib


def _bind(name: str, argtypes: list[Any], restype: Any, lib=None, what: str = "llama.cpp"):
    """Declare a symbol of a loaded library (llama by default) once; a missing one means a stock
    (unpatched) build."""
    lib = _lib if lib is None else lib
    try:
        func = getattr(lib, name)
    except AttributeError as e:
        raise RuntimeMissing(
            f"the loaded {what} ({lib._name}) has no {name}: it is not gaze-edge's patched "
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

# enum llama_gaze_score_mode, indexed like gaze_edge.gguf_names.SCORE_MODE_IDS
LLAMA_GAZE_SCORE_GQA_MEAN = 0
LLAMA_GAZE_SCORE_PER_HEAD = 1
LLAMA_GAZE_SCORE_LAYER_MEAN = 2

_ctx_p = ctypes.c_void_p  # struct llama_context *
_int32_p = ctypes.POINTER(ctypes.c_int32)


# struct llama_gaze_image {
#     llama_seq_id seq_id;
#     llama_pos    pos;
#     int32_t      nx;       // grid width, in tokens
#     int32_t      ny;       // grid height, in tokens
#     int32_t      region_w;
#     int32_t      region_h;
# };
class llama_gaze_image(ctypes.Structure):
    _fields_ = [
        ("seq_id", ctypes.c_int32),
        ("pos", ctypes.c_int32),
        ("nx", ctypes.c_int32),
        ("ny", ctypes.c_int32),
        ("region_w", ctypes.c_int32),
        ("region_h", ctypes.c_int32),
    ]


# LLAMA_API void llama_gaze_set_enabled(struct llama_context * ctx, bool enabled);
llama_gaze_set_enabled = _bind("llama_gaze_set_enabled", [_ctx_p, ctypes.c_bool], None)
# LLAMA_API bool llama_gaze_get_enabled(const struct llama_context * ctx);
llama_gaze_get_enabled = _bind("llama_gaze_get_enabled", [_ctx_p], ctypes.c_bool)

# LLAMA_API bool llama_gaze_set_top_k(struct llama_context * ctx, int32_t top_k, float keep_ratio);
llama_gaze_set_top_k = _bind("llama_gaze_set_top_k", [_ctx_p, ctypes.c_int32, ctypes.c_float], ctypes.c_bool)
# LLAMA_API void llama_gaze_get_top_k(const struct llama_context * ctx, int32_t * top_k, float * keep_ratio);
llama_gaze_get_top_k = _bind(
    "llama_gaze_get_top_k", [_ctx_p, _int32_p, ctypes.POINTER(ctypes.c_float)], None
)

# LLAMA_API bool llama_gaze_set_score_mode(struct llama_context * ctx, enum llama_gaze_score_mode mode);
llama_gaze_set_score_mode = _bind("llama_gaze_set_score_mode", [_ctx_p, ctypes.c_int], ctypes.c_bool)
# LLAMA_API enum llama_gaze_score_mode llama_gaze_get_score_mode(const struct llama_context * ctx);
llama_gaze_get_score_mode = _bind("llama_gaze_get_score_mode", [_ctx_p], ctypes.c_int)

# LLAMA_API bool llama_gaze_set_n_dense_layers(struct llama_context * ctx, int32_t n_dense_layers);
llama_gaze_set_n_dense_layers = _bind("llama_gaze_set_n_dense_layers", [_ctx_p, ctypes.c_int32], ctypes.c_bool)
# LLAMA_API int32_t llama_gaze_get_n_dense_layers(const struct llama_context * ctx);
llama_gaze_get_n_dense_layers = _bind("llama_gaze_get_n_dense_layers", [_ctx_p], ctypes.c_int32)

# LLAMA_API void llama_gaze_set_gather(struct llama_context * ctx, bool gather);
llama_gaze_set_gather = _bind("llama_gaze_set_gather", [_ctx_p, ctypes.c_bool], None)
# LLAMA_API bool llama_gaze_get_gather(const struct llama_context * ctx);
llama_gaze_get_gather = _bind("llama_gaze_get_gather", [_ctx_p], ctypes.c_bool)

# LLAMA_API void llama_gaze_set_generated(struct llama_context * ctx, bool generated);
llama_gaze_set_generated = _bind("llama_gaze_set_generated", [_ctx_p, ctypes.c_bool], None)
# LLAMA_API bool llama_gaze_get_generated(const struct llama_context * ctx);
llama_gaze_get_generated = _bind("llama_gaze_get_generated", [_ctx_p], ctypes.c_bool)

# LLAMA_API int32_t llama_gaze_add_image(struct llama_context * ctx, const struct llama_gaze_image * image);
llama_gaze_add_image = _bind(
    "llama_gaze_add_image", [_ctx_p, ctypes.POINTER(llama_gaze_image)], ctypes.c_int32
)
# LLAMA_API int32_t llama_gaze_n_images(const struct llama_context * ctx, llama_seq_id seq_id, int32_t * n_regions);
llama_gaze_n_images = _bind("llama_gaze_n_images", [_ctx_p, ctypes.c_int32, _int32_p], ctypes.c_int32)

# LLAMA_API void llama_gaze_set_trace(struct llama_context * ctx, bool enabled);
llama_gaze_set_trace = _bind("llama_gaze_set_trace", [_ctx_p, ctypes.c_bool], None)
# LLAMA_API int32_t llama_gaze_get_trace(
#         struct llama_context * ctx,
#                      int32_t   il,
#                      int32_t * n_head,
#                      int32_t * image_ids,
#                      int32_t * regions,
#                      int32_t   n_max);
llama_gaze_get_trace = _bind(
    "llama_gaze_get_trace", [_ctx_p, ctypes.c_int32, _int32_p, _int32_p, _int32_p, ctypes.c_int32],
    ctypes.c_int32,
)


# The mtmd side, bound on the libmtmd llama-cpp-python has loaded.
try:
    from llama_cpp import mtmd_cpp as _mtmd_cpp
except (ImportError, OSError) as e:  # pragma: no cover - a wheel built without mtmd
    raise RuntimeMissing(f"llama-cpp-python has no mtmd library; {BUILD_HINT}") from e

_libmtmd = _mtmd_cpp._libmtmd


def _bind_mtmd(name: str, argtypes: list[Any], restype: Any):
    return _bind(name, argtypes, restype, lib=_libmtmd, what="mtmd")


# MTMD_API bool mtmd_gaze_get_params(const mtmd_context * ctx, int32_t * region_w, int32_t * region_h, int32_t * n_ctx_tokens);
mtmd_gaze_get_params = _bind_mtmd(
    "mtmd_gaze_get_params", [ctypes.c_void_p, _int32_p, _int32_p, _int32_p], ctypes.c_bool
)
# MTMD_API bool mtmd_gaze_set_params(mtmd_context * ctx, int32_t region_w, int32_t region_h, int32_t n_ctx_tokens);
mtmd_gaze_set_params = _bind_mtmd(
    "mtmd_gaze_set_params", [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32], ctypes.c_bool
)
# MTMD_API bool mtmd_gaze_get_ctx_pooled(const mtmd_context * ctx);
mtmd_gaze_get_ctx_pooled = _bind_mtmd("mtmd_gaze_get_ctx_pooled", [ctypes.c_void_p], ctypes.c_bool)
# MTMD_API void mtmd_image_tokens_get_grid(const mtmd_image_tokens * image_tokens, int32_t * nx, int32_t * ny);
mtmd_image_tokens_get_grid = _bind_mtmd(
    "mtmd_image_tokens_get_grid", [ctypes.c_void_p, _int32_p, _int32_p], None
)
# MTMD_API int32_t mtmd_image_tokens_get_n_ctx_tokens(const mtmd_image_tokens * image_tokens);
mtmd_image_tokens_get_n_ctx_tokens = _bind_mtmd(
    "mtmd_image_tokens_get_n_ctx_tokens", [ctypes.c_void_p], ctypes.c_int32
)


def mtmd_library_path() -> str:
    """Path of the mtmd library these bindings talk to."""
    return str(_libmtmd._name)
