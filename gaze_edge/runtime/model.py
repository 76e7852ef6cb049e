"""``GazeModel``: a converted model (language-model GGUF + mmproj GGUF) in the patched llama.cpp.

    model = GazeModel.load("out/")                # a folder from `gaze-edge convert`, or the two files
    with model.session(top_k=8) as s:             # one sequence in its own llama.cpp context
        s.add_image("scene.png"); s.add_text("Describe the image.")
        tok = int(s.logits().argmax())            # the dense prompt chooses the first token
        logits = s.append(tok)                    # a generated token: gaze applies
        s.trace()                                 # the regions that step selected, per layer

Everything goes through llama-cpp-python's own low-level API (``llama_cpp.llama_cpp``,
``llama_cpp.mtmd_cpp``) plus the gaze bindings; nothing of llama.cpp is re-implemented here.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from gaze_edge import gguf_names
from gaze_edge.runtime import bindings

llama_cpp = bindings._llama_cpp
mtmd_cpp = bindings._mtmd_cpp

# GGUF file names as `gaze-edge convert` writes them: <name>-<outtype>.gguf, mmproj-<name>-<outtype>.gguf
_MMPROJ_PREFIX = "mmproj-"

class ModelFilesError(ValueError):
    """The given path does not name one language-model GGUF and its mmproj."""


@dataclass(frozen=True)
class ModelFiles:
    """The language-model GGUF and its vision projector (None: a text-only model)."""

    model: Path
    mmproj: Path | None


def find_model_files(path: str | os.PathLike, mmproj: str | os.PathLike | None = None) -> ModelFiles:
    """The two GGUF files of a model.

    path: a folder holding one ``<name>-<outtype>.gguf`` and its ``mmproj-<name>-<outtype>.gguf``
      (what ``gaze-edge convert`` writes), or the language-model GGUF itself.
    mmproj: the projector GGUF, when ``path`` is a file (optional: text only without it).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if mmproj is not None:
            raise ModelFilesError("give mmproj only with a language-model file, not with a folder")
        ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
        projectors = [p for p in ggufs if p.name.startswith(_MMPROJ_PREFIX)]
        models = [p for p in ggufs if not p.name.startswith(_MMPROJ_PREFIX)]
        if len(models) != 1:
            found = ", ".join(p.name for p in models) or "none"
            raise ModelFilesError(f"{path} must hold exactly one language-model .gguf (found: {found})")
        want = path / f"{_MMPROJ_PREFIX}{models[0].name}"
        if want.is_file():
            return ModelFiles(models[0], want)
        if len(projectors) == 1:
            return ModelFiles(models[0], projectors[0])
        found = ", ".join(p.name for p in projectors) or "none"
        raise ModelFilesError(f"{path} has no {want.name} (projectors found: {found})")
    if not path.is_file():
        raise ModelFilesError(f"no such model file or folder: {path}")
    if mmproj is not None and not Path(mmproj).expanduser().is_file():
        raise ModelFilesError(f"no such mmproj file: {mmproj}")
    return ModelFiles(path, Path(mmproj).expanduser() if mmproj is not None else None)


def _set_verbose(verbose: bool) -> None:
    """llama.cpp and mtmd log through llama-cpp-python's logger: errors only unless verbose."""
    from llama_cpp import _logger

    _logger.set_verbose(verbose)
    mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class GazeDefaults:
    """The gaze settings stored with the model (GGUF keys); None where the model has none."""

    region_h: int | None
    region_w: int | None
    n_context_tokens: int
    top_k: int
    keep_ratio: float
    score_mode: str


