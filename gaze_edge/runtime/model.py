"""``GazeModel``: a converted model (language-model GGUF + mmproj GGUF) in the patched llama.cpp.

    model = GazeModel.load("out/")                # a folder from `gaze-edge convert`, or the two files
    with model.session(keep_regions=8) as s:            # one sequence in its own llama.cpp context
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
import weakref
from dataclasses import dataclass
from pathlib import Path

from gaze_edge import gguf_names
from gaze_edge.config import TRAINING_FREE, GazeConfig
from gaze_edge.runtime import bindings, logs

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

    path: the language-model GGUF, or a folder holding exactly one (what ``gaze-edge convert``
      writes: ``<name>-<outtype>.gguf`` and ``mmproj-<name>-<outtype>.gguf``). A folder with
      several quantizations names them all: pass the one to use as a file.
    mmproj: the projector GGUF. Without it, the projector is found beside the model: the file
      ``mmproj-<model file name>``, else the only ``mmproj*.gguf`` there; several candidates are
      listed (pass one with mmproj); none: a text-only model.
    """
    path = Path(path).expanduser()
    if mmproj is not None:
        mmproj = Path(mmproj).expanduser()
        if not mmproj.is_file():
            raise ModelFilesError(f"no such mmproj file: {mmproj}")
    if path.is_dir():
        ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
        models = [p for p in ggufs if not _is_projector(p)]
        if len(models) != 1:
            found = ", ".join(p.name for p in models) or "none"
            raise ModelFilesError(f"{path} must hold exactly one language-model .gguf (found: {found}); "
                                  "pass the one to use as -m FILE")
        path = models[0]
    elif not path.is_file():
        raise ModelFilesError(f"no such model file or folder: {path}")
    elif _is_projector(path):
        raise ModelFilesError(f"{path.name} is a projector (mmproj); give the language model, and this with --mmproj")
    if mmproj is not None:
        return ModelFiles(path, mmproj)
    want = path.parent / f"{_MMPROJ_PREFIX}{path.name}"
    if want.is_file():
        return ModelFiles(path, want)
    projectors = sorted(p for p in path.parent.glob("*.gguf") if p.is_file() and _is_projector(p))
    if len(projectors) == 1:
        return ModelFiles(path, projectors[0])
    if len(projectors) > 1:
        raise ModelFilesError(f"several projectors beside {path.name}: {', '.join(p.name for p in projectors)}; "
                              "pass one with --mmproj")
    return ModelFiles(path, None)


def _is_projector(path: Path) -> bool:
    return path.name.lower().startswith(_MMPROJ_PREFIX.rstrip("-"))


def open_projector(mmproj: Path, model_p, *, n_threads: int, use_gpu: bool, image_min_tokens: int | None = None,
                   image_max_tokens: int | None = None, what: str = "this model"):
    """An mtmd context for the projector GGUF ``mmproj`` on the loaded language model ``model_p``,
    with the settings every gaze-edge model uses; ModelFilesError (with mtmd's reason) if refused,
    InvalidGGUFError if the file would crash clip.cpp (gaze_edge.runtime.gguf_check)."""
    from gaze_edge.runtime import gguf_check

    gguf_check.check_projector(mmproj, n_embd_text=int(llama_cpp.llama_model_n_embd_inp(model_p)))
    cparams = mtmd_cpp.mtmd_context_params_default()
    cparams.use_gpu = use_gpu
    cparams.n_threads = n_threads
    cparams.print_timings = False
    cparams.warmup = False
    if image_min_tokens is not None:
        cparams.image_min_tokens = int(image_min_tokens)
    if image_max_tokens is not None:
        cparams.image_max_tokens = int(image_max_tokens)
    mtmd_p = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), model_p, cparams)
    if not mtmd_p:
        raise ModelFilesError(f"mtmd could not load the projector {mmproj} (corrupt, or not made for {what}?){_why()}")
    return mtmd_p


def _plain_gaze(mtmd_p, region: tuple[int, int], context_tokens: int) -> str | None:
    """Gaze settings for a projector without learned context tokens; the reason when refused."""
    rh, rw = (int(v) for v in region)
    if rh < 1 or rw < 1 or not 0 <= int(context_tokens) <= 64:
        return f"gaze region must be at least 1x1 and context tokens 0 to 64, got {rh}x{rw} and {context_tokens}"
    if not mtmd_p:
        return "gaze needs the model's projector (--mmproj)"
    learned = ctypes.c_int32(0)
    bindings.mtmd_gaze_get_params(mtmd_p, None, None, ctypes.byref(learned))
    if learned.value > 0 and not bindings.mtmd_gaze_get_ctx_pooled(mtmd_p):
        return "this projector has learned gaze context tokens: its gaze settings come with it (drop the region)"
    if not bindings.mtmd_gaze_set_params(mtmd_p, rw, rh, int(context_tokens)):
        return f"mtmd refused gaze region {rh}x{rw} with {context_tokens} context tokens{_why()}"
    return None


