"""The supported VLM families: how each turns images into grids of language-model tokens.

A family is a small table entry: its RoPE kind and one function that runs the model's own vision
tower and projector (``get_image_features``) and returns each image's features with its grid.
Adding a family touches only this file.

- ``llava`` (``LlavaForConditionalGeneration``: CLIP-style tower, MLP projector, Llama or Qwen2
  text): 1-D RoPE; an image is a square ``side x side`` grid of patch features (the "default"
  feature strategy, which drops CLS).
- ``qwen2_vl`` / ``qwen2_5_vl`` (``Qwen2VLForConditionalGeneration``,
  ``Qwen2_5_VLForConditionalGeneration``): M-RoPE; an image with ``image_grid_thw = (1, h, w)``
  patches is an ``h/m x w/m`` grid after the ``m x m`` spatial merge (m = 2). Videos are not
  supported by this reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageFeatures:
    """Images as the language model sees them: per image ``(grid_h * grid_w, E)`` raster order."""

    features: list[torch.Tensor]
    grids: list[tuple[int, int]]


def _llava_images(model, pixel_values: torch.Tensor, **_: object) -> ImageFeatures:
    if model.config.vision_feature_select_strategy != "default":
        raise ValueError(
            "gaze needs image tokens that form a grid; vision_feature_select_strategy="
            f"{model.config.vision_feature_select_strategy!r} keeps CLS"
        )
    output = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    features = list(output.pooler_output)
    grids = []
    for f in features:
        side = math.isqrt(f.shape[0])
        if side * side != f.shape[0]:
            raise ValueError(f"a LLaVA image gave {f.shape[0]} tokens, not a square grid")
        grids.append((side, side))
    return ImageFeatures(features, grids)


def _qwen2_vl_images(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor = None, **_) -> ImageFeatures:
    if image_grid_thw is None:
        raise ValueError("Qwen2-VL images need image_grid_thw")
    merge = model.config.vision_config.spatial_merge_size
    output = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    grids = []
    for t, h, w in image_grid_thw.tolist():
        if t != 1:
            raise ValueError(f"an image with {t} temporal patches (videos are not supported)")
        grids.append((h // merge, w // merge))
    return ImageFeatures(list(output.pooler_output), grids)


@dataclass(frozen=True)
class Family:
    """name: the config's model_type; rope: "1d" or "mrope"; encode_images(model, pixel_values,
    image_grid_thw=None) -> ImageFeatures."""

    name: str
    rope: str
    encode_images: Callable[..., ImageFeatures]


FAMILIES = {
    "llava": Family("llava", "1d", _llava_images),
    "qwen2_vl": Family("qwen2_vl", "mrope", _qwen2_vl_images),
    "qwen2_5_vl": Family("qwen2_5_vl", "mrope", _qwen2_vl_images),
}


def family_of(model_or_type) -> Family:
    """The family of a model (or of a config ``model_type`` string)."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}") from None
