"""Gaze settings and context tokens of a gaze checkpoint, as GGUF keys and tensors.

A gaze checkpoint is an HF checkpoint whose config.json has a ``gaze`` object (GazeConfig's
fields) and whose gaze.safetensors holds ``context_tokens`` [n_context_tokens, n_embd_text]
(docs/FORMAT.md, gaze_edge/checkpoint.py). A checkpoint without them is dense and converts with
no gaze keys.

Where each item goes (names from gaze_edge/gguf_names.py, GAZE_SPEC.md "Hyper-parameters"):
- language-model GGUF: ``{arch}.attention.gaze.top_k`` (u32), ``.keep_ratio`` (f32),
  ``.score_mode`` (u32, SCORE_MODE_IDS), ``.n_dense_layers`` (u32, only when > 0);
- mmproj GGUF: ``clip.vision.gaze.region_size`` (u32[2]), ``clip.vision.gaze.n_ctx_tokens``
  (u32), ``clip.vision.gaze.ctx_tokens_mode`` (string "pooled", only for pooled context
  tokens), tensor ``v.gaze.ctx_tok`` (f32, ggml ne [n_embd_text, n_ctx_tokens]; none when
  pooled or C = 0).
Those two keys are left out at their defaults (0 dense layers, learned context tokens): a
checkpoint that does not use them converts to the same bytes as before they existed.
``config_from_keys`` reads every key back (absent = default).
"""

from __future__ import annotations

from collections.abc import Mapping
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


def llm_keys(parts: GazeParts | None, n_layers: int | None = None) -> list[KeyValue]:
    """Selection defaults for the language-model GGUF (``{arch}`` left to fill). n_layers: the text
    model's layer count; n_dense_layers above it is written as it (every layer dense, as the spec
    reads it; llama.cpp refuses a larger value)."""
    if parts is None:
        return []
    g = parts.config
    if n_layers is not None and g.n_dense_layers > n_layers:
        g = g.replace(n_dense_layers=n_layers)
    keys = [
        KeyValue(gguf_names.LLM_TOP_K, "UINT32", int(g.top_k)),
        KeyValue(gguf_names.LLM_KEEP_RATIO, "FLOAT32", float(g.keep_ratio)),
        KeyValue(gguf_names.LLM_SCORE_MODE, "UINT32", gguf_names.SCORE_MODE_IDS[g.score_mode]),
    ]
    if g.n_dense_layers:
        keys.append(KeyValue(gguf_names.LLM_N_DENSE_LAYERS, "UINT32", int(g.n_dense_layers)))
    return keys


def mmproj_keys(parts: GazeParts | None) -> list[KeyValue]:
    if parts is None:
        return []
    g = parts.config
    keys = [
        KeyValue(gguf_names.MMPROJ_REGION_SIZE, "ARRAY", [int(g.region_h), int(g.region_w)], "UINT32"),
        KeyValue(gguf_names.MMPROJ_N_CONTEXT_TOKENS, "UINT32", int(g.n_context_tokens)),
    ]
    if g.pooled:
        keys.append(KeyValue(gguf_names.MMPROJ_CONTEXT_TOKENS_MODE, "STRING", "pooled"))
    return keys


def mmproj_tensors(parts: GazeParts | None) -> dict[str, np.ndarray]:
    """{name: array} for the mmproj (none when there are no learned context tokens: pooled, or
    C = 0, since GGUF has no empty tensors)."""
    if parts is None or parts.config.pooled or parts.config.n_context_tokens == 0:
        return {}
    return {gguf_names.TENSOR_CONTEXT_TOKENS: parts.context_tokens}


def config_from_keys(llm: Mapping[str, Any], mmproj: Mapping[str, Any]) -> GazeConfig | None:
    """The GazeConfig a GGUF pair's keys give (the inverse of ``llm_keys`` / ``mmproj_keys``).

    llm / mmproj: {key: value} as ``gguf.GGUFReader`` fields' ``contents()`` give them. None when
    the mmproj has no gaze keys (no regions: the pair runs dense). Keys a file lacks take the
    GazeConfig defaults, as the runtime reads them: a language model without gaze keys (a dense
    conversion) selects with top_k 0, keep_ratio 0.25, gqa_mean, no dense layers; an mmproj
    without ``ctx_tokens_mode`` has learned context tokens. Malformed values are a ConvertError.
    """
    if gguf_names.MMPROJ_N_CONTEXT_TOKENS not in mmproj:
        return None
    arch = llm.get("general.architecture", "")
    defaults = GazeConfig()

    def lm(template: str, default):
        value = llm.get(gguf_names.llm_key(template, arch))
        return default if value is None else value

    modes = {v: k for k, v in gguf_names.SCORE_MODE_IDS.items()}
    try:
        mode_id = int(lm(gguf_names.LLM_SCORE_MODE, gguf_names.SCORE_MODE_IDS[defaults.score_mode]))
        if mode_id not in modes:
            raise ValueError(f"unknown score mode id {mode_id} (known: {sorted(modes)})")
        region_h, region_w = (int(x) for x in mmproj[gguf_names.MMPROJ_REGION_SIZE])
        return GazeConfig(
            region_h=region_h,
            region_w=region_w,
            n_context_tokens=int(mmproj[gguf_names.MMPROJ_N_CONTEXT_TOKENS]),
            top_k=int(lm(gguf_names.LLM_TOP_K, defaults.top_k)),
            keep_ratio=float(lm(gguf_names.LLM_KEEP_RATIO, defaults.keep_ratio)),
            score_mode=modes[mode_id],
            n_dense_layers=int(lm(gguf_names.LLM_N_DENSE_LAYERS, defaults.n_dense_layers)),
            context_tokens=str(mmproj.get(gguf_names.MMPROJ_CONTEXT_TOKENS_MODE, defaults.context_tokens)),
        )
    except (KeyError, TypeError, ValueError) as err:  # a key missing, of the wrong kind or out of range
        raise ConvertError(f"invalid gaze keys: {err}") from err


def read_gguf_config(llm_path: str | Path, mmproj_path: str | Path) -> GazeConfig | None:
    """``config_from_keys`` of two GGUF files, read with the ``gguf`` library."""
    import gguf

    def fields(path) -> dict[str, Any]:
        return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}

    return config_from_keys(fields(llm_path), fields(mmproj_path))
