"""Chat on a GazeModel: the model's own chat template, images in place, sampling, traces.

``GazeModel.chat`` calls :func:`chat`. Each call evaluates the whole conversation in a fresh
session (a llama.cpp context of its own), so calls are independent; a conversation is continued
by passing the growing message list again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gaze_edge.errors import ContextOverflowError, GazeEdgeError
from gaze_edge.images import load_image

# How chat templates spell "an image goes here", most specific first. The rendered prompt is
# split at these and each image is evaluated by mtmd, which adds any begin/end-of-image tokens.
IMAGE_PLACEHOLDERS = ("<|vision_start|><|image_pad|><|vision_end|>", "<image>")


@dataclass
class ChatStep:
    """One generated token: its id, its text, and the gaze selection that chose it.

    trace is the selection made while evaluating the previous generated token, whose logits
    picked this one (GAZE_SPEC.md: the first token comes from the dense prompt, so its trace is
    None; so is every trace of a dense run).
    """

    token: int
    text: str
    trace: Any = None  # gaze_edge.runtime.session.StepTrace


@dataclass
class ChatResult:
    """What ``chat`` returns (with stream=False)."""

    text: str
    steps: list[ChatStep]
    n_prompt_tokens: int
    prompt_seconds: float
    generate_seconds: float
    finish_reason: str  # "stop" (end of generation token) or "length" (max_tokens)
    images: list[Any] = field(default_factory=list)  # gaze_edge.runtime.session.SessionImage

    @property
    def n_generated_tokens(self) -> int:
        return len(self.steps)

    @property
    def visual_kv_fraction(self) -> float | None:
        """Mean over gazing steps of the fraction of visual KV entries used (GAZE_SPEC.md,
        Accounting); None when no step gazed (dense, or no image)."""
        fractions = [s.trace.visual_kv_fraction() for s in self.steps if s.trace is not None]
        return float(np.mean(fractions)) if fractions else None

    def to_dict(self) -> dict:
        gen = self.generate_seconds
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.n_prompt_tokens,
            "generated_tokens": self.n_generated_tokens,
            "prompt_seconds": round(self.prompt_seconds, 4),
            "generate_seconds": round(gen, 4),
            "ms_per_token": round(1000 * gen / self.n_generated_tokens, 3) if self.steps else None,
            "visual_kv_fraction": self.visual_kv_fraction,
        }


def normalize_messages(messages_or_prompt: str | Sequence[dict], images: Sequence[Any]) -> list[dict]:
    """Messages in the HF form [{"role", "content": str | [{"type": "text"|"image", ...}]}].

    A plain prompt becomes one user message. ``images`` are put before the text of the last user
    message (the layout LLaVA-style models are trained on).
    """
    if isinstance(messages_or_prompt, str):
        messages = [{"role": "user", "content": messages_or_prompt}]
    else:
        messages = [dict(m) for m in messages_or_prompt]
    if not messages:
        raise GazeEdgeError("no messages to answer")
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise GazeEdgeError(f"unknown message role {m.get('role')!r}")
    if images:
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last is None:
            raise GazeEdgeError("images need a user message to go with")
        content = messages[last]["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        messages[last] = {**messages[last],
                          "content": [{"type": "image", "image": im} for im in images] + items}
    return messages


def _split_prompt(prompt: str, n_images: int) -> list[str]:
    """The rendered prompt cut at its image placeholders: n_images + 1 text pieces."""
    for placeholder in IMAGE_PLACEHOLDERS:
        if prompt.count(placeholder) == n_images and (n_images == 0 or placeholder in prompt):
            return prompt.split(placeholder) if n_images else [prompt]
    raise GazeEdgeError(
        f"the chat template placed no recognisable image placeholder for {n_images} image(s) "
        f"(looked for {', '.join(IMAGE_PLACEHOLDERS)})"
    )


def render_prompt(model, messages: list[dict]) -> tuple[str, list[Any]]:
    """The model's chat template applied to messages; returns (prompt, images in order)."""
    import jinja2  # a dependency of llama-cpp-python

    template = model.meta("tokenizer.chat_template")
    if not template:
        raise GazeEdgeError("the model has no chat template (tokenizer.chat_template in its GGUF)")
    images = [item["image"] for m in messages if not isinstance(m["content"], str)
              for item in m["content"] if item.get("type") == "image"]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    prompt = env.from_string(template).render(
        messages=messages, add_generation_prompt=True,
        bos_token=_special_text(model, "bos"), eos_token=_special_text(model, "eos"),
    )
    return prompt, images