def _auto_region(mtmd_p) -> tuple[int, int] | None:
    """TRAINING_FREE's region for a projector that has no gaze settings; None for one that has
    them (or for no projector: nothing to gaze at)."""
    if not mtmd_p or bindings.mtmd_gaze_get_params(mtmd_p, None, None, None):
        return None
    return (TRAINING_FREE.region_h, TRAINING_FREE.region_w)


def _why() -> str:
    """": <what llama.cpp logged as errors>" or "" (gaze_edge.runtime.logs)."""
    said = logs.take_errors()
    return f": {said}" if said else ""


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class GazeDefaults:
    """The gaze settings stored with the model (GGUF keys); None where the model has none."""

    region_h: int | None
    region_w: int | None
    n_context_tokens: int
    keep_regions: int  # the GGUF's gaze top_k: regions kept per step, 0 = use keep_ratio
    keep_ratio: float
    score_mode: str
    n_dense_layers: int = 0
    context_tokens: str | None = None  # "learned", "pooled", or None without context tokens


class GazeModel:
    """A language model and its vision projector, loaded once; ``session()`` evaluates sequences."""

    def __init__(self, files: ModelFiles, model_p, mtmd_p, n_threads: int, n_gpu_layers: int,
                 n_ctx: int | None = None, cached_conversations: int = 2,
                 conversation_memory: int | None = None) -> None:
        from gaze_edge.conversation import ConversationPool

        self.files = files
        self._model = model_p
        self._mtmd = mtmd_p
        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self._vocab = llama_cpp.llama_model_get_vocab(model_p)
        self.n_ctx = n_ctx  # the default context of chats and sessions (None: see default_n_ctx)
        # chat() holds it for a whole answer: one model, any number of threads, one answer at a time
        self.lock = threading.RLock()
        # the warm conversations chat() answers from (gaze_edge.conversation)
        self.conversations = ConversationPool(self, cached_conversations, conversation_memory)
        self._footprints: dict[str, tuple[int, int]] = {}
        self._sessions: weakref.WeakSet = weakref.WeakSet()  # live sessions, closed by close()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        mmproj: str | os.PathLike | None = None,
        *,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_ctx: int | None = None,
        cached_conversations: int = 2,
        conversation_memory: int | None = None,
        image_min_tokens: int | None = None,
        image_max_tokens: int | None = None,
        gaze_region: tuple[int, int] | str | None = None,
        context_tokens: int | None = None,
        verbose: bool = False,
    ) -> GazeModel:
        """Load ``path`` (see ``find_model_files``): the language model, then its projector.
        Without a path: the embedded default model (gaze_edge.default_model).

        n_gpu_layers: layers offloaded to a GPU backend (0: CPU only, -1: all); the projector
          follows (on the GPU when n_gpu_layers != 0).
        n_ctx: context cells of chats and sessions (None: the training context, at most 4096;
          0: the training context).
        image_min_tokens / image_max_tokens: mtmd's bounds on the visual tokens of an image, for
          projectors with dynamic resolution (Qwen2-VL); None: the projector's defaults.
        cached_conversations: warm conversations ``chat`` keeps (each one llama.cpp context;
          ``kv_cache_bytes(n_ctx)`` of KV cache each); 0: every call evaluates cold.
        conversation_memory: bytes of KV cache the warm conversations may hold together (None: no
          limit beyond cached_conversations; at least one conversation is always kept).
        gaze_region: (region_h, region_w) makes a model gaze that was not converted for it (a
          community GGUF pair): regions of that size, and ``context_tokens`` context tokens pooled
          from each image's own embeddings (GAZE_SPEC.md "Pooled context tokens"; 0: none; None:
          ``gaze_edge.config.TRAINING_FREE``'s count). Its selection defaults are TRAINING_FREE's
          (keep ratio, score mode, dense layers). Refused for a projector with learned context
          tokens (its gaze settings come with it). "auto": TRAINING_FREE's region for a projector
          without gaze regions, nothing for one with them (what ``gaze-edge chat --keep-ratio``
          asks for).
        """
        if path is None:
            from gaze_edge.default_model import default_model_dir

            path = default_model_dir()
        files = find_model_files(path, mmproj)
        from gaze_edge.runtime import gguf_check

        # before llama.cpp sees them: a corrupt file is one clear error instead of a crash
        gguf_check.check_model(files.model)
        if files.mmproj is not None:
            gguf_check.check_projector(files.mmproj)  # open_projector checks it against the model too
        logs.install(verbose)
        logs.take_errors()
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 2**31 - 1
        # no repacked CPU weight buffers: where the CPU advertises AMX but the OS has not enabled it
        # (the project's build machines), ggml's AMX kernels die with SIGILL; the plain ones compute the same
        mparams.use_extra_bufts = False
        model_p = llama_cpp.llama_model_load_from_file(str(files.model).encode(), mparams)
        if not model_p:
            raise ModelFilesError(f"llama.cpp could not load {files.model} (not a valid GGUF language model?){_why()}")
        n_threads = n_threads or _default_threads()
        mtmd_p = None
        if files.mmproj is not None:
            try:
                mtmd_p = open_projector(files.mmproj, model_p, n_threads=n_threads, use_gpu=n_gpu_layers != 0,
                                        image_min_tokens=image_min_tokens, image_max_tokens=image_max_tokens)
            except ModelFilesError:
                llama_cpp.llama_model_free(model_p)
                raise
        if gaze_region == "auto":
            gaze_region = _auto_region(mtmd_p)
        if gaze_region is not None:
            why = _plain_gaze(mtmd_p, gaze_region,
                              TRAINING_FREE.n_context_tokens if context_tokens is None else context_tokens)
            if why:
                if mtmd_p:
                    mtmd_cpp.mtmd_free(mtmd_p)
                llama_cpp.llama_model_free(model_p)
                raise ModelFilesError(why)
        return cls(files, model_p, mtmd_p, n_threads, n_gpu_layers, n_ctx=n_ctx,
                   cached_conversations=cached_conversations, conversation_memory=conversation_memory)

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
        n_dense = self.meta(gguf_names.llm_key(gguf_names.LLM_N_DENSE_LAYERS, arch))
        names = {v: k for k, v in gguf_names.SCORE_MODE_IDS.items()}
        pooled = bool(self._mtmd) and bool(bindings.mtmd_gaze_get_ctx_pooled(self._mtmd))
        # a GGUF without gaze keys: a plain pair gazing with the training-free settings (or not at
        # all); a gaze GGUF's missing key takes the spec's default
        base = GazeConfig() if any(v is not None for v in (top_k, keep_ratio, mode, n_dense)) else TRAINING_FREE
        return GazeDefaults(
            region_h=rh.value if has_regions else None,
            region_w=rw.value if has_regions else None,
            n_context_tokens=n_ctx.value,
            keep_regions=int(top_k) if top_k is not None else 0,
            keep_ratio=float(keep_ratio) if keep_ratio is not None else base.keep_ratio,
            score_mode=names[int(mode)] if mode is not None else base.score_mode,
            n_dense_layers=int(n_dense) if n_dense is not None else base.n_dense_layers,
            context_tokens=("pooled" if pooled else "learned") if n_ctx.value > 0 else None,
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

    def default_n_ctx(self) -> int:
        """The context of a chat or session when none is given: ``n_ctx`` of ``load`` (0: the
        training context), else the training context capped at 4096 cells."""
        if self.n_ctx == 0:
            return self.n_ctx_train
        return self.n_ctx or min(4096, max(512, self.n_ctx_train))

    def kv_cache_bytes(self, n_ctx: int, kv_type: str = "f16") -> int:
        """Bytes of the K and V cache of a context of ``n_ctx`` cells (what each warm conversation
        holds, allocated when it starts; compute buffers come on top)."""
        arch = self.arch
        n_head_kv = self.n_head_kv
        head_k = self.meta(f"{arch}.attention.key_length")
        head_v = self.meta(f"{arch}.attention.value_length")
        default = self.n_embd // max(1, self.n_head)
        width = n_head_kv * (int(head_k or default) + int(head_v or default))
        per_value = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}[kv_type]
        return int(self.n_layer * n_ctx * width * per_value)

    # --- chat --------------------------------------------------------------------------------

    def chat(self, messages_or_prompt, **kwargs):
        """Answer a prompt or a conversation with the model's own chat template (from its GGUF).

        messages_or_prompt: a string, or HF-style messages [{"role": "user", "content": str or
          [{"type": "image", "image": ...}, {"type": "text", "text": ...}]}, ...]; OpenAI's
          {"type": "image_url", "image_url": {"url": ...}} parts work too. An image is a path, a
          PIL image, the bytes of an image file or a data: URL.
        image= / images=: images put before the text of the last user message.
        Sampling (llama.cpp's sampler chain, gaze_edge.sampling.SamplingSettings):
          max_tokens=256, temperature=0.0 (greedy), top_k=40, top_p=0.95, min_p=0.05,
          typical_p=1.0, repeat_penalty=1.0, repeat_last_n=64, presence_penalty=0.0,
          frequency_penalty=0.0, seed=None, stop=() (strings that end the answer, not shown),
          grammar=None (GBNF), json_schema=None (a dict or JSON text), json_object=False.
        Gaze: gaze=None (on for gaze models), keep_regions=None (regions kept per step; the
          spec's gaze top_k) / keep_ratio=None (override the model's); gather=False: gather the
          kept K/V rows instead of masking the cache (same selection; on the CPU faster at small
          keep ratios with many image tokens, see docs/BENCHMARKS.md).
        trace=False: True keeps, per generated token, the regions the model looked at.
        logits=False: True keeps, per sampled token, the (n_vocab,) logits it was sampled from.
        stream=False: True returns an iterator of text pieces instead of a ChatResult.
        n_ctx=None: context cells (default: ``default_n_ctx()``; 0: the training context).
        progress=None: a callable (done, total) told how far the prompt's evaluation is, in cells.
        cancel=None: a callable checked before each token; True ends the answer
          (finish_reason "cancelled"), e.g. when a client disconnects.

        Warm: calls are answered from a small pool of recent conversations
        (``self.conversations``, see ``load(cached_conversations=)``): the longest prefix a call
        shares with a cached one (text tokens, images by their pixels) is not evaluated again,
        and the answer equals a cold evaluation of the same messages.

        Thread safety: a GazeModel may be shared between threads; calls are serialised by
        ``self.lock``. A streamed answer holds the lock until the iterator is exhausted or closed.
        """
        from gaze_edge.chat import chat

        return chat(self, messages_or_prompt, **kwargs)

    def conversation(self, *, n_ctx: int | None = None, kv_type: str = "f16"):
        """An explicit warm conversation (its own llama.cpp context): ``conv.chat(messages)``
        evaluates only what changed since its last call. Close it (or use ``with``) to free it."""
        from gaze_edge.conversation import Conversation

        self._check_open()
        return Conversation(self, n_ctx=n_ctx, kv_type=kv_type)

    # --- sessions ----------------------------------------------------------------------------

    def session(
        self,
        gaze: bool = True,
        keep_regions: int | None = None,
        keep_ratio: float | None = None,
        *,
        score_mode: str | None = None,
        gather: bool = False,
        n_ctx: int | None = None,
        kv_type: str = "f16",
        trace: bool = True,
        eval_callback=None,
        n_dense_layers: int | None = None,
    ):
        """A fresh sequence in its own llama.cpp context (see ``GazeSession``).

        gaze: False evaluates every token densely (the context tokens are still there).
        keep_regions / keep_ratio / score_mode: override the model's defaults; keep_regions > 0
          (the spec's gaze top_k) takes precedence over keep_ratio (GAZE_SPEC.md, Selection).
        gather: restrict attention by gathering the visible K/V rows instead of masking.
        n_ctx: positions in the context (default: the model's training length, at most 4096).
        kv_type: "f16", "q8_0" or "f32" KV cache (flash attention reads an f32 cache as f16).
        trace: record each gazing step's selection for ``trace()``.
        eval_callback: a ggml_backend_sched_eval_callback for the context (profiling).
        n_dense_layers: the first layers attend densely at gaze steps (None: the model's default,
          GAZE_SPEC.md "Dense first layers").
        """
        from gaze_edge.runtime.session import GazeSession

        self._check_open()
        if n_ctx is None:
            n_ctx = self.default_n_ctx()
        return GazeSession(
            self, gaze=gaze, keep_regions=keep_regions, keep_ratio=keep_ratio, score_mode=score_mode, gather=gather,
            n_ctx=n_ctx, kv_type=kv_type, trace=trace, eval_callback=eval_callback, n_dense_layers=n_dense_layers,
        )

    def image_footprint(self, image, *, key: str | None = None) -> tuple[int, int]:
        """(KV-cache cells, positions) ``image`` takes in a sequence, without encoding it; ``key``
        (gaze_edge.images.image_key) caches the answer for images seen before."""
        from gaze_edge.runtime.session import image_footprint

        self._check_open()
        if key is not None and key in self._footprints:
            return self._footprints[key]
        found = image_footprint(self, image)
        if key is not None:
            if len(self._footprints) > 1024:
                self._footprints.clear()
            self._footprints[key] = found
        return found

    def image_positions(self, image) -> int:
        """Positions ``image`` (a path or a PIL image) takes in a sequence: its grid, context tokens
        and any text mtmd puts around it. Tokenizes only (no encoding): cheap."""
        from gaze_edge.runtime.session import image_positions

        self._check_open()
        return image_positions(self, image)

    def close(self) -> None:
        """Free the model; sessions and conversations still open on it are closed first (their
        contexts would otherwise point at freed weights)."""
        if getattr(self, "conversations", None) is not None:
            self.conversations.close()
        for session in list(getattr(self, "_sessions", ())):
            session.close()
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
