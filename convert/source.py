"""Where a checkpoint comes from (a local folder or a Hub repo id) and whether it is complete.

Everything here runs before any output is written, so a bad input fails in a second with one
line naming the problem.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from gaze_edge.convert.errors import ConvertError

# Files a Hub download needs (weights, configs, tokenizer, chat template); nothing else.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def looks_like_repo_id(src: str) -> bool:
    return bool(_REPO_ID.match(src)) and not src.startswith((".", "~"))


def _hub_download(repo_id: str) -> str:
    """snapshot_download, kept as its own function so tests can replace it (no network in tests)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)


def _offline_cause(err: BaseException) -> str | None:
    """Why a download failed for want of network, or None when the failure is something else."""
    from huggingface_hub import constants, errors

    if isinstance(err, errors.OfflineModeIsEnabled) or constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    if isinstance(err, errors.LocalEntryNotFoundError):
        return "no network connection and no copy in the local Hugging Face cache"
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"ConnectionError", "ConnectError", "ConnectTimeout", "TimeoutException", "gaierror"}:
        return f"no network connection ({type(err).__name__})"
    return None


def resolve_source(src: str | os.PathLike) -> Path:
    """The local folder holding the checkpoint: src itself, or a Hub snapshot of repo id src."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConvertError(f"{src} is a file; SRC must be a model folder or a Hugging Face repo id")
    text = str(src)
    if not looks_like_repo_id(text):
        raise ConvertError(f"model folder not found: {src}")
    try:
        return Path(_hub_download(text))
    except Exception as err:  # the hub raises many types; name the cause in one line
        cause = _offline_cause(err)
        if cause is not None:
            raise ConvertError(
                f"cannot download {text!r} from the Hugging Face Hub: {cause}; "
                f"pass a local folder instead (e.g. `hf download {text} --local-dir DIR` where "
                "there is network, then convert DIR)") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConvertError(f"{src} is not a local folder and the Hub download failed: {first}") from err


def read_config(folder: Path) -> dict[str, Any]:
    """config.json with transformers' defaults filled in (old checkpoints omit keys such as a
    Llama text model's hidden_size); the raw file when transformers cannot parse it, so that an
    unknown architecture still gets the converter's own message."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConvertError(f"missing config.json in {folder}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConvertError(f"cannot read {path}: {err}") from err
    try:
        from transformers import AutoConfig

        full = AutoConfig.from_pretrained(folder, trust_remote_code=False).to_dict()
    except Exception:  # unknown model_type, remote code, ...: family_for() explains
        return raw
    return {**full, "architectures": raw.get("architectures") or full.get("architectures")}


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's model*.safetensors shards (from the index when there is one)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise ConvertError(f"cannot read {index}: {err}") from err
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConvertError(f"missing weight files listed in {index.name}: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ConvertError(f"missing weights: no model*.safetensors in {folder}")
    return files


def tensor_names(path: Path) -> list[str]:
    """Names in one safetensors file; a file whose header or size is wrong is reported as corrupt."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except Exception as err:  # SafetensorError, OSError, ...
        raise ConvertError(f"corrupt safetensors file {path}: {err}") from err


def check_complete(folder: Path) -> dict[str, list[str]]:
    """Check the files a conversion reads; returns {shard file name: its tensor names}."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConvertError(f"missing tokenizer in {folder}: expected {' or '.join(TOKENIZER_FILES)}")
    if not any((folder / f).is_file() for f in PROCESSOR_FILES):
        raise ConvertError(
            f"missing image processor config in {folder}: expected {' or '.join(PROCESSOR_FILES)}")
    return {f.name: tensor_names(f) for f in weight_files(folder)}


def image_processor_config(folder: Path) -> dict[str, Any]:
    """The image processor settings (transformers 5 nests them in processor_config.json)."""
    merged: dict[str, Any] = {}
    for name in PROCESSOR_FILES[::-1]:  # processor_config.json wins, as in llama.cpp's converter
        path = folder / name
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ConvertError(f"cannot read {path}: {err}") from err
            merged.update(cfg.get("image_processor", cfg))
    return merged
