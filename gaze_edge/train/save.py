"""Saving a trained model: a transformers folder (model, tokenizer, processor) plus gaze files."""

from __future__ import annotations

import json
from pathlib import Path

from gaze_edge.train.config import TrainConfig
from gaze_edge.train.model import build_processor

TRAINING_FILE = "gaze_edge_training.json"


def init_record(folder: str | Path) -> dict:
    """What a fine-tuning run started from: the folder, its weight files' sha256 and its own
    training record (so the whole recipe stays on file after the folder is overwritten)."""
    import hashlib

    folder = Path(folder)
    digests = {}
    for name in ("model.safetensors", "gaze.safetensors"):
        if (folder / name).is_file():
            digests[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    training = folder / TRAINING_FILE
    return {"folder": str(folder), "sha256": digests,
            "training": json.loads(training.read_text()) if training.is_file() else None}  # fmt: skip


def save_trained(
    folder: Path, net, tokenizer, config: TrainConfig, elapsed_s: float, trained_on: list[str],
    init: dict | None = None,
) -> None:
    """Write the model so that AutoModelForImageTextToText / AutoProcessor load it, and (for a
    gaze-trained net) the gaze settings and context tokens in the reference's checkpoint format.
    init: for a fine-tuning run, ``init_record`` of its starting folder, taken when it started."""
    from gaze_edge.reference import GazeVLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = net.model if isinstance(net, GazeVLM) else net
    model.save_pretrained(folder)
    build_processor(config.model, tokenizer).save_pretrained(folder)
    if isinstance(net, GazeVLM):
        from gaze_edge.checkpoint import save_gaze

        save_gaze(folder, net)
    record = {
        "train_config": config.to_dict(),
        "train_seconds": round(elapsed_s, 1),  # optimiser steps only (evaluations excluded)
        "trained_on": trained_on,
    }
    if init is not None:  # init_record() of the folder the run started from
        record["init"] = init
    (folder / TRAINING_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
