"""The checkpoint distillation starts from, and the gaze checkpoint it writes.

SRC is a transformers folder (or Hub repo id) of a family the reference supports (LLaVA-1.5
style, Qwen2-VL, Qwen2.5-VL):
- dense: the teacher is the model as it is; the student is the same model with context tokens
  after every image grid, initialised as ``gaze-edge make-gaze`` does
  (``gaze_edge.checkpoint.mean_image_context_tokens`` over ``calibration_images``, seed 0), so
  the divergence "before" is that of the training-free checkpoint make-gaze writes;
- gaze: the teacher is the checkpoint decoding densely (with its own context tokens); the student
  starts from those context tokens and decodes at the new budget (retargeting).

The output folder is SRC's files (weights unchanged unless a LoRA adapter was merged into them)
with config.json's gaze object and gaze.safetensors replaced: what ``gaze-edge convert`` takes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from gaze_edge.config import TRAINING_FREE, GazeConfig
from gaze_edge.errors import GazeEdgeError

DEFAULT_REGION = (TRAINING_FREE.region_h, TRAINING_FREE.region_w)
# one learned context token: four after the grid threw a dense-trained GazeScenes model off (its
# dense decode fell from 92% to 46% once distilled; docs/TRAINING.md "Gaze for dense checkpoints")
DEFAULT_CONTEXT_TOKENS = 1
REPORT_FILE = "gaze_edge_distill.json"
# SRC files the output does not copy: weights (re-saved when an adapter is merged), the gaze
# tensor (written anew), and a distilled SRC's own report.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


@dataclass
class Source:
    """folder: SRC on disk; model: the transformers model (float32); teacher_config and
    teacher_context: how the teacher decodes (dense: no context tokens); gaze: whether SRC is a
    gaze checkpoint; dtype: the weights' dtype on disk (a merged adapter is saved in it)."""

    folder: Path
    model: torch.nn.Module
    teacher_config: GazeConfig
    teacher_context: torch.Tensor
    gaze: bool
    dtype: torch.dtype


@contextlib.contextmanager
def _quiet_loading():
    """transformers' "Loading weights" bars off while a model loads (distill draws its own)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def resolve(src: str | os.PathLike) -> Path:
    """SRC's folder (a Hub repo id is downloaded as ``gaze-edge convert`` does), checked to be a
    checkpoint of a supported family."""
    from gaze_edge.convert.source import resolve_source
    from gaze_edge.reference.families import FAMILIES

    folder = resolve_source(src)
    path = folder / "config.json"
    if not path.is_file():
        raise GazeEdgeError(f"{folder} has no config.json: not a transformers model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise GazeEdgeError(f"cannot read {path}: {err}") from None
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise GazeEdgeError(f"{folder}: model_type {model_type!r} is not supported by distill; supported: "
                            f"{', '.join(sorted(FAMILIES))}")
    if model_type == "llava" and config.get("vision_feature_select_strategy", "default") != "default":
        raise GazeEdgeError(f"{folder}: gaze needs image tokens that form a grid; "
                            f"vision_feature_select_strategy={config['vision_feature_select_strategy']!r} keeps CLS")
    return folder


def load(src: str | os.PathLike, device: torch.device) -> Source:
    """SRC's model in float32 on ``device`` (eval mode, every weight frozen) and its teacher."""
    from gaze_edge.checkpoint import is_gaze_checkpoint, load_gaze, load_model

    folder = resolve(src)
    gaze = is_gaze_checkpoint(folder)
    with _quiet_loading():
        model = load_model(folder, dtype=torch.float32).eval().to(device)
    model.requires_grad_(False)
    if gaze:
        teacher_config, context = load_gaze(folder)
    else:
        teacher_config = GazeConfig(*DEFAULT_REGION, n_context_tokens=0)
        context = torch.zeros(0, model.config.text_config.hidden_size)
    return Source(folder, model, teacher_config, context.to(device), gaze, saved_dtype(folder))


