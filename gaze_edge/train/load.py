"""Loading what training produced: a run folder (state.pt) or a saved model folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gaze_edge.train.config import TrainConfig


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(net, tokenizer, config) from a training run folder's train_config.json and state.pt.

    net is the LLaVA (dense runs) or the GazeVLM around it (gaze runs), in eval mode.
    """
    from gaze_edge.train.forward import trainee
    from gaze_edge.train.loop import CONFIG_FILE, STATE_FILE
    from gaze_edge.train.model import build_model
    from gaze_edge.train.tokenizer import train_tokenizer

    run_dir = Path(run_dir)
    config = TrainConfig.from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))
    tokenizer = train_tokenizer(config.model.vocab_size, config.tokenizer_scenes)
    net = trainee(build_model(config.model, tokenizer, seed=config.seed), config)
    state = torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=True)
    net.load_state_dict(state["net"])
    return net.to(device).eval(), tokenizer, config


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu"):
    """(net, tokenizer) from a saved model folder: a GazeVLM for a gaze checkpoint, else the LLaVA."""
    from transformers import AutoTokenizer

    from gaze_edge.checkpoint import is_gaze_checkpoint, load_gaze_vlm, load_model

    folder = Path(folder)
    net = load_gaze_vlm(folder, dtype=torch.float32) if is_gaze_checkpoint(folder) else load_model(folder)
    return net.to(device).eval(), AutoTokenizer.from_pretrained(folder)


def load_trained(path: str | Path, device: str | torch.device = "cpu"):
    """(net, tokenizer) from a run folder (holding state.pt) or a model folder (holding config.json)."""
    from gaze_edge.train.loop import STATE_FILE

    path = Path(path)
    if (path / STATE_FILE).is_file():
        net, tokenizer, _ = load_run(path, device)
        return net, tokenizer
    if (path / "config.json").is_file():
        return load_model_folder(path, device)
    raise FileNotFoundError(f"{path} holds neither a training run (state.pt) nor a model (config.json)")
