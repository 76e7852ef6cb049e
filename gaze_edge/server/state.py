"""What every route shares: the model, its name, the answer queue, the limits; and how the model is described.

Any model name a client sends is accepted (as llama-server does): the server has one model, and
desktop apps often send a name of their own choosing. Responses carry the name the client sent
(so its own bookkeeping matches), or the served name when it sent none.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from gaze_edge.server.answers import AnswerQueue
from gaze_edge.server.image_sources import UrlPolicy

# llama.cpp's general.file_type values of the outtypes gaze-edge convert writes
_FILE_TYPES = {0: "F32", 1: "F16", 7: "Q8_0", 15: "Q4_K_M"}


def default_model_name(model) -> str:
    """The name the server gives its model when no alias is set: the GGUF file's name without .gguf."""
    return model.files.model.stem


@dataclass
class ServerState:
    model: object  # a GazeModel
    model_name: str
    api_key: str | None
    max_body_bytes: int
    url_policy: UrlPolicy
    answers: AnswerQueue
    started: float = field(default_factory=time.time)

    def name_for(self, asked: str | None) -> str:
        return asked if asked else self.model_name

    @property
    def default_max_tokens(self) -> int:
        """max_tokens when a request gives none: until the context is full (llama-server's -1)."""
        return self.model.default_n_ctx()

    # --- how the model is described ------------------------------------------------------------

    @property
    def input_modalities(self) -> list[str]:
        return ["text", "image"] if self.model.has_vision else ["text"]

    @property
    def capabilities(self) -> list[str]:
        """Ollama's words: "completion", and "vision" when it takes images."""
        return ["completion", "vision"] if self.model.has_vision else ["completion"]

    def modified(self) -> float:
        try:
            return self.model.files.model.stat().st_mtime
        except OSError:
            return self.started

    def digest(self) -> str:
        """A stable id of the model file (its path, size and time), in Ollama's sha256 form; not its contents'
        hash, which would mean reading gigabytes at start."""
        path = self.model.files.model
        try:
            stat = path.stat()
            key = f"{path.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}"
        except OSError:
            key = str(path)
        return hashlib.sha256(key.encode()).hexdigest()

    def details(self) -> dict:
        """Ollama's "details" of a model."""
        model = self.model
        arch = model.arch
        file_type = model.meta("general.file_type")
        return {
            "parent_model": "",
            "format": "gguf",
            "family": arch,
            "families": [arch, "clip"] if model.has_vision else [arch],
            "parameter_size": model.meta("general.size_label") or _parameter_size(model),
            "quantization_level": _FILE_TYPES.get(int(file_type), f"type {file_type}") if file_type else "unknown",
        }

    def facts(self) -> dict:
        """What a client may want to know: context, vision, the gaze defaults."""
        model = self.model
        gaze = model.gaze_defaults()
        return {
            "n_ctx": model.default_n_ctx(),
            "n_ctx_train": model.n_ctx_train,
            "size": model.size_bytes(),
            "vision": model.has_vision,
            "gaze": None if gaze.region_h is None else {
                "region": [gaze.region_h, gaze.region_w], "context_tokens": gaze.n_context_tokens,
                "keep_regions": gaze.keep_regions, "keep_ratio": gaze.keep_ratio, "score_mode": gaze.score_mode,
            },
        }


def _parameter_size(model) -> str:
    """The parameter count in Ollama's style ("8.0B", "0.9M")."""
    from llama_cpp import llama_cpp

    n = int(llama_cpp.llama_model_n_params(model._model))
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