class GazeModel:
    """A language model and its vision projector, loaded once; ``session()`` evaluates sequences."""

    def __init__(self, files: ModelFiles, model_p, mtmd_p, n_threads: int, n_gpu_layers: int) -> None:
        self.files = files
        self._model = model_p
        self._mtmd = mtmd_p
        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self._vocab = llama_cpp.llama_model_get_vocab(model_p)
        # chat() holds it for a whole answer: one model, any number of threads, one answer at a time
        self.lock = threading.RLock()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        mmproj: str | os.PathLike | None = None,
        *,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        verbose: bool = False,
    ) -> GazeModel:
        """Load ``path`` (see ``find_model_files``): the language model, then its projector.
        Without a path: the embedded default model (gaze_edge.default_model).

        n_gpu_layers: layers offloaded to a GPU backend (0: CPU only); the projector follows
          (on the GPU when n_gpu_layers > 0).
        """
        if path is None:
            from gaze_edge.default_model import default_model_dir

            path = default_model_dir()
        files = find_model_files(path, mmproj)
        _set_verbose(verbose)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # no repacked CPU weight buffers: where the CPU advertises AMX but the OS has not enabled it
        # (the project's build machines), ggml's AMX kernels die with SIGILL; the plain ones compute the same
        mparams.use_extra_bufts = False
        model_p = llama_cpp.llama_model_load_from_file(str(files.model).encode(), mparams)
        if not model_p:
            raise ModelFilesError(f"llama.cpp could not load {files.model} (not a valid GGUF language model?)")
        n_threads = n_threads or _default_threads()
        mtmd_p = None
        if files.mmproj is not None:
            cparams = mtmd_cpp.mtmd_context_params_default()
            cparams.use_gpu = n_gpu_layers > 0
            cparams.n_threads = n_threads
            cparams.print_timings = False
            cparams.warmup = False
            mtmd_p = mtmd_cpp.mtmd_init_from_file(str(files.mmproj).encode(), model_p, cparams)
            if not mtmd_p:
                llama_cpp.llama_model_free(model_p)
                raise ModelFilesError(
                    f"mtmd could not load the projector {files.mmproj} (corrupt, or not made for this model?)"
                )
        return cls(files, model_p, mtmd_p, n_threads, n_gpu_layers)

    @property
    def closed(self) -> bool:
        return not self._model

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the model is closed")

    # --- what the model is -------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        self._check_open()
        return int(llama_cpp.llama_vocab_n_tokens(self._vocab))

    @property
    def n_layer(self) -> int:
        self._check_open()
        return int(llama_cpp.llama_model_n_layer(self._model))

    @property
    def n_embd(self) -> int:
        self._check_open()
        return int(llama_cpp.llama_model_n_embd(self._model))

    def size_bytes(self) -> int:
        """Bytes of the language model's tensors."""
        self._check_open()
        return int(llama_cpp.llama_model_size(self._model))

    @property
    def n_head(self) -> int:
        self._check_open()
        return int(llama_cpp.llama_model_n_head(self._model))

    @property
    def n_head_kv(self) -> int:
        self._check_open()
        return int(llama_cpp.llama_model_n_head_kv(self._model))

    @property
    def has_vision(self) -> bool:
        return self._mtmd is not None

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value of the language model, as text (None if absent)."""
        self._check_open()
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    @property
    def arch(self) -> str:
        return self.meta("general.architecture") or ""

    def gaze_defaults(self) -> GazeDefaults:
        """Region size and context tokens (mmproj), selection defaults (language model)."""
        rw, rh, n_ctx = ctypes.c_int32(0), ctypes.c_int32(0), ctypes.c_int32(0)
        has_regions = bool(self._mtmd) and bindings.mtmd_gaze_get_params(
            self._mtmd, ctypes.byref(rw), ctypes.byref(rh), ctypes.byref(n_ctx)
        )
        arch = self.arch
        top_k = self.meta(gguf_names.llm_key(gguf_names.LLM_TOP_K, arch))
        keep_ratio = self.meta(gguf_names.llm_key(gguf_names.LLM_KEEP_RATIO, arch))
        mode = self.meta(gguf_names.llm_key(gguf_names.LLM_SCORE_MODE, arch))
        names = {v: k for k, v in gguf_names.SCORE_MODE_IDS.items()}
        return GazeDefaults(
            region_h=rh.value if has_regions else None,
            region_w=rw.value if has_regions else None,
            n_context_tokens=n_ctx.value,
            top_k=int(top_k) if top_k is not None else 0,
            keep_ratio=float(keep_ratio) if keep_ratio is not None else 0.25,
            score_mode=names[int(mode)] if mode is not None else "gqa_mean",
        )

    # --- text --------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        self._check_open()
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"could not tokenize {text[:40]!r}")
        return list(buf[:n])

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        self._check_open()
        pieces = []
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = llama_cpp.llama_token_to_piece(self._vocab, int(t), buf, len(buf), 0, special)
            pieces.append(buf.raw[: max(n, 0)])
        return b"".join(pieces).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """True for an end-of-generation token (EOS, EOT, ...)."""
        self._check_open()
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, int(token)))

    @property
    def add_bos(self) -> bool:
        self._check_open()
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    @property
    def n_ctx_train(self) -> int:
        return int(llama_cpp.llama_model_n_ctx_train(self._model))

    # --- chat --------------------------------------------------------------------------------

    def chat(self, messages_or_prompt, **kwargs):
        """Answer a prompt or a conversation with the model's own chat template (from its GGUF).

        messages_or_prompt: a string, or HF-style messages [{"role": "user", "content": str or
          [{"type": "image", "image": path_or_PIL}, {"type": "text", "text": ...}]}, ...].
        image= / images=: images put before the text of the last user message.
        max_tokens=256, temperature=0.0 (greedy), top_p=0.95, seed=None.
        gaze=None (on for gaze models), top_k=None / keep_ratio=None (override the model's).
        gather=False: gather the kept K/V rows instead of masking the cache (same selection; on
          the CPU faster at small keep ratios with many image tokens, see docs/BENCHMARKS.md).
        trace=False: True keeps, per generated token, the regions the model looked at.
        stream=False: True returns an iterator of text pieces instead of a ChatResult.
        n_ctx=None: the context size (default: the model's training context, at most 4096).

        Thread safety: a GazeModel may be shared between threads; calls are serialised by
        ``self.lock`` (each answer runs in a fresh llama.cpp context of its own). A streamed
        answer holds the lock until the iterator is exhausted or closed.
        """
        from gaze_edge.chat import chat

        return chat(self, messages_or_prompt, **kwargs)

    # --- sessions ----------------------------------------------------------------------------

    def session(
        self,
        gaze: bool = True,
        top_k: int | None = None,
        keep_ratio: float | None = None,
        *,
        score_mode: str | None = None,
        gather: bool = False,
        n_ctx: int | None = None,
        kv_type: str = "f16",
        trace: bool = True,
        eval_callback=None,
    ):
        """A fresh sequence in its own llama.cpp context (see ``GazeSession``).

        gaze: False evaluates every token densely (the context tokens are still there).
        top_k / keep_ratio / score_mode: override the model's defaults; top_k > 0 takes
          precedence over keep_ratio (GAZE_SPEC.md, Selection).
        gather: restrict attention by gathering the visible K/V rows instead of masking.
        n_ctx: positions in the context (default: the model's training length, at most 4096).
        kv_type: "f16", "q8_0" or "f32" KV cache (flash attention reads an f32 cache as f16).
        trace: record each gazing step's selection for ``trace()``.
        eval_callback: a ggml_backend_sched_eval_callback for the context (profiling).
        """
        from gaze_edge.runtime.session import GazeSession

        self._check_open()
        if n_ctx is None:
            n_ctx = min(4096, int(llama_cpp.llama_model_n_ctx_train(self._model)))
        return GazeSession(
            self, gaze=gaze, top_k=top_k, keep_ratio=keep_ratio, score_mode=score_mode, gather=gather,
            n_ctx=n_ctx, kv_type=kv_type, trace=trace, eval_callback=eval_callback,
        )

    def image_positions(self, image) -> int:
        """Positions ``image`` (a path or a PIL image) takes in a sequence: its grid, context tokens
        and any text mtmd puts around it. Tokenizes only (no encoding): cheap."""
        from gaze_edge.runtime.session import image_positions

        self._check_open()
        return image_positions(self, image)

    def close(self) -> None:
        if getattr(self, "_mtmd", None):
            mtmd_cpp.mtmd_free(self._mtmd)
            self._mtmd = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> GazeModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        name = re.sub(r"\.gguf$", "", self.files.model.name)
        if self.closed:
            return f"GazeModel({name!r}, closed)"
        return f"GazeModel({name!r}, arch={self.arch!r}, vision={self.has_vision})"
