"""Conversations that stay warm: one llama.cpp context kept between calls, prompt prefixes reused.

Each call renders the whole message list with the model's chat template into a *plan*: the
prompt's elements in order, each a text token or an image (named by a hash of its decoded
pixels). The conversation remembers the elements its cache holds; a new call keeps the longest
prefix the two share, removes the rest from the cache (images after the cut leave the gaze
registry with their cells; images before it keep their regions and descriptors) and evaluates
only what is new.

Only elements that a cold evaluation would compute the same way are reused: prompt tokens, and
generated tokens that were evaluated densely. A generated token evaluated with gaze has K/V
computed from a restricted attention, while a cold evaluation of the same messages reads it as a
dense prompt token, so the prefix match stops at the first gazed token (GAZE_SPEC.md, "Warm
conversations"). This is what makes a warm answer equal the cold one for any edit, gaze setting
or sampling change.

``GazeModel.chat`` goes through a small pool of recent conversations (``ConversationPool``);
``GazeModel.conversation()`` gives an explicit one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gaze_edge.chat import ChatResult, ChatStep, normalize_messages, render_prompt, split_prompt
from gaze_edge.errors import ContextOverflowError, GazeEdgeError
from gaze_edge.images import image_key, load_image
from gaze_edge.sampling import Sampler, SamplingSettings, StopMatcher
from gaze_edge.video import Video, VideoPart, expand_videos, load_video

# Prompt tokens are evaluated in batches of this many, so a progress bar moves during long prompts.
PROGRESS_BATCH = 512

# a pooled conversation is reused for a call that shares at least this fraction of what it holds
# (llama-server's --slot-prompt-similarity, 0.5 by default); otherwise a new one starts while the
# pool has room
SIMILARITY = 0.5

# the keyword arguments of chat() that are sampling settings
SAMPLING_OPTIONS = frozenset(SamplingSettings.__dataclass_fields__)

Progress = Callable[[int, int], None]  # (cells evaluated so far, cells to evaluate)


@dataclass(frozen=True)
class _Element:
    """One element of a prompt plan: a text token, or an image (and the text mtmd puts around it)."""

    key: tuple  # ("t", token id) or ("i", pixel hash)
    n_cells: int
    image: Any = None  # the decoded RGB image


@dataclass
class _Cached:
    """An element the cache holds: its key, the session history length after it, and whether a
    later call may reuse it (prompt tokens and densely evaluated generated tokens)."""

    key: tuple
    end: int
    reusable: bool
    n_cells: int = 1


@dataclass(frozen=True)
class GazeOptions:
    """A call's gaze settings; None: the model's own."""

    gaze: bool
    keep_regions: int | None
    keep_ratio: float | None
    gather: bool

    def selection(self, defaults) -> dict:
        """keep_regions / keep_ratio / score_mode for GazeSession.configure, from the call's
        settings over the model's defaults (keep_regions > 0 takes precedence)."""
        if self.keep_regions:
            k, ratio = self.keep_regions, self.keep_ratio or defaults.keep_ratio
        elif self.keep_ratio:
            k, ratio = 0, self.keep_ratio
        else:
            k, ratio = defaults.keep_regions, defaults.keep_ratio
        return {"keep_regions": k, "keep_ratio": ratio, "score_mode": defaults.score_mode}