def saved_dtype(folder: Path) -> torch.dtype:
    """The weights' dtype as config.json records it (``dtype``, or the older ``torch_dtype``;
    float32 when it says nothing)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def student_config(source: Source, keep_ratio: float, region: tuple[int, int] | None,
                   context_tokens: int | None, score_mode: str | None = None,
                   n_dense_layers: int | None = None) -> GazeConfig:
    """The gaze settings the output checkpoint will have, at ``keep_ratio`` (top_k 0).

    A gaze SRC keeps its region size and context tokens; a dense SRC gets ``region`` and
    ``context_tokens`` learned tokens (defaults 2x2 and 1). ``score_mode`` and ``n_dense_layers``
    override SRC's (gaze) or the training-free defaults (dense: ``TRAINING_FREE``) when given.
    """
    overrides = {k: v for k, v in (("score_mode", score_mode), ("n_dense_layers", n_dense_layers))
                 if v is not None}
    try:
        if source.gaze:
            if source.teacher_config.pooled:
                raise GazeEdgeError(f"{source.folder} pools its context tokens from each image (no learned tensor "
                                    "to train); distil from the dense checkpoint instead")
            if region is not None or context_tokens is not None:
                raise GazeEdgeError(f"{source.folder} is a gaze checkpoint: it keeps its own region size and context "
                                    "tokens (--region and --n-context-tokens are for a dense SRC)")
            return source.teacher_config.replace(keep_ratio=keep_ratio, top_k=0, **overrides)
        rh, rw = region or DEFAULT_REGION
        n = DEFAULT_CONTEXT_TOKENS if context_tokens is None else context_tokens
        return TRAINING_FREE.replace(region_h=rh, region_w=rw, n_context_tokens=n, top_k=0, keep_ratio=keep_ratio,
                                     context_tokens="learned", **overrides)
    except ValueError as err:  # GazeConfig's own checks (an unknown score mode, ...)
        raise GazeEdgeError(f"invalid gaze settings: {err}") from None


def initial_context_tokens(source: Source, config: GazeConfig) -> torch.Tensor:
    """The student's starting context tokens: SRC's (gaze) or make-gaze's (dense)."""
    if source.gaze:
        return source.teacher_context.clone()
    from gaze_edge.checkpoint import calibration_images, mean_image_context_tokens
    from gaze_edge.reference import GazeVLM

    device = next(source.model.parameters()).device
    probe = GazeVLM(source.model, config.replace(n_context_tokens=0))
    images = {k: v.to(device) for k, v in calibration_images(source.model, seed=0).items()}
    return mean_image_context_tokens(probe, images, config.n_context_tokens, seed=0).to(device)


def _weight_file(path: Path) -> bool:
    return any(path.match(p) for p in WEIGHT_PATTERNS)


def write_output(stage: Path, source: Source, config: GazeConfig, context_tokens: torch.Tensor,
                 merged: bool, report: dict) -> None:
    """Write the complete output checkpoint into the empty folder ``stage``.

    merged: the model's weights changed (a LoRA adapter merged into them): save them in SRC's
    dtype with save_pretrained; otherwise SRC's weight files are copied as they are.
    """
    from gaze_edge.checkpoint import write_gaze
    from gaze_edge.reference import uninstall_gaze_attention

    for path in sorted(source.folder.iterdir()):
        if path.name.startswith(".") or path.name == REPORT_FILE:
            continue
        if merged and (_weight_file(path) or path.name == "config.json"):
            continue
        if path.name == "gaze.safetensors":
            continue
        if path.is_dir():
            shutil.copytree(path, stage / path.name)
        else:
            shutil.copy2(path, stage / path.name)
    if merged:
        model = source.model
        uninstall_gaze_attention(model)  # the saved config names the model's own attention
        try:
            with _quiet_loading():
                model.to(source.dtype).save_pretrained(stage)
        finally:
            model.float()
    write_gaze(stage, config, context_tokens)
    (stage / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def publish(stage: Path, out: Path) -> None:
    """Move the finished checkpoint from ``stage`` into ``out``: out's previous checkpoint files
    go first (config.json before the rest), the new ones come in with config.json last, each by a
    rename, so ``out`` holds a config.json only once every other file is in place."""
    old = [p for p in out.iterdir() if not p.name.startswith(".")]
    for path in sorted(old, key=lambda p: p.name != "config.json"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in sorted(stage.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(path, out / path.name)
    stage.rmdir()
