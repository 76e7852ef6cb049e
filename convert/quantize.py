"""Quantization with llama.cpp's own quantizer (``llama_model_quantize`` of the patched library).

Input is the f32 GGUF the converter wrote (quantizing from the checkpoint's values, not from an
f16 rounding of them). llama.cpp decides per tensor what to keep (src/llama-quant.cpp): 1-D
tensors, norms, position and patch embeddings stay f32/f16; rows whose length is not a multiple
of the block size fall back to another type. It quantizes only tensors whose name ends in
"weight", so ``v.gaze.ctx_tok`` stays f32. The same call quantizes an mmproj (its "clip"
architecture exists in llama.cpp for this use).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from gaze_edge.convert.errors import ConvertError

# outtype -> llama_ftype name (llama.h)
LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


@contextlib.contextmanager
def _quiet_llama_cpp():
    """llama.cpp prints every tensor while quantizing; keep errors only."""
    from llama_cpp import _logger

    level = _logger.logger.level
    _logger.logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        _logger.logger.setLevel(level)


def require_quantizer(outtype: str):
    """The llama_cpp module, or a ConvertError saying how to get it (checked before converting)."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ConvertError(
            f"quantizing to {outtype} needs the patched llama.cpp runtime: run `gaze-edge runtime build`"
        ) from err
    return llama_cpp


def quantize(src: Path, dst: Path, outtype: str, n_threads: int = 0) -> None:
    """Quantize GGUF src (f32 or f16) to dst at outtype ("q8_0" or "q4_k_m")."""
    llama_cpp = require_quantizer(outtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[outtype])
    params.nthread = n_threads
    with _quiet_llama_cpp():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise ConvertError(f"llama.cpp's quantizer failed on {src.name} (code {rc})")