class Conversation:
    """A conversation that keeps its llama.cpp context (and its KV cache) between calls.

        conv = model.conversation()
        conv.chat([{"role": "user", "content": [{"type": "image", "image": "photo.jpg"},
                                                {"type": "text", "text": "Describe the image."}]}])
        # ... append the answer and a follow-up, call again: only the new turn is evaluated

    ``chat`` takes the same arguments as ``GazeModel.chat``; the messages are always the whole
    conversation (as in the OpenAI API), and the answer equals a cold evaluation of them.
    Memory: one llama.cpp context of ``n_ctx`` cells (see docs/RUNTIME.md, "Warm conversations").
    """

    def __init__(self, model, *, n_ctx: int | None = None, kv_type: str = "f16") -> None:
        self.model = model
        self.n_ctx = model.default_n_ctx() if not n_ctx else int(n_ctx)
        self.kv_type = kv_type
        self._session = None
        self._cached: list[_Cached] = []
        self.last_used = 0.0

    # --- what the cache holds ---------------------------------------------------------------

    @property
    def n_cached(self) -> int:
        """Cells the cache holds for this conversation."""
        return self._session.n_cells if self._session is not None else 0

    def memory_bytes(self) -> int:
        """Bytes of this conversation's KV cache (allocated for all n_ctx cells when it starts)."""
        return self.model.kv_cache_bytes(self.n_ctx, self.kv_type) if self._session is not None else 0

    def reset(self) -> None:
        """Forget what the cache holds (the context stays allocated)."""
        if self._session is not None:
            self._session.truncate(0)
        self._cached = []

    def close(self) -> None:
        """Free the llama.cpp context."""
        if self._session is not None:
            self._session.close()
            self._session = None
        self._cached = []

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- answering --------------------------------------------------------------------------

    def chat(self, messages_or_prompt, **options) -> ChatResult | Iterator[str]:
        """Answer the conversation; see ``GazeModel.chat``. Keeps the cache for the next call."""
        call = prepare_call(self.model, messages_or_prompt, options)
        if call.n_ctx and call.n_ctx != self.n_ctx:
            raise GazeEdgeError(f"this conversation has a context of {self.n_ctx}; n_ctx={call.n_ctx} needs a new one")
        plan = self.plan(call)
        run = self._locked_run(call, plan)
        return _deliver(run, call.stream)

    def _locked_run(self, call, plan):
        with self.model.lock:
            yield from self.run(call, plan)

    def plan(self, call: PreparedCall) -> list[_Element]:
        """The prompt of ``call`` as elements, checked against this conversation's context."""
        return make_plan(self.model, call, self.n_ctx)

    def match(self, plan: list[_Element]) -> int:
        """How many leading elements of ``plan`` the cache holds and may reuse."""
        n = 0
        for cached, element in zip(self._cached, plan, strict=False):
            if not (cached.reusable and cached.key == element.key):
                break
            n += 1
        return n

    def shared_cells(self, plan: list[_Element]) -> int:
        """Cache cells of the leading elements of ``plan`` this conversation may reuse."""
        return sum(c.n_cells for c in self._cached[: self.match(plan)])

    def run(self, call: PreparedCall, plan: list[_Element]):
        """Generator: evaluate what is new in ``plan``, then generate; yields text pieces, then
        the ChatResult. The caller holds the model's lock."""
        model = self.model
        self.last_used = time.monotonic()
        if self._session is None:
            self._session = model.session(gaze=call.gaze.gaze, n_ctx=self.n_ctx, kv_type=self.kv_type,
                                          trace=call.trace)
        s = self._session
        t0 = time.perf_counter()
        try:
            # keep at least the last element to evaluate: its logits choose the first token
            n_keep = min(self.match(plan), len(plan) - 1)
            s.truncate(self._cached[n_keep - 1].end if n_keep else 0)
            del self._cached[n_keep:]
            n_cached = s.n_cells
            s.configure(gaze=call.gaze.gaze, **call.gaze.selection(model.gaze_defaults()),
                        gather=call.gaze.gather, trace=call.trace)
            self._evaluate(plan[n_keep:], call.progress)
        except BaseException:
            self.reset()
            raise
        t1 = time.perf_counter()

        sampler = Sampler(model, call.sampling)
        matcher = StopMatcher(call.sampling.stop)
        gazing = call.gaze.gaze and s.n_regions > 0
        steps: list[ChatStep] = []
        tokens: list[int] = []
        shown = ""  # text emitted (after stop-string handling)
        decoded = ""  # detokenized text so far
        finish = "length"
        chose_it = None  # the selection whose logits picked the next token
        logits: list = []
        try:
            for _ in range(call.max_tokens):
                if call.cancel is not None and call.cancel():
                    finish = "cancelled"
                    break
                if call.logits:
                    logits.append(s.logits())
                tok = sampler.sample(s)
                if model.is_eog(tok):
                    finish = "stop"
                    break
                tokens.append(tok)
                steps.append(ChatStep(tok, model.detokenize([tok]), chose_it))
                text = model.detokenize(tokens)
                if not text.endswith("\ufffd"):  # a multi-byte character is complete
                    emit, stopped = matcher.feed(text[len(decoded):])
                    decoded = text
                    shown += emit
                    if emit:
                        yield emit
                    if stopped:
                        finish = "stop"
                        break
                if len(tokens) == call.max_tokens or s.n_cells + 1 > self.n_ctx:
                    break  # max_tokens, or the context is full: nothing will read this token's logits
                s.append(tok)
                self._cached.append(_Cached(("t", tok), len(s.history), not gazing))
                chose_it = s.trace() if call.trace else None
            if not matcher.stopped:
                tail = model.detokenize(tokens)[len(decoded):] + matcher.flush()
                shown += tail
                if tail:
                    yield tail
        finally:
            sampler.close()
        t2 = time.perf_counter()
        self.last_used = time.monotonic()
        yield ChatResult(text=shown, steps=steps, n_prompt_tokens=sum(e.n_cells for e in plan),
                         n_cached_tokens=n_cached, prompt_seconds=t1 - t0, generate_seconds=t2 - t1,
                         finish_reason=finish, images=list(s.images), logits=logits or None)

    def _evaluate(self, elements: Sequence[_Element], progress: Progress | None) -> None:
        s = self._session
        total = sum(e.n_cells for e in elements)
        done = 0
        if progress:
            progress(0, total)
        i = 0
        while i < len(elements):
            if elements[i].image is not None:
                s.add_image(elements[i].image)
                self._cached.append(_Cached(elements[i].key, len(s.history), True, elements[i].n_cells))
                done += elements[i].n_cells
                i += 1
            else:
                j = i
                while j < len(elements) and elements[j].image is None and j - i < PROGRESS_BATCH:
                    j += 1
                start = len(s.history)
                s.add_tokens([e.key[1] for e in elements[i:j]])
                self._cached += [_Cached(e.key, start + n + 1, True) for n, e in enumerate(elements[i:j])]
                done += j - i
                i = j
            if progress:
                progress(done, total)


