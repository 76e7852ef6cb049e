"""The LLaVA-1.5 vision projector (CLIP encoder + MLP projector) as an mmproj GGUF, written with
the ``gguf`` library.

Neither of llama.cpp's own routes fits a transformers 5 checkpoint (FACTS.md, "Conversion
routes"): ``convert_hf_to_gguf.py --mmproj`` rejects a CLIP tower, and the legacy scripts
re-initialise the tower at random under transformers 5, force f16 and ignore the processor's
mean/std. This module reads the weights as they are saved and writes what mtmd's
``PROJECTOR_TYPE_MLP`` graph (tools/mtmd/models/llava.cpp) loads: the tensor names of
tools/mtmd/clip-impl.h and the keys of clip.cpp's ``load_hparams``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from gaze_edge.convert.errors import ConvertError
from gaze_edge.convert.gaze import KeyValue

# Prefixes under which checkpoints store the CLIP tower and the projector (transformers 5 saves
# "vision_tower.*"; llava-hf checkpoints have "vision_tower.vision_model.*"; a model's live
# state_dict has "model.vision_tower.*").
VISION_PREFIXES = ("model.vision_tower.vision_model.", "model.vision_tower.",
                   "vision_tower.vision_model.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")

# HF name inside the tower -> GGUF name ({0} = layer index). fc1 is the up projection.
VISION_TENSORS: tuple[tuple[str, str], ...] = (
    (r"embeddings\.class_embedding", "v.class_embd"),
    (r"embeddings\.patch_embedding\.weight", "v.patch_embd.weight"),
    (r"embeddings\.position_embedding\.weight", "v.position_embd.weight"),
    (r"pre_layrnorm\.(weight|bias)", "v.pre_ln.{0}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "v.blk.{0}.attn_q.{1}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "v.blk.{0}.attn_k.{1}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "v.blk.{0}.attn_v.{1}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "v.blk.{0}.attn_out.{1}"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", "v.blk.{0}.ln1.{1}"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", "v.blk.{0}.ln2.{1}"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", "v.blk.{0}.ffn_up.{1}"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", "v.blk.{0}.ffn_down.{1}"),
    # LLaVA reads hidden states before post_layernorm, so mtmd must not apply it: left out.
    (r"post_layernorm\.(weight|bias)", ""),
    (r"embeddings\.position_ids", ""),
)
PROJECTOR_TENSORS: tuple[tuple[str, str], ...] = (
    (r"linear_1\.(weight|bias)", "mm.0.{0}"),
    (r"linear_2\.(weight|bias)", "mm.2.{0}"),
)
# Kept in f32 at every outtype (1-D tensors are always f32; llama.cpp keeps positions f32 too).
KEEP_F32 = ("v.position_embd.weight",)


def _strip(name: str, prefixes: Iterable[str]) -> str | None:
    return next((name[len(p):] for p in prefixes if name.startswith(p)), None)


def gguf_name(hf_name: str) -> str | None:
    """GGUF name of a checkpoint tensor; "" for a tower tensor mtmd does not use; None if not ours."""
    for prefixes, table in ((VISION_PREFIXES, VISION_TENSORS), (PROJECTOR_PREFIXES, PROJECTOR_TENSORS)):
        rest = _strip(hf_name, prefixes)
        if rest is None:
            continue
        for pattern, template in table:
            m = re.fullmatch(pattern, rest)
            if m:
                return template.format(*m.groups())
        raise ConvertError(f"unexpected vision tensor {hf_name!r} (not a CLIP/LLaVA projector tensor)")
    return None


def feature_layers(config: dict[str, Any]) -> list[int]:
    """vision_feature_layer as mtmd's non-negative indices into the hidden states
    ([embeddings, block 0 output, ...]): -1 is n_layer, -2 is n_layer - 1."""
    n_layer = config["vision_config"]["num_hidden_layers"]
    layers = config.get("vision_feature_layer", -2)
    layers = [layers] if isinstance(layers, int) else list(layers)
    out = [x if x >= 0 else n_layer + x + 1 for x in layers]
    if any(not 0 <= x <= n_layer for x in out) or out != sorted(out):
        raise ConvertError(f"vision_feature_layer {layers!r} is not supported (mtmd stacks layers in "
                           f"increasing order, each in [-{n_layer + 1}, {n_layer}])")
    return out


def keys(config: dict[str, Any], processor: dict[str, Any], outtype: str) -> list[KeyValue]:
    """The mmproj's keys (clip.cpp load_hparams); the block count stops at the deepest feature layer."""
    import gguf

    vision = config["vision_config"]
    text = config["text_config"]
    layers = feature_layers(config)
    for k in ("image_mean", "image_std"):
        if len(processor.get(k) or []) != 3:
            raise ConvertError(f"the image processor config has no 3-channel {k}")
    kv = [
        KeyValue("general.type", "STRING", "mmproj"),
        KeyValue("general.file_type", "UINT32", int({"f32": gguf.LlamaFileType.ALL_F32,
                                                     "f16": gguf.LlamaFileType.MOSTLY_F16}[outtype])),
        KeyValue("clip.has_vision_encoder", "BOOL", True),
        KeyValue("clip.projector_type", "STRING", "mlp"),
        KeyValue("clip.vision.image_size", "UINT32", int(vision["image_size"])),
        KeyValue("clip.vision.patch_size", "UINT32", int(vision["patch_size"])),
        KeyValue("clip.vision.embedding_length", "UINT32", int(vision["hidden_size"])),
        KeyValue("clip.vision.feed_forward_length", "UINT32", int(vision["intermediate_size"])),
        KeyValue("clip.vision.block_count", "UINT32", max(layers)),
        KeyValue("clip.vision.attention.head_count", "UINT32", int(vision["num_attention_heads"])),
        KeyValue("clip.vision.attention.layer_norm_epsilon", "FLOAT32", float(vision.get("layer_norm_eps", 1e-5))),
        KeyValue("clip.vision.projection_dim", "UINT32", int(text["hidden_size"])),
        KeyValue("clip.vision.feature_layer", "ARRAY", layers, "INT32"),
        KeyValue("clip.vision.image_mean", "ARRAY", [float(x) for x in processor["image_mean"]], "FLOAT32"),
        KeyValue("clip.vision.image_std", "ARRAY", [float(x) for x in processor["image_std"]], "FLOAT32"),
    ]
    if vision.get("hidden_act", "quick_gelu") == "gelu":  # absent: mtmd's CLIP default, quick_gelu
        kv.append(KeyValue("clip.use_gelu", "BOOL", True))
    return kv


