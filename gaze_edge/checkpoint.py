"""The gaze checkpoint: a transformers model folder plus gaze settings and context tokens.

Layout (docs/FORMAT.md):
- the model folder exactly as ``save_pretrained`` writes it (loads unchanged with transformers);
- ``config.json`` gains a top-level ``"gaze"`` object: ``GazeConfig.to_dict()`` (region_h,
  region_w, n_context_tokens, top_k, keep_ratio, score_mode, n_dense_layers, context_tokens;
  the last two default to 0 and "learned" when an older checkpoint lacks them);
- ``gaze.safetensors`` holds one f32 tensor ``context_tokens`` of shape
  ``(n_context_tokens, text hidden size)`` (0 rows when n_context_tokens is 0). A checkpoint
  with pooled context tokens (``"context_tokens": "pooled"``) has no gaze.safetensors.

API:
- ``save_gaze(folder, vlm)``: add the gaze parts of a ``GazeVLM`` to a folder that already holds
  its model (``vlm.model.save_pretrained(folder)``); ``write_gaze(folder, gaze_config,
  context_tokens)`` does the same from the parts.
- ``save_gaze_checkpoint(vlm, folder, processor=None)``: the model, the processor, the gaze parts.
- ``load_gaze(folder) -> (GazeConfig, context_tokens)``: read and check the gaze parts.
- ``load_gaze_vlm(folder, **from_pretrained_kwargs) -> GazeVLM``.
- ``dense_to_gaze(src, dst, gaze_config, ...)``: turn a dense checkpoint of a supported family
  into a gaze checkpoint (training-free gaze, or the start of gaze fine-tuning).
Every problem with a folder raises ``GazeCheckpointError`` (a ValueError) naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from gaze_edge.config import TRAINING_FREE, GazeConfig

CONFIG_FILE = "config.json"
CONFIG_KEY = "gaze"
WEIGHTS_FILE = "gaze.safetensors"
CONTEXT_TOKENS = "context_tokens"
FORMAT_VERSION = "1"  # safetensors metadata "gaze_format"


class GazeCheckpointError(ValueError):
    """A folder is not a valid gaze checkpoint (missing file, bad settings, wrong shape)."""


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise GazeCheckpointError(f"{path} not found: not a transformers model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GazeCheckpointError(f"{path} is not valid JSON: {err}") from err


def text_hidden_size(config: dict) -> int:
    """The language model's embedding width from a config.json dict (``text_config.hidden_size``,
    or ``hidden_size`` at the top for older single-level configs)."""
    size = config.get("text_config", {}).get("hidden_size", config.get("hidden_size"))
    if size is None:
        raise GazeCheckpointError("config.json gives no text hidden_size")
    return int(size)


def write_gaze(folder: str | Path, gaze_config: GazeConfig, context_tokens: torch.Tensor | None) -> None:
    """Add the gaze object to ``folder/config.json`` and write ``folder/gaze.safetensors``.

    context_tokens: ``(n_context_tokens, hidden)``, stored as f32. Pooled context tokens have no
    tensor (None or 0 rows): no gaze.safetensors is written and an old one is removed.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    config = _read_config(folder)
    if gaze_config.pooled:
        if context_tokens is not None and context_tokens.shape[0]:
            raise GazeCheckpointError(
                f"pooled context tokens take no learned tensor, got {list(context_tokens.shape)}"
            )
        (folder / WEIGHTS_FILE).unlink(missing_ok=True)
    else:
        want = (gaze_config.n_context_tokens, text_hidden_size(config))
        shape = None if context_tokens is None else list(context_tokens.shape)
        if shape != list(want):
            raise GazeCheckpointError(
                f"context_tokens have shape {shape}, the gaze settings and the text model "
                f"need [n_context_tokens={want[0]}, hidden_size={want[1]}]"
            )
        tensor = context_tokens.detach().to("cpu", torch.float32).contiguous()
        metadata = {"gaze_format": FORMAT_VERSION}
        save_file({CONTEXT_TOKENS: tensor}, str(folder / WEIGHTS_FILE), metadata=metadata)
    config[CONFIG_KEY] = gaze_config.to_dict()
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_gaze(folder: str | Path, vlm) -> None:
    """Write a GazeVLM's settings and context tokens into the folder holding its saved model."""
    write_gaze(folder, vlm.gaze_config, vlm.context_tokens)


def save_gaze_checkpoint(vlm, folder: str | Path, processor=None) -> Path:
    """Save a GazeVLM as a gaze checkpoint: model (and processor) via save_pretrained, then gaze."""
    folder = Path(folder)
    vlm.model.config.gaze = vlm.gaze_config.to_dict()  # keeps the in-memory config consistent
    vlm.model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    save_gaze(folder, vlm)
    return folder


def is_gaze_checkpoint(folder: str | Path) -> bool:
    """True when ``folder/config.json`` has a gaze object (the folder may still be invalid)."""
    path = Path(folder) / CONFIG_FILE
    return path.is_file() and CONFIG_KEY in json.loads(path.read_text())