class ConversationPool:
    """The recent conversations ``GazeModel.chat`` answers from, at most ``max_conversations``.

    A call goes to the conversation whose cache shares the longest prefix with it, if that prefix
    is at least half of what the conversation holds (as llama-server picks a slot); otherwise a
    new one starts while the pool has room, else the least recently used gives way. Each conversation holds one
    llama.cpp context (``GazeModel.kv_cache_bytes(n_ctx)`` of KV cache plus compute buffers);
    0 turns the reuse off: every call evaluates cold in a context freed afterwards. ``max_bytes``
    bounds the KV cache of all of them together (fewer conversations, at least one).
    """

    def __init__(self, model, max_conversations: int = 2, max_bytes: int | None = None) -> None:
        if max_conversations < 0:
            raise ValueError(f"max_conversations must be >= 0, got {max_conversations}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.model = model
        self.max_conversations = max_conversations
        self.max_bytes = max_bytes  # KV-cache bytes all conversations together may hold (None: no limit)
        self.conversations: list[Conversation] = []

    def _capacity(self, n_ctx: int) -> int:
        """Conversations of n_ctx cells the pool may hold: max_conversations, fewer under max_bytes
        (at least one: a call is always answered, cold if it must)."""
        if self.max_bytes is None:
            return self.max_conversations
        per = max(1, self.model.kv_cache_bytes(n_ctx))
        return max(1, min(self.max_conversations, self.max_bytes // per))

    def memory_bytes(self) -> int:
        return sum(c.memory_bytes() for c in self.conversations)

    def chat(self, messages_or_prompt, **options) -> ChatResult | Iterator[str]:
        call = prepare_call(self.model, messages_or_prompt, options)
        return _deliver(self.answer(call), call.stream)

    def answer(self, call: PreparedCall):
        """Generator for a call made with ``prepare_call``: the text pieces as they are decoded,
        then the ChatResult (what a server streams and then reports usage from). Holds the
        model's lock until it is exhausted or closed."""
        with self.model.lock:
            self._shrink()
            n_ctx = call.n_ctx or self.model.default_n_ctx()
            if self.max_conversations == 0:
                with Conversation(self.model, n_ctx=n_ctx) as conv:
                    yield from conv.run(call, conv.plan(call))
                return
            conv, plan = self._pick(call, n_ctx)
            yield from conv.run(call, plan)

    def _pick(self, call, n_ctx: int) -> tuple[Conversation, list[_Element]]:
        plan = make_plan(self.model, call, n_ctx)
        candidates = [c for c in self.conversations if c.n_ctx == n_ctx]
        best = max(candidates, key=lambda c: (c.match(plan), c.last_used), default=None)
        full = len(self.conversations) >= self._capacity(n_ctx)
        # as llama-server picks a slot: reuse a conversation when the call shares at least half of
        # what it holds (a shared system prompt alone is not worth cutting another conversation for)
        if best is not None and (full or best.shared_cells(plan) >= SIMILARITY * max(1, best.n_cached)):
            return best, plan
        while self.conversations and len(self.conversations) >= self._capacity(n_ctx):
            oldest = min(self.conversations, key=lambda c: c.last_used)
            self.conversations.remove(oldest)
            oldest.close()
        conv = Conversation(self.model, n_ctx=n_ctx)
        self.conversations.append(conv)
        return conv, plan

    def _shrink(self) -> None:
        def over() -> bool:
            if len(self.conversations) > self.max_conversations:
                return True
            return self.max_bytes is not None and len(self.conversations) > 1 and self.memory_bytes() > self.max_bytes

        while over():
            oldest = min(self.conversations, key=lambda c: c.last_used)
            self.conversations.remove(oldest)
            oldest.close()

    def close(self) -> None:
        for c in self.conversations:
            c.close()
        self.conversations = []


def make_plan(model, call: PreparedCall, n_ctx: int) -> list[_Element]:
    """The prompt of ``call`` as elements (text tokens, images), checked against ``n_ctx`` cells."""
    elements: list[_Element] = []
    for i, text in enumerate(call.pieces):
        if text:
            first = not elements
            elements += [_Element(("t", t), 1) for t in model.tokenize(text, add_special=first and model.add_bos)]
        if i < len(call.images):
            rgb = call.images[i]
            key = image_key(rgb)
            elements.append(_Element(("i", key, not elements), model.image_footprint(rgb, key=key)[0], rgb))
    need = sum(e.n_cells for e in elements) + 1  # room for at least one generated token
    if need > n_ctx:
        n_img = sum(e.n_cells for e in elements if e.image is not None)
        frames = call.n_video_frames
        what = f"{len(call.images)} image(s)" + (f", {frames} of them video frames" if frames else "")
        raise ContextOverflowError(
            f"the conversation needs {need} context cells ({what}: {n_img}, text: "
            f"{need - 1 - n_img}, +1 to answer) but the context holds {n_ctx}; use a larger context "
            f"(-c/--ctx-size, n_ctx=; the model was trained with {model.n_ctx_train}) or fewer images"
            + (" or frames (--max-frames, max_frames=)" if frames else "")
        )
    return elements


# --- one call's arguments -------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedCall:
    """A chat call with its arguments checked and its prompt rendered (before any compute)."""

    pieces: list[str]  # the rendered prompt, cut at its images
    images: list[Any]  # decoded RGB images, in order
    sampling: SamplingSettings
    gaze: GazeOptions
    max_tokens: int
    stream: bool
    trace: bool
    logits: bool
    n_ctx: int | None
    progress: Progress | None
    cancel: Callable[[], bool] | None
    n_video_frames: int = 0  # of images, those that are video frames


def prepare_call(model, messages_or_prompt, options: dict) -> PreparedCall:
    """Check a chat call's options, render its prompt and decode its images: every error in the
    input comes here, before the model computes anything."""
    options = dict(options)
    image = options.pop("image", None)
    images = list(options.pop("images", ()) or ())
    video = options.pop("video", None)
    fps = options.pop("fps", None)
    max_frames = options.pop("max_frames", None)
    max_tokens = options.pop("max_tokens", 256)
    stream = bool(options.pop("stream", False))
    trace = bool(options.pop("trace", False))
    want_logits = bool(options.pop("logits", False))
    n_ctx = options.pop("n_ctx", None)
    progress = options.pop("progress", None)
    cancel = options.pop("cancel", None)
    gaze = options.pop("gaze", None)
    keep_regions = options.pop("keep_regions", None)
    keep_ratio = options.pop("keep_ratio", None)
    gather = bool(options.pop("gather", False))
    unknown = sorted(set(options) - SAMPLING_OPTIONS)
    if unknown:
        raise TypeError(f"chat() got unexpected keyword argument(s): {', '.join(unknown)}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise GazeEdgeError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 0):
        raise GazeEdgeError(f"n_ctx must be an integer >= 0 (0: the model's training context), got {n_ctx!r}")
    if keep_regions is not None and (not isinstance(keep_regions, int) or keep_regions < 1):
        raise GazeEdgeError(f"keep_regions must be an integer >= 1, got {keep_regions!r}")
    if keep_ratio is not None and not (0.0 < float(keep_ratio) <= 1.0):
        raise GazeEdgeError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    sampling = SamplingSettings(**options)
    sampling.validate(model)
    is_gaze_model = model.gaze_defaults().region_h is not None
    use_gaze = is_gaze_model if gaze is None else bool(gaze)
    all_images = ([image] if image is not None else []) + images
    messages = normalize_messages(messages_or_prompt, all_images, [video] if video is not None else ())
    prompt, sources = render_prompt(model, messages)
    pieces = split_prompt(prompt, len(sources))
    if sources and not model.has_vision:
        raise GazeEdgeError("this model has no vision projector (mmproj): it cannot take images")
    decoded = [load_video(s.video, fps=fps, max_frames=max_frames) if isinstance(s, VideoPart) else load_image(s)
               for s in sources]
    pieces, decoded_images = expand_videos(pieces, decoded)  # each frame an image, after its label
    return PreparedCall(
        pieces=pieces, images=decoded_images, sampling=sampling,
        gaze=GazeOptions(use_gaze, keep_regions, float(keep_ratio) if keep_ratio is not None else None, gather),
        max_tokens=max_tokens, stream=stream, trace=trace, logits=want_logits,
        n_ctx=(model.n_ctx_train if n_ctx == 0 else n_ctx), progress=progress, cancel=cancel,
        n_video_frames=sum(len(d) for d in decoded if isinstance(d, Video)),
    )


def _deliver(run, stream: bool):
    """A streaming iterator of text pieces, or the ChatResult."""
    if stream:
        return (piece for piece in run if isinstance(piece, str))
    for item in run:
        if isinstance(item, ChatResult):
            return item
    raise AssertionError("unreachable: the generation loop always ends with a result")