def _stored_dtype(name: str, array: np.ndarray, outtype: str) -> np.dtype:
    if outtype == "f16" and array.ndim >= 2 and name not in KEEP_F32:
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def tensors(config: dict[str, Any], shards: dict[Path, list[str]], outtype: str
            ) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(GGUF name, loader) for every tensor mtmd needs, layers past the deepest feature layer left out."""
    n_blocks = max(feature_layers(config))
    found: list[tuple[str, Path, str]] = []
    for path, names in shards.items():
        for hf in names:
            name = gguf_name(hf)
            if not name:
                continue
            m = re.match(r"v\.blk\.(\d+)\.", name)
            if m and int(m.group(1)) >= n_blocks:
                continue
            found.append((name, path, hf))
    required = ["v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "mm.0.weight", "mm.0.bias",
                "mm.2.weight", "mm.2.bias"] + [f"v.blk.{i}.attn_q.weight" for i in range(n_blocks)]
    have = {n for n, _, _ in found}
    missing = [n for n in required if n not in have]
    if missing:
        raise ConvertError(f"the checkpoint lacks vision tensors for: {', '.join(missing)}")

    def loader(path: Path, hf: str, name: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                array = f.get_tensor(hf).float().numpy()
            return np.ascontiguousarray(array.astype(_stored_dtype(name, array, outtype)))
        return load

    return [(name, loader(path, hf, name)) for name, path, hf in sorted(found)]


def check(config: dict[str, Any], processor: dict[str, Any], shards: dict[Path, list[str]]) -> None:
    """Everything write() would reject, found before any work (no weights are read)."""
    keys(config, processor, "f32")
    tensors(config, shards, "f32")


def write(path: Path, config: dict[str, Any], processor: dict[str, Any], shards: dict[Path, list[str]],
          outtype: str, name: str, extra_keys: list[KeyValue], extra_tensors: dict[str, np.ndarray],
          progress: bool = True) -> None:
    """Write the mmproj GGUF to ``path`` (outtype f32 or f16)."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch="clip")
    writer.add_name(name)
    writer.add_description("image encoder for LLaVA (CLIP + MLP projector), written by gaze-edge")
    for kv in keys(config, processor, outtype) + list(extra_keys):
        sub = gguf.GGUFValueType[kv.sub_type] if kv.sub_type else None
        writer.add_key_value(kv.key, kv.value, gguf.GGUFValueType[kv.vtype], sub_type=sub)
    for tname, load in tensors(config, shards, outtype):
        writer.add_tensor(tname, load())
    for tname, array in extra_tensors.items():
        writer.add_tensor(tname, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
