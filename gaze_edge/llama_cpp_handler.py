"""Gaze for code that already uses llama-cpp-python: a chat handler for ``llama_cpp.Llama``.

    from llama_cpp import Llama
    from gaze_edge.llama_cpp_handler import GazeChatHandler

    llm = Llama(model_path="gaze-scenes-f32.gguf", n_ctx=2048, flash_attn=True,
                chat_handler=GazeChatHandler(clip_model_path="mmproj-gaze-scenes-f32.gguf"))
    llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "Describe the image."}]}])
    llm.chat_handler.last_result.visual_kv_fraction     # what gaze did for that answer

``GazeChatHandler`` follows llama-cpp-python's ``LlamaChatCompletionHandler`` protocol (as its
``Llava15ChatHandler`` / ``MTMDChatHandler`` do): ``Llama.create_chat_completion`` calls it with
``llama=``, ``messages=`` and the sampling arguments, and it returns an OpenAI
``chat.completion`` dict, or with ``stream=True`` an iterator of ``chat.completion.chunk`` dicts.

The answer comes from gaze-edge's own chat (``gaze_edge.conversation``), so it equals
``gaze-edge chat``'s for the same messages and settings. The language model's weights are not
loaded again: the handler wraps the ``Llama``'s own llama.cpp model (``llama.model``) in a
``GazeModel`` that does not own it, and opens the projector on it once (as llama-cpp-python's
handlers do). It answers in a gaze-enabled llama.cpp context of its own (gaze needs flash
attention and its per-context settings), which stays warm between calls. Both are freed before
the ``Llama`` frees its model (a callback on the ``Llama``'s exit stack, the mechanism
llama-cpp-python's own handlers use), or by ``handler.close()``. docs/LLAMA_CPP_PYTHON.md has
what is shared and the limits.
"""

from __future__ import annotations

import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gaze_edge.errors import GazeEdgeError

# create_chat_completion arguments that would change the answer and that gaze-edge cannot honour
_UNSUPPORTED = ("functions", "function_call", "tools", "tool_choice", "logit_bias", "logits_processor",
                "logprobs", "top_logprobs")


class ProjectorFileError(GazeEdgeError, ValueError):
    """The handler's projector (mmproj) file is missing or llama.cpp cannot open it."""


def _borrowed_model_class():
    """``GazeModel`` around a llama.cpp model someone else owns (imported lazily: the runtime
    is needed only when the handler is first called)."""
    from gaze_edge.runtime.model import GazeModel, mtmd_cpp

    class BorrowedGazeModel(GazeModel):
        """A GazeModel whose language model belongs to a ``llama_cpp.Llama``: ``close()`` frees
        the warm conversations and the projector, never the model."""

        def __init__(self, *args, owner, **kwargs) -> None:
            self._owner = owner  # the Llama's LlamaModel wrapper, kept alive with us
            super().__init__(*args, **kwargs)

        def close(self) -> None:
            if getattr(self, "conversations", None) is not None:
                self.conversations.close()
            if getattr(self, "_mtmd", None):
                mtmd_cpp.mtmd_free(self._mtmd)
                self._mtmd = None
            self._model = None  # not ours to free
            self._owner = None

    return BorrowedGazeModel


def borrow_model(llama, clip_model_path: str | Path, *, n_threads: int | None = None,
                 n_ctx: int | None = None, verbose: bool = False):
    """A ``GazeModel`` on ``llama``'s loaded language model and a projector opened on it.

    The projector is opened as ``GazeModel.load`` opens it (same mtmd settings), so images are
    encoded exactly as ``gaze-edge chat`` encodes them. The caller closes it before ``llama``
    frees its model.
    """
    from gaze_edge.runtime import logs
    from gaze_edge.runtime.model import ModelFiles, ModelFilesError, open_projector

    model_p = llama.model
    if not model_p:
        raise GazeEdgeError("the Llama's model is closed")
    n_threads = int(n_threads or llama.n_threads_batch or llama.n_threads or 1)
    n_gpu_layers = int(llama.model_params.n_gpu_layers)
    logs.install(verbose)
    logs.take_errors()
    try:
        mtmd_p = open_projector(Path(clip_model_path), model_p, n_threads=n_threads, use_gpu=n_gpu_layers != 0,
                                what=Path(llama.model_path).name)
    except ModelFilesError as e:
        raise ProjectorFileError(str(e)) from None
    files = ModelFiles(Path(llama.model_path), Path(clip_model_path))
    return _borrowed_model_class()(files, model_p, mtmd_p, n_threads, n_gpu_layers,
                                   n_ctx=n_ctx or llama.n_ctx(), cached_conversations=0, owner=llama._model)


