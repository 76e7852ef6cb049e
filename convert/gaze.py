"""Gaze settings and context tokens of a gaze checkpoint, as GGUF keys and tensors.

A gaze checkpoint is an HF checkpoint whose config.json has a ``gaze`` object (GazeConfig's
fields) and whose gaze.safetensors holds ``context_tokens`` [n_context_tokens, n_embd_text]
(docs/FORMAT.md, gaze_edge/checkpoint.py). A checkpoint without them is dense and converts with
no gaze keys.

Where each item goes (names from gaze_edge/gguf_names.py, GAZE_SPEC.md "Hyper-parameters"):
- language-model GGUF: ``{arch}.attention.gaze.top_k`` (u32), ``.keep_ratio`` (f32),
  ``.score_mode`` (u32, SCORE_MODE_IDS);
- mmproj GGUF: ``clip.vision.gaze.region_size`` (u32[2]), ``clip.vision.gaze.n_ctx_tokens``
  (u32), tensor ``v.gaze.ctx_tok`` (f32, ggml ne [n_embd_text, n_ctx_tokens]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gaze_edge import gguf_names
from gaze_edge.config import GazeConfig
from gaze_edge.convert.errors import ConvertError


@dataclass(frozen=True)
class KeyValue:
    """One GGUF key: ``vtype`` (and ``sub_type`` for arrays) are gguf.GGUFValueType names.

    ``key`` may hold ``{arch}``, filled in by whoever knows the architecture.
    """

    key: str
    vtype: str
    value: Any
    sub_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "vtype": self.vtype, "value": self.value, "sub_type": self.sub_type}


@dataclass(frozen=True)
class GazeParts:
    config: GazeConfig
    context_tokens: np.ndarray  # [n_context_tokens, n_embd_text] float32


def read_gaze(folder: Path, config: dict[str, Any]) -> GazeParts | None:
    """The checkpoint's gaze parts (read by gaze_edge.checkpoint, the format's one reader), or
    None for a dense checkpoint; any mismatch is a ConvertError."""
    from gaze_edge import checkpoint

    if checkpoint.CONFIG_KEY not in config:
        if (folder / checkpoint.WEIGHTS_FILE).is_file():
            raise ConvertError(f"{folder / checkpoint.WEIGHTS_FILE} is present but config.json has no "
                               f"'{checkpoint.CONFIG_KEY}' settings")
        return None
    try:
        gaze, ctx = checkpoint.load_gaze(folder)
    except checkpoint.GazeCheckpointError as err:
        raise ConvertError(str(err)) from err
    return GazeParts(gaze, np.ascontiguousarray(ctx.numpy(), dtype=np.float32))


def llm_keys(parts: GazeParts | None) -> list[KeyValue]:
    """Selection defaults for the language-model GGUF (``{arch}`` left to fill)."""
    if parts is None:
        return []
    g = parts.config
    return [
        KeyValue(gguf_names.LLM_TOP_K, "UINT32", int(g.top_k)),
        KeyValue(gguf_names.LLM_KEEP_RATIO, "FLOAT32", float(g.keep_ratio)),
        KeyValue(gguf_names.LLM_SCORE_MODE, "UINT32", gguf_names.SCORE_MODE_IDS[g.score_mode]),
    ]


def mmproj_keys(parts: GazeParts | None) -> list[KeyValue]:
    if parts is None:
        return []
    g = parts.config
    return [
        KeyValue(gguf_names.MMPROJ_REGION_SIZE, "ARRAY", [int(g.region_h), int(g.region_w)], "UINT32"),
        KeyValue(gguf_names.MMPROJ_N_CONTEXT_TOKENS, "UINT32", int(g.n_context_tokens)),
    ]


def mmproj_tensors(parts: GazeParts | None) -> dict[str, np.ndarray]:
    """{name: array} for the mmproj (none when there are no context tokens: GGUF has no empty tensors)."""
    if parts is None or parts.config.n_context_tokens == 0:
        return {}
    return {gguf_names.TENSOR_CONTEXT_TOKENS: parts.context_tokens}