def load_gaze(folder: str | Path) -> tuple[GazeConfig, torch.Tensor]:
    """The gaze settings and the ``(n_context_tokens, hidden)`` f32 context tokens of a folder
    (``(0, hidden)`` for pooled context tokens, which have no learned tensor)."""
    from safetensors import safe_open

    folder = Path(folder)
    config = _read_config(folder)
    if CONFIG_KEY not in config:
        raise GazeCheckpointError(f"{folder / CONFIG_FILE} has no '{CONFIG_KEY}' object: a dense checkpoint")
    try:
        gaze_config = GazeConfig.from_dict(config[CONFIG_KEY])
    except (TypeError, ValueError) as err:
        raise GazeCheckpointError(f"invalid gaze settings in {folder / CONFIG_FILE}: {err}") from err
    path = folder / WEIGHTS_FILE
    if gaze_config.pooled:
        if path.exists():
            raise GazeCheckpointError(
                f"{path} is present but the gaze settings pool the context tokens (no learned tensor): "
                "remove it, or set context_tokens to \"learned\""
            )
        return gaze_config, torch.zeros(0, text_hidden_size(config))
    if not path.is_file():
        raise GazeCheckpointError(f"{path} not found (it holds the context tokens the gaze settings need)")
    try:
        with safe_open(str(path), framework="pt") as f:
            if CONTEXT_TOKENS not in f.keys():
                raise GazeCheckpointError(f"{path} has no '{CONTEXT_TOKENS}' tensor")
            context_tokens = f.get_tensor(CONTEXT_TOKENS)
    except GazeCheckpointError:
        raise
    except Exception as err:
        raise GazeCheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    want = (gaze_config.n_context_tokens, text_hidden_size(config))
    if tuple(context_tokens.shape) != want:
        raise GazeCheckpointError(
            f"{path}: context_tokens have shape {list(context_tokens.shape)}, the gaze settings and the text "
            f"model need [n_context_tokens={want[0]}, hidden_size={want[1]}]"
        )
    return gaze_config, context_tokens.float()


def load_model(folder: str | Path, **from_pretrained_kwargs):
    """The transformers model of a (gaze or dense) checkpoint of a supported family."""
    from transformers import AutoModelForImageTextToText

    from gaze_edge.reference.families import family_of

    config = _read_config(Path(folder))
    family_of(config.get("model_type", "?"))  # a clear error for unsupported families
    from_pretrained_kwargs.setdefault("attn_implementation", "eager")
    return AutoModelForImageTextToText.from_pretrained(folder, **from_pretrained_kwargs)


def load_gaze_vlm(folder: str | Path, **from_pretrained_kwargs):
    """A GazeVLM from a gaze checkpoint (text attention "eager" unless asked otherwise)."""
    from gaze_edge.reference import GazeVLM

    gaze_config, context_tokens = load_gaze(folder)
    model = load_model(folder, **from_pretrained_kwargs).eval()
    dtype = model.get_input_embeddings().weight.dtype
    return GazeVLM(model, gaze_config, context_tokens.to(dtype))


def calibration_images(model, n_images: int = 4, seed: int = 0) -> dict:
    """Seeded N(0, 1) images in the processor's normalised pixel space, at the model's native size:
    the ``image_kwargs`` (pixel_values, and image_grid_thw for Qwen2-VL) GazeVLM takes."""
    from gaze_edge.reference.families import family_of

    generator = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    if family_of(model).name == "llava":
        size = vision.image_size
        return {"pixel_values": torch.randn(n_images, 3, size, size, generator=generator)}
    side = 8 * vision.spatial_merge_size  # an 8x8 grid of language-model tokens per image
    row = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {
        "pixel_values": torch.randn(n_images * side * side, row, generator=generator),
        "image_grid_thw": torch.tensor([[1, side, side]] * n_images),
    }


@torch.no_grad()
def mean_image_context_tokens(
    vlm, image_kwargs: dict, n_context_tokens: int, noise: float = 0.01, seed: int = 0
) -> torch.Tensor:
    """``(n_context_tokens, hidden)``: every row the mean projected image embedding (over all grid
    tokens of the given images) plus N(0, (noise * s)^2) with ``s`` the std of those embeddings,
    so that the rows differ (seeded)."""
    features = torch.cat(vlm.image_features(**image_kwargs).features).float()
    mean, std = features.mean(dim=0), float(features.std())
    generator = torch.Generator().manual_seed(seed)
    jitter = torch.randn(n_context_tokens, features.shape[-1], generator=generator) * (noise * std)
    return mean[None, :] + jitter


def dense_to_gaze(
    src: str | Path,
    dst: str | Path,
    gaze_config: GazeConfig = TRAINING_FREE,
    *,
    image_kwargs: dict | None = None,
    seed: int = 0,
) -> Path:
    """Make a gaze checkpoint from a dense checkpoint of a supported family (by default with the
    training-free settings, ``TRAINING_FREE``: what ``gaze-edge make-gaze`` writes without flags).

    Every file of ``src`` is copied unchanged (weights, tokenizer, processor) except config.json,
    which gains the gaze object; learned context tokens come from ``mean_image_context_tokens``
    over ``image_kwargs`` (the images GazeVLM takes; default: ``calibration_images(model)``, four
    seeded noise images at the native size). Pooled context tokens need no images and no tensor.
    """
    from gaze_edge.reference import GazeVLM
    from gaze_edge.reference.families import family_of

    src, dst = Path(src), Path(dst)
    if is_gaze_checkpoint(src):
        raise GazeCheckpointError(f"{src} is already a gaze checkpoint")
    if dst.exists() and any(dst.iterdir()):
        raise GazeCheckpointError(f"{dst} exists and is not empty")
    context_tokens = None
    if gaze_config.pooled:  # nothing to compute: the model is not loaded (a 7B one would need 28 GB)
        family_of(_read_config(src).get("model_type", "?"))
    else:
        model = load_model(src, dtype=torch.float32).eval()
        probe = GazeVLM(model, gaze_config.replace(n_context_tokens=0))
        images = image_kwargs if image_kwargs is not None else calibration_images(model, seed=seed)
        context_tokens = mean_image_context_tokens(probe, images, gaze_config.n_context_tokens, seed=seed)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    write_gaze(dst, gaze_config, context_tokens)
    return dst
