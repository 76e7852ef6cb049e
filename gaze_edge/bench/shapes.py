"""Random-weight VLMs with the shape of real ones, made here and converted with our converter.

Speed depends on shapes, not on trained weights, and nothing can be downloaded: ``ensure(name)``
builds a LLaVA-style checkpoint with transformers (the default model's tokenizer, chat template
and processor; a small random CLIP tower whose grid gives 1024 visual tokens per image; the text
model of the named shape, random), adds gaze settings and random context tokens, and converts it
with ``gaze_edge.convert`` exactly as a user's checkpoint would be. The GGUF pair is cached under
``~/.cache/gaze-edge/bench/<name>-<outtype>-<key>`` (key: this recipe and the converter version).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# text shapes: only what differs from the default model's LLaVA config
SHAPES: dict[str, dict] = {
    "qwen2-0.5b": {
        "text_config": {
            "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "intermediate_size": 4864, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "tie_word_embeddings": True,
        },
        "image_size": 448,  # 32 x 32 = 1024 visual tokens per image with patch 14
    },
}
RECIPE_VERSION = 1
GAZE = {"region_h": 2, "region_w": 2, "n_context_tokens": 4, "keep_ratio": 0.25, "top_k": 0, "score_mode": "gqa_mean"}
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
          "projection_dim": 64}


def cache_root() -> Path:
    return Path(os.environ.get("GAZE_EDGE_CACHE", Path.home() / ".cache" / "gaze-edge")) / "bench"


def _key(name: str, outtype: str) -> str:
    from importlib.metadata import version

    blob = json.dumps([RECIPE_VERSION, SHAPES[name], GAZE, VISION, outtype, version("gaze-edge")], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure(name: str, outtype: str = "f16", progress: bool = True) -> Path:
    """The folder of the converted GGUF pair for shape ``name``, built on first use."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(sorted(SHAPES))}")
    out = cache_root() / f"{name}-{outtype}-{_key(name, outtype)}"
    if out.is_dir() and len(list(out.glob("*.gguf"))) == 2:
        return out
    from gaze_edge.convert import convert

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        hf = Path(tmp) / "hf"
        write_checkpoint(name, hf)
        staged = Path(tmp) / "gguf"
        convert(hf, staged, outtype=outtype, name=name, progress=progress)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)  # same file system: the finished pair appears at once
    return out


def write_checkpoint(name: str, folder: Path, seed: int = 0) -> None:
    """A random LLaVA checkpoint (with gaze) of shape ``name`` in ``folder``."""
    import torch
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    from gaze_edge.checkpoint import write_gaze
    from gaze_edge.config import GazeConfig
    from gaze_edge.default_model import default_checkpoint_dir

    shape = SHAPES[name]
    default_hf = default_checkpoint_dir()
    base = json.loads((default_hf / "config.json").read_text())
    base.pop("gaze", None)
    text = {k: v for k, v in base["text_config"].items() if k not in ("head_dim", "mlp_bias", "pretraining_tp")}
    text.update(shape["text_config"])
    size = shape["image_size"]
    vision = {**base["vision_config"], **VISION, "image_size": size}
    patch = vision["patch_size"]
    config = LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=base["image_token_index"],
        image_seq_length=(size // patch) ** 2, projector_hidden_act=base["projector_hidden_act"],
        vision_feature_layer=base["vision_feature_layer"],
        vision_feature_select_strategy=base["vision_feature_select_strategy"],
        tie_word_embeddings=shape["text_config"].get("tie_word_embeddings", False),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(folder)
    processor = AutoProcessor.from_pretrained(default_hf)
    processor.image_processor.size = {"shortest_edge": size}
    processor.image_processor.crop_size = {"height": size, "width": size}
    processor.save_pretrained(folder)
    gaze = GazeConfig(**GAZE)
    tokens = torch.randn(gaze.n_context_tokens, text["hidden_size"], generator=torch.Generator().manual_seed(seed))
    write_gaze(folder, gaze, tokens * 0.02)