class GazeChatHandler:
    """A llama-cpp-python chat handler that answers with gaze (see the module docstring).

    clip_model_path: the vision projector GGUF (``mmproj-*.gguf``) of the Llama's model.
    gaze / keep_regions / keep_ratio / gather: gaze settings of every answer, as in
      ``GazeModel.chat`` (None: the model's own); a direct call
      ``handler(llama=llm, messages=..., keep_regions=2)`` overrides them for one answer.
    n_ctx: context cells of the handler's conversation (None: the Llama's ``n_ctx``).
    n_threads: CPU threads (None: the Llama's ``n_threads_batch``).
    verbose: print llama.cpp's and mtmd's log lines (None: follow the Llama's ``verbose``).

    ``last_result`` is the last answer's ``gaze_edge.chat.ChatResult`` (steps with their gaze
    traces, ``visual_kv_fraction``, timings); ``model`` the ``GazeModel`` in use (None until the
    first call).
    """

    def __init__(self, clip_model_path: str | Path, *, gaze: bool | None = None, keep_regions: int | None = None,
                 keep_ratio: float | None = None, gather: bool = False, n_ctx: int | None = None,
                 n_threads: int | None = None, verbose: bool | None = None) -> None:
        path = Path(clip_model_path).expanduser()
        if not path.is_file():
            raise ProjectorFileError(f"no such projector (mmproj) file: {path}")
        self.clip_model_path = path
        self.gaze = gaze
        self.keep_regions = keep_regions
        self.keep_ratio = keep_ratio
        self.gather = gather
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.verbose = verbose
        self.last_result = None
        self.model = None
        self._conversation = None
        self._llama = None  # weakref to the Llama the model belongs to

    # --- lifetime ----------------------------------------------------------------------------

    def _bind(self, llama):
        """The GazeModel and conversation for ``llama``, made on first use (again if the handler
        is moved to another Llama)."""
        bound = self._llama() if self._llama is not None else None
        if bound is llama and self.model is not None and self.model._model == llama.model:
            return self.model, self._conversation
        self.close()
        verbose = llama.verbose if self.verbose is None else self.verbose
        model = borrow_model(llama, self.clip_model_path, n_threads=self.n_threads, n_ctx=self.n_ctx,
                             verbose=verbose)
        self.model, self._conversation = model, model.conversation()
        self._llama = weakref.ref(llama)
        # the Llama closes its exit stack last-in first-out: this runs before it frees the model
        handler = weakref.ref(self)
        llama._stack.callback(_release_if_bound, handler, model)
        return self.model, self._conversation

    def close(self) -> None:
        """Free the handler's llama.cpp context and projector (the Llama keeps its model); the next
        call opens them again."""
        if self._conversation is not None:
            self._conversation.close()
            self._conversation = None
        if self.model is not None:
            self.model.close()
            self.model = None
        self._llama = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # --- answering ---------------------------------------------------------------------------

    def __call__(self, *, llama, messages, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                 min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False, stop=None,
                 seed: int | None = None, response_format=None, max_tokens: int | None = None,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repeat_penalty: float = 1.0,
                 model: str | None = None, grammar=None, mirostat_mode: int = 0, gaze: bool | None = None,
                 keep_regions: int | None = None, keep_ratio: float | None = None, gather: bool | None = None,
                 **others):
        """Answer ``messages`` (OpenAI chat messages; images as ``image_url`` parts with data: URLs
        or file paths) the way ``Llama.create_chat_completion`` asks; see the class docstring."""
        from gaze_edge.conversation import prepare_call

        for name in _UNSUPPORTED:
            if others.get(name):
                raise GazeEdgeError(f"GazeChatHandler does not support {name}")
        if mirostat_mode:
            raise GazeEdgeError("GazeChatHandler does not support mirostat sampling (mirostat_mode=0)")
        gaze_model, conversation = self._bind(llama)
        options = dict(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            repeat_penalty=repeat_penalty, repeat_last_n=int(getattr(llama, "last_n_tokens_size", 64)),
            seed=seed, stop=tuple([stop] if isinstance(stop, str) else (stop or ())),
            max_tokens=max_tokens if max_tokens and max_tokens > 0 else conversation.n_ctx,
            gaze=self.gaze if gaze is None else gaze,
            keep_regions=self.keep_regions if keep_regions is None else keep_regions,
            keep_ratio=self.keep_ratio if keep_ratio is None else keep_ratio,
            gather=self.gather if gather is None else gather,
            trace=True, **_constraint(response_format, grammar),
        )
        call = prepare_call(gaze_model, messages, options)  # every input error here, before any compute
        plan = conversation.plan(call)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model if model is not None else llama.model_path}
        pieces = self._run(gaze_model, conversation, call, plan)
        if stream:
            return self._chunks(pieces, meta)
        text = "".join(pieces)
        result = self.last_result
        return {
            **meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": result.finish_reason}],
            "usage": _usage(result),
        }

    def _run(self, gaze_model, conversation, call, plan) -> Iterator[str]:
        """The answer's text pieces; sets ``last_result`` when it ends. Holds the model's lock
        while it runs (a streamed answer until the iterator is exhausted or closed)."""
        with gaze_model.lock:
            for item in conversation.run(call, plan):
                if isinstance(item, str):
                    yield item
                else:
                    self.last_result = item

    def _chunks(self, pieces: Iterator[str], meta: dict) -> Iterator[dict]:
        """chat.completion.chunk dicts as llama-cpp-python streams them: the role, the text
        pieces, then an empty delta with the finish reason."""
        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            return {**meta, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        yield chunk({"role": "assistant"})
        for piece in pieces:
            yield chunk({"content": piece})
        yield chunk({}, self.last_result.finish_reason)


def _release_if_bound(handler_ref, model) -> None:
    """The Llama is closing: free what the handler opened on its model, if still bound to it."""
    handler = handler_ref()
    if handler is not None and handler.model is model:
        handler.close()
    else:
        model.close()


def _constraint(response_format, grammar) -> dict:
    """GazeModel.chat's json_object / json_schema / grammar from OpenAI's ``response_format``
    ({"type": "text" | "json_object", "schema"?: ...} as llama-cpp-python takes it, or
    {"type": "json_schema", "json_schema": {"schema": ...}}) and a ``llama_cpp.LlamaGrammar``."""
    found: dict[str, Any] = {}
    if grammar is not None:
        text = getattr(grammar, "_grammar", grammar)
        if not isinstance(text, str):
            raise GazeEdgeError("grammar must be a llama_cpp.LlamaGrammar or GBNF text")
        found["grammar"] = text
    if response_format:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            schema = response_format.get("schema")
            found.update({"json_schema": schema} if schema is not None else {"json_object": True})
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is None:
                raise GazeEdgeError("response_format json_schema needs json_schema.schema")
            found["json_schema"] = schema
        elif kind != "text":
            raise GazeEdgeError(f"unknown response_format type {kind!r} (text, json_object or json_schema)")
    if len(found) > 1:
        raise GazeEdgeError("give either a grammar or a JSON response_format, not both")
    return found


def _usage(result) -> dict:
    return {"prompt_tokens": result.n_prompt_tokens, "completion_tokens": result.n_generated_tokens,
            "total_tokens": result.n_prompt_tokens + result.n_generated_tokens}