def _special_text(model, which: str) -> str:
    """Text of the vocabulary's BOS or EOS token ("" when it has none)."""
    from llama_cpp import llama_cpp

    tok = {"bos": llama_cpp.llama_vocab_bos, "eos": llama_cpp.llama_vocab_eos}[which](model._vocab)
    return model.detokenize([tok], special=True) if tok >= 0 else ""


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling of softmax(logits / temperature)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    q = p[keep] / p[keep].sum()
    return int(keep[rng.choice(len(keep), p=q)])


def chat(
    model,
    messages_or_prompt: str | Sequence[dict],
    *,
    image: str | os.PathLike | Any | None = None,
    images: Sequence[Any] = (),
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int | None = None,
    stream: bool = False,
    gaze: bool | None = None,
    top_k: int | None = None,
    keep_ratio: float | None = None,
    gather: bool = False,
    trace: bool = False,
    n_ctx: int | None = None,
) -> ChatResult | Iterator[str]:
    """Answer a prompt or a conversation; see ``GazeModel.chat``."""
    n_ctx = n_ctx or min(4096, max(512, model.n_ctx_train))
    if max_tokens < 1:
        raise GazeEdgeError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0 or not (0 < top_p <= 1):
        raise GazeEdgeError("temperature must be >= 0 and top_p in (0, 1]")
    all_images = ([image] if image is not None else []) + list(images)
    messages = normalize_messages(messages_or_prompt, all_images)
    run = _run(model, messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
               gaze=gaze, top_k=top_k, keep_ratio=keep_ratio, gather=gather, trace=trace, n_ctx=n_ctx)
    if stream:
        return (piece for piece in run if isinstance(piece, str))
    for item in run:
        if isinstance(item, ChatResult):
            return item
    raise AssertionError("unreachable: the generation loop always ends with a result")


def _run(model, messages, *, max_tokens, temperature, top_p, seed, gaze, top_k, keep_ratio, gather, trace, n_ctx):
    """Generator: text pieces as they are decoded, then the ChatResult."""
    prompt, images = render_prompt(model, messages)
    pieces = _split_prompt(prompt, len(images))
    decoded = [load_image(im) for im in images]  # all errors before any compute
    is_gaze_model = model.gaze_defaults().region_h is not None
    use_gaze = is_gaze_model if gaze is None else gaze
    rng = np.random.default_rng(seed)
    with model.lock, model.session(gaze=use_gaze, top_k=top_k, keep_ratio=keep_ratio, gather=gather, trace=trace,
                                   n_ctx=n_ctx) as s:
        t0 = time.perf_counter()
        for i, text in enumerate(pieces):
            if text:
                _check_room(s, len(model.tokenize(text)), n_ctx)
                s.add_text(text)
            if i < len(decoded):
                s.add_image(decoded[i])
        n_prompt = s.n_past
        logits = s.logits()
        t1 = time.perf_counter()
        steps: list[ChatStep] = []
        tokens: list[int] = []
        emitted = ""
        finish = "length"
        chose_it = None  # the selection whose logits picked the next token
        for _ in range(max_tokens):
            tok = sample(logits, temperature, top_p, rng)
            if model.is_eog(tok):
                finish = "stop"
                break
            if s.n_past + 1 > n_ctx:
                raise ContextOverflowError(f"the answer reached the context size ({n_ctx} tokens)")
            tokens.append(tok)
            text = model.detokenize(tokens)
            piece = text[len(emitted):] if not text.endswith("\ufffd") else ""
            emitted += piece
            if piece:
                yield piece
            steps.append(ChatStep(tok, model.detokenize([tok]), chose_it))
            logits = s.append(tok)
            chose_it = s.trace() if trace else None
        t2 = time.perf_counter()
        final = model.detokenize(tokens)
        if final != emitted and final.startswith(emitted):
            yield final[len(emitted):]
        yield ChatResult(text=final, steps=steps, n_prompt_tokens=n_prompt, prompt_seconds=t1 - t0,
                         generate_seconds=t2 - t1, finish_reason=finish, images=list(s.images))


def _check_room(session, n_new: int, n_ctx: int) -> None:
    if session.n_past + n_new >= n_ctx:
        raise ContextOverflowError(
            f"the conversation does not fit the context: {session.n_past + n_new} tokens > {n_ctx - 1}"
        )
