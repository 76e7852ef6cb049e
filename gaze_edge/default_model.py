"""The embedded default model: a tiny gaze-trained VLM that ships inside the package.

It knows GazeScenes (coloured shapes on a 3x3 grid) and nothing else; docs/TRAINING.md says how
it was trained and how well it does. ``GazeModel.load()`` with no argument loads it.
"""

from __future__ import annotations

from pathlib import Path

from gaze_edge.errors import GazeEdgeError

DEFAULT_DIR = Path(__file__).resolve().parent / "models" / "default"


def default_model_dir() -> Path:
    """The folder holding the default GGUF pair, or a clear error when it is not there."""
    return _embedded(DEFAULT_DIR, "default model")


def _embedded(folder: Path, what: str) -> Path:
    if not any(folder.glob("*.gguf")):
        raise GazeEdgeError(
            f"the embedded {what} is not there ({folder} has no GGUF files); "
            "pass --model DIR with a model converted by `gaze-edge convert`"
        )
    return folder


# the PyTorch checkpoint the default GGUF pair was converted from: in a source checkout only
DEFAULT_HF_DIR = DEFAULT_DIR.parent / "default-hf"


def default_checkpoint_dir() -> Path:
    """The default model's transformers checkpoint (for the reference), or a clear error."""
    if not (DEFAULT_HF_DIR / "config.json").is_file():
        raise GazeEdgeError(
            f"the default model's PyTorch checkpoint is not there ({DEFAULT_HF_DIR}): it is kept in the "
            "source repository, not in the wheel"
        )
    return DEFAULT_HF_DIR


# the embedded video model: the default model fine-tuned on GazeScenes clips as well (docs/TRAINING.md,
# "Video"); `gaze-edge chat --video` runs it when no model is given
VIDEO_DIR = DEFAULT_DIR.parent / "video"
VIDEO_HF_DIR = DEFAULT_DIR.parent / "video-hf"


def video_model_dir() -> Path:
    """The folder holding the embedded video model's GGUF pair, or a clear error."""
    return _embedded(VIDEO_DIR, "video model")
