"""Choosing the next token with llama.cpp's own samplers, and cutting the answer at stop strings.

    settings = SamplingSettings(temperature=0.8, seed=7, json_schema=schema, stop=("\\n\\n",))
    with Sampler(model, settings) as sampler:       # model: a GazeModel
        tok = sampler.sample(session._ctx)          # reads the logits of the last output, accepts tok
    stops = StopMatcher(settings.stop)
    emit, stopped = stops.feed(piece)               # the text that can be shown now

``Sampler`` chains llama.cpp's samplers in the order llama.cpp's ``common_sampler`` (llama-cli,
llama-server) uses: penalties, top-k, typical, top-p, min-p, temperature, then a random draw
(``dist``, seeded), or ``greedy`` at temperature 0. A grammar (GBNF, a JSON schema turned into
GBNF, or "any JSON object") is a separate llama.cpp sampler used as ``common_sampler_sample``
uses it: the chain picks a token; if the grammar forbids it, the grammar masks the candidates
and the chain picks again. Nothing of the sampling itself is computed in Python.

llama_cpp is imported only when a sampler is made or a grammar is checked, so settings and
``StopMatcher`` work without the runtime.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gaze_edge.errors import GazeEdgeError

GRAMMAR_ROOT = "root"
_MAX_SEED = 0xFFFFFFFF  # llama.cpp seeds are uint32; LLAMA_DEFAULT_SEED (this value) means "random"
_MIN_KEEP = 0  # common_params_sampling.min_keep: llama.cpp's filters always keep at least one token
# struct llama_token_data { llama_token id; float logit; float p; }
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


def _llama_cpp():
    from llama_cpp import llama_cpp

    return llama_cpp


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen (the names and defaults of llama.cpp / llama-server).

    temperature: 0 picks the most likely token (greedy); higher spreads the choice.
    top_k (0: off), top_p (1: off), min_p (0: off), typical_p (1: off): which tokens may be drawn.
    repeat_penalty (1: off), presence_penalty / frequency_penalty (0: off): over the last
      repeat_last_n tokens (0: off) the sampler was given.
    seed: the random draw's seed (None: a random one, llama.cpp's LLAMA_DEFAULT_SEED).
    grammar: GBNF text the answer must follow (root rule ``root``); json_schema: a JSON schema
      (a dict or JSON text) the answer must satisfy; json_object: the answer is any JSON object.
      At most one of the three.
    stop: strings that end the answer (not included in it).
    """

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    grammar: str | None = None
    json_schema: dict | str | None = None
    json_object: bool = False
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # stop="\n" or a list work too (as in the OpenAI API); keep a tuple
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, model=None) -> None:
        """Raise GazeEdgeError (one line) for a setting llama.cpp cannot use.

        The grammar in effect is parsed by llama.cpp with ``model``'s vocabulary when given;
        without a model, grammars naming tokens (``<...>``) are checked when a Sampler is made.
        """
        self._check_values()
        text = self.grammar_text()
        if text is not None:
            vocab = model._vocab if model is not None else None
            try:
                smpl = _init_grammar(vocab, text)
            except GazeEdgeError as e:
                if vocab is None and "no vocab to parse token" in str(e):
                    return  # it names tokens: Sampler checks it with the model's vocabulary
                raise
            _llama_cpp().llama_sampler_free(smpl)

    def _check_values(self) -> None:
        """Everything validate() checks but the grammar's syntax."""
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, high=1.0)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        _check_number("typical_p", self.typical_p, low=0.0, high=1.0)
        _check_int("top_k", self.top_k, low=0)
        _check_int("repeat_last_n", self.repeat_last_n, low=0)
        _check_number("repeat_penalty", self.repeat_penalty)
        if self.repeat_penalty <= 0:
            raise GazeEdgeError(f"repeat_penalty must be > 0 (1 = off), got {self.repeat_penalty}")
        _check_number("presence_penalty", self.presence_penalty)
        _check_number("frequency_penalty", self.frequency_penalty)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=_MAX_SEED)
        given = [name for name, value in (("grammar", self.grammar is not None),
                                          ("json_schema", self.json_schema is not None),
                                          ("json_object", bool(self.json_object))) if value]
        if len(given) > 1:
            raise GazeEdgeError(f"give at most one of grammar, json_schema and json_object (got {', '.join(given)})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise GazeEdgeError(f"stop strings must be non-empty text, got {s!r}")

    def grammar_text(self) -> str | None:
        """The GBNF in effect: ``grammar``, ``json_schema`` converted by llama-cpp-python's
        converter, llama-cpp-python's JSON grammar for ``json_object``, or None."""
        if self.grammar is not None:
            if not isinstance(self.grammar, str) or not self.grammar.strip():
                raise GazeEdgeError("grammar must be non-empty GBNF text")
            return self.grammar
        if self.json_schema is not None:
            return schema_to_gbnf(self.json_schema)
        if self.json_object:
            from llama_cpp.llama_grammar import JSON_GBNF

            return JSON_GBNF
        return None


def schema_to_gbnf(schema: dict | str) -> str:
    """A JSON schema (a dict or JSON text) as GBNF, by llama-cpp-python's converter
    (``llama_cpp.llama_grammar.json_schema_to_gbnf``, a port of llama.cpp's)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if isinstance(schema, str):
        try:
            json.loads(schema)
        except json.JSONDecodeError as e:
            raise GazeEdgeError(f"json_schema is not valid JSON: {e}") from e
        text = schema
    elif isinstance(schema, dict):
        text = json.dumps(schema)
    else:
        raise GazeEdgeError(f"json_schema must be a dict or JSON text, not {type(schema).__name__}")
    try:
        return json_schema_to_gbnf(text)
    except Exception as e:  # the converter asserts / raises ValueError, KeyError, ... on schemas it cannot take
        raise GazeEdgeError(f"json_schema cannot be turned into a grammar: {_one_line(str(e) or type(e).__name__)}") from e


def _check_number(name: str, value, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise GazeEdgeError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if low is not None and high is not None else f">= {low}"
        raise GazeEdgeError(f"{name} must be {bounds}, got {value}")


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GazeEdgeError(f"{name} must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise GazeEdgeError(f"{name} must be {bounds}, got {value}")


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --- grammar parsing ---------------------------------------------------------------------------

_QUIET_LOCK = threading.Lock()
_log = {"callback": None, "messages": []}  # the llama.cpp log messages caught by _calling_quietly


def _log_collector():
    """A llama.cpp log callback that keeps the messages (made once, kept alive: C holds it)."""
    if _log["callback"] is None:
        llama_cpp = _llama_cpp()

        @llama_cpp.llama_log_callback
        def collect(level, text, user_data):
            _log["messages"].append((level, text))

        _log["callback"] = collect
    return _log["callback"]


def _calling_quietly(fn, *args):
    """fn(*args) and what llama.cpp said meanwhile: its grammar parser prints its errors (and the
    whole grammar) to the C stderr, the rest goes to llama.cpp's log. Both are caught so that a bad
    grammar gives one line; a caller that succeeds passes them on with ``_pass_on``."""
    llama_cpp = _llama_cpp()
    with _QUIET_LOCK, tempfile.TemporaryFile() as c_err:
        prev_cb, prev_ud = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_ud))
        _log["messages"] = []
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(c_err.fileno(), 2)
            llama_cpp.llama_log_set(_log_collector(), None)
            result = fn(*args)
        finally:
            llama_cpp.llama_log_set(prev_cb, prev_ud)
            os.dup2(saved, 2)
            os.close(saved)
        c_err.seek(0)
        said = _Said(c_err.read().decode("utf-8", errors="replace"), _log["messages"], prev_cb, prev_ud)
        _log["messages"] = []
        return result, said


@dataclass
class _Said:
    """What llama.cpp wrote during a call: to stderr, and to its log (to be passed on)."""

    stderr: str
    log: list
    callback: object
    user_data: object

    def text(self) -> str:
        return self.stderr + "".join(t.decode("utf-8", errors="replace") for _, t in self.log)

    def pass_on(self) -> None:
        if self.stderr:
            sys.stderr.write(self.stderr)
        if self.callback:
            for level, t in self.log:
                self.callback(level, t, self.user_data)


def _init_grammar(vocab, text: str):
    """llama.cpp's grammar sampler for GBNF ``text`` (root ``root``); GazeEdgeError with
    llama.cpp's reason when it does not parse."""
    llama_cpp = _llama_cpp()
    smpl, said = _calling_quietly(llama_cpp.llama_sampler_init_grammar, vocab, text.encode("utf-8"),
                                  GRAMMAR_ROOT.encode())
    if smpl:
        said.pass_on()
        return smpl
    raise GazeEdgeError(f"the grammar does not parse: {_grammar_error(said.text())}")


def _grammar_error(printed: str) -> str:
    """llama.cpp's reason in what it printed (the parser's exception, else its log line)."""
    marker = "error parsing grammar: "
    for line in printed.splitlines():
        if marker in line:
            reason = _one_line(line.split(marker, 1)[1])
            return reason + " the end" if reason.endswith(" at") else reason
    lines = [ln.strip() for ln in printed.splitlines() if ln.strip() and ln.strip() != "failed to parse grammar"]
    return _one_line(lines[0]) if lines else "llama.cpp refused it"


# --- the sampler -------------------------------------------------------------------------------


class Sampler:
    """llama.cpp's sampler chain for ``settings`` on ``model``'s vocabulary (a GazeModel).

    ``sample(ctx)`` picks a token from the logits of a llama_context's output and accepts it (the
    penalties remember it, the grammar advances); ``accept(token)`` tells the sampler of a token
    it did not pick. One sampler follows one answer; not thread-safe. Free it with ``close()``
    (or ``with``).
    """

    def __init__(self, model, settings: SamplingSettings | None = None) -> None:
        self.settings = settings = settings or SamplingSettings()
        self._chain = None
        self._grammar = None
        settings._check_values()  # the grammar is parsed below, with the model's vocabulary
        llama_cpp = self._llama = _llama_cpp()
        self._vocab = model._vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        try:
            text = settings.grammar_text()
            if text is not None:
                self._grammar = _init_grammar(self._vocab, text)
            params = llama_cpp.llama_sampler_chain_default_params()
            params.no_perf = True
            self._chain = llama_cpp.llama_sampler_chain_init(params)
            if not self._chain:
                raise GazeEdgeError("llama.cpp could not make a sampler chain")
            for name, smpl in self._samplers():
                if not smpl:
                    raise GazeEdgeError(f"llama.cpp could not make the {name} sampler")
                llama_cpp.llama_sampler_chain_add(self._chain, smpl)  # the chain owns it now
        except BaseException:
            self.close()
            raise
        # with a grammar, the candidates are ours (llama_token_data {id, logit, p} per token, as
        # common_sampler's set_logits fills them) and a one-token array checks a choice
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._candidates = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
        self._one = llama_cpp.llama_token_data()

    def _samplers(self):
        """(name, llama_sampler *) in common_sampler's order; each made only when asked for, so
        that the chain owns every sampler made before a failure."""
        llama_cpp, s = self._llama, self.settings
        n_suppress = ctypes.c_int32(0)
        suppress = llama_cpp.llama_vocab_get_suppress_tokens(self._vocab, ctypes.byref(n_suppress))
        if suppress and n_suppress.value > 0:  # tokens the model never emits (tokenizer.ggml.suppress_tokens)
            biases = (llama_cpp.llama_logit_bias * n_suppress.value)(
                *[llama_cpp.llama_logit_bias(suppress[i], -math.inf) for i in range(n_suppress.value)]
            )
            yield "logit bias", llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, n_suppress.value, biases)
        yield "penalties", llama_cpp.llama_sampler_init_penalties(
            self.n_vocab, s.repeat_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
        )
        if s.greedy:  # the filters and the temperature keep the most likely token: greedy is the same
            yield "greedy", llama_cpp.llama_sampler_init_greedy()
            return
        yield "top-k", llama_cpp.llama_sampler_init_top_k(s.top_k)
        yield "typical", llama_cpp.llama_sampler_init_typical(s.typical_p, _MIN_KEEP)
        yield "top-p", llama_cpp.llama_sampler_init_top_p(s.top_p, _MIN_KEEP)
        yield "min-p", llama_cpp.llama_sampler_init_min_p(s.min_p, _MIN_KEEP)
        yield "temperature", llama_cpp.llama_sampler_init_temp(s.temperature)
        seed = llama_cpp.LLAMA_DEFAULT_SEED if s.seed is None else s.seed
        yield "dist", llama_cpp.llama_sampler_init_dist(seed)

    @property
    def seed(self) -> int:
        """The seed of the random draw (the one llama.cpp chose when settings.seed is None)."""
        self._check_open()
        return int(self._llama.llama_sampler_get_seed(self._chain))

    @property
    def closed(self) -> bool:
        return not self._chain

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the sampler is closed")

    # --- sampling ----------------------------------------------------------------------------

    def sample(self, ctx, idx: int = -1) -> int:
        """The token chosen from the logits of output ``idx`` of llama_context ``ctx`` (-1: the
        last output), accepted by the sampler (see ``accept``). ctx: a llama_context pointer, or
        a GazeSession (its context)."""
        self._check_open()
        ctx = getattr(ctx, "_ctx", ctx)
        llama_cpp = self._llama
        logits = llama_cpp.llama_get_logits_ith(ctx, idx)
        if not logits:
            raise GazeEdgeError(f"the context has no logits for output {idx} (evaluate text first)")
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, idx))
        # common_sampler_sample: the chain picks; only if the grammar forbids that token, the
        # grammar masks all candidates and the chain picks again
        token = self._pick(logits, with_grammar=False)
        if not self._allowed(token):
            token = self._pick(logits, with_grammar=True)
            if not self._allowed(token):
                raise GazeEdgeError("the grammar allows no token the sampler would pick here")
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def _pick(self, logits, with_grammar: bool) -> int:
        """The chain's choice among all tokens (common_sampler's set_logits + apply)."""
        llama_cpp = self._llama
        cand = self._candidates  # the samplers sort and cut it in place: refill all of it
        cand["id"] = self._ids
        cand["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        cand["p"] = 0.0
        data = cand.ctypes.data_as(llama_cpp.llama_token_data_p)
        cur = llama_cpp.llama_token_data_array(data, self.n_vocab, -1, False)
        if with_grammar:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(cur))
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            raise GazeEdgeError("llama.cpp's sampler chain selected no token")
        return int(cur.data[cur.selected].id)

    def _allowed(self, token: int) -> bool:
        """Whether the grammar, in its current state, allows ``token`` next."""
        llama_cpp = self._llama
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        one = llama_cpp.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(one))
        return self._one.logit != -math.inf

    def accept(self, token: int, *, generated: bool = True) -> None:
        """Tell the sampler of a token it did not pick: the penalties count it; when
        ``generated``, the grammar advances over it too (prompt tokens: generated=False, as
        common_sampler_accept does). GazeEdgeError for a token the grammar does not allow."""
        self._check_open()
        token = int(token)
        if not 0 <= token < self.n_vocab:
            raise GazeEdgeError(f"token {token} is not in the vocabulary (0..{self.n_vocab - 1})")
        if self._grammar is not None and generated:
            if not self._allowed(token):  # llama.cpp aborts the process on a token its grammar refuses
                raise GazeEdgeError(f"token {token} is not allowed by the grammar here")
            self._llama.llama_sampler_accept(self._grammar, token)
        self._llama.llama_sampler_accept(self._chain, token)

    def reset(self) -> None:
        """Back to a fresh answer: no remembered tokens, the grammar at its start, the seeded
        draw from its start (a new random seed when settings.seed is None)."""
        self._check_open()
        self._llama.llama_sampler_reset(self._chain)
        if self._grammar is not None:
            self._llama.llama_sampler_reset(self._grammar)

    # --- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_grammar", None):
            self._llama.llama_sampler_free(self._grammar)
            self._grammar = None
        if getattr(self, "_chain", None):
            self._llama.llama_sampler_free(self._chain)  # and the samplers it owns
            self._chain = None

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


# --- stop strings ------------------------------------------------------------------------------


class StopMatcher:
    """Cuts streamed text at the first stop string, as llama-server and the OpenAI API do.

    ``feed(piece)`` returns (text that can be shown now, whether a stop string completed). Text
    that could still turn out to be the start of a stop string is held back; once a stop string
    is complete, the text before it is returned and everything from it on is dropped.
    ``flush()`` returns the held-back text when the answer ends without a stop.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise GazeEdgeError(f"stop strings must be non-empty text, got {s!r}")
        self.stop = stop
        self.stopped = False
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)], True
        keep = self._partial_stop(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        for n in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def flush(self) -> str:
        """The held-back text (the answer ended without completing a stop string)."""
        held, self._held = self._held, ""
        return held
