"""Chat on a GazeModel: messages, the model's own chat template, images in place, results.

``GazeModel.chat`` calls :func:`chat`, which answers from the model's pool of warm conversations
(gaze_edge.conversation): a conversation is continued by passing the growing message list again,
and only what is new since the last call is evaluated.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gaze_edge.errors import GazeEdgeError

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
    n_prompt_tokens: int  # context cells of the whole prompt (an image counts its grid and context tokens)
    prompt_seconds: float
    generate_seconds: float
    finish_reason: str  # "stop" (end of generation, a stop string), "length" (max_tokens, context full), "cancelled"
    images: list[Any] = field(default_factory=list)  # gaze_edge.runtime.session.SessionImage
    n_cached_tokens: int = 0  # of n_prompt_tokens, those reused from the cache (not evaluated)
    logits: list[np.ndarray] | None = None  # with logits=True: per sampled token, the logits it came from

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
            "cached_tokens": self.n_cached_tokens,
            "generated_tokens": self.n_generated_tokens,
            "prompt_seconds": round(self.prompt_seconds, 4),
            "generate_seconds": round(gen, 4),
            "ms_per_token": round(1000 * gen / self.n_generated_tokens, 3) if self.steps else None,
            "visual_kv_fraction": self.visual_kv_fraction,
        }


def normalize_messages(messages_or_prompt: str | Sequence[dict], images: Sequence[Any],
                       videos: Sequence[Any] = ()) -> list[dict]:
    """Messages in the HF form [{"role", "content": str | [{"type": "text"|"image"|"video", ...}]}].

    A plain prompt becomes one user message. ``images``, then ``videos``, are put before the text
    of the last user message (the layout LLaVA-style models are trained on).
    """
    if isinstance(messages_or_prompt, str):
        messages = [{"role": "user", "content": messages_or_prompt}]
    else:
        messages = [dict(m) if isinstance(m, dict) else m for m in messages_or_prompt]
    if not messages:
        raise GazeEdgeError("no messages to answer")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise GazeEdgeError(f"message {i}: unknown role {role!r} (system, user or assistant)")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            # as a text part: templates that read only lists of parts (llava-hf's) drop plain strings
            messages[i] = {**m, "content": [{"type": "text", "text": content}]}
        elif isinstance(content, list | tuple):
            messages[i] = {**m, "content": [_content_item(i, item) for item in content]}
        else:
            raise GazeEdgeError(f"message {i}: content must be text or a list of parts, not {type(content).__name__}")
    if images or videos:
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last is None:
            raise GazeEdgeError(f"{'images need' if images else 'a video needs'} a user message to go with")
        media = [{"type": "image", "image": im} for im in images] + [{"type": "video", "video": v} for v in videos]
        messages[last] = {**messages[last], "content": media + messages[last]["content"]}
    return messages


def _content_item(i: int, item) -> dict:
    """One content part in the HF form: {"type": "text", "text"}, {"type": "image", "image"} or
    {"type": "video", "video"}. Also takes OpenAI's {"type": "image_url", "image_url": {"url"}} and
    {"type": "image" | "video", "url" | "path"}; an image may be anything
    gaze_edge.images.load_image takes, a video anything gaze_edge.video.load_video takes."""
    if isinstance(item, str):
        return {"type": "text", "text": item}
    if not isinstance(item, dict):
        raise GazeEdgeError(f"message {i}: a content part must be an object, not {type(item).__name__}")
    kind = item.get("type")
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise GazeEdgeError(f"message {i}: a text part needs a 'text' string")
        return item
    if kind == "image_url":
        url = item.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not url:
            raise GazeEdgeError(f"message {i}: an image_url part needs image_url.url")
        return {"type": "image", "image": url}
    if kind == "image":
        source = next((item[k] for k in ("image", "url", "path") if item.get(k) is not None), None)
        if source is None:
            raise GazeEdgeError(f"message {i}: an image part needs 'image', 'url' or 'path'")
        return {"type": "image", "image": source}
    if kind == "video":
        source = next((item[k] for k in ("video", "url", "path") if item.get(k) is not None), None)
        if source is None:
            raise GazeEdgeError(f"message {i}: a video part needs 'video', 'url' or 'path'")
        return {"type": "video", "video": source}
    raise GazeEdgeError(f"message {i}: unknown content part type {kind!r} (text, image, image_url or video)")


def split_prompt(prompt: str, n_images: int) -> list[str]:
    """The rendered prompt cut at its image placeholders: n_images + 1 text pieces."""
    for placeholder in IMAGE_PLACEHOLDERS:
        if prompt.count(placeholder) == n_images and (n_images == 0 or placeholder in prompt):
            return prompt.split(placeholder) if n_images else [prompt]
    raise GazeEdgeError(
        f"the chat template placed no recognisable image placeholder for {n_images} image(s) "
        f"(looked for {', '.join(IMAGE_PLACEHOLDERS)})"
    )


def render_prompt(model, messages: list[dict]) -> tuple[str, list[Any]]:
    """The model's chat template applied to messages, as transformers renders it (a model without
    a template gets its family's usual one, with a warning once); returns (prompt, images in order).

    A video part is rendered as one image (its frames are fed as separate images, which the
    pinned mtmd can do for every family; ``gaze_edge.video.expand_videos`` then lays its frames
    out, each with its label, at that placeholder) and comes back as a ``VideoPart``.
    """
    from gaze_edge.templates import render_chat
    from gaze_edge.video import VideoPart

    messages = [_videos_as_images(m, VideoPart) for m in messages]
    images = [item["image"] for m in messages if not isinstance(m["content"], str)
              for item in m["content"] if item.get("type") == "image"]
    prompt, warning = render_chat(
        model.meta("tokenizer.chat_template"), messages, arch=model.arch,
        bos_token=_special_text(model, "bos"), eos_token=_special_text(model, "eos"),
    )
    if warning and not getattr(model, "_warned_template", False):
        model._warned_template = True
        warnings.warn(warning, TemplateWarning, stacklevel=3)
    return prompt, images


def _videos_as_images(message: dict, wrap) -> dict:
    content = message.get("content")
    if isinstance(content, str) or not any(item.get("type") == "video" for item in content):
        return message
    return {**message, "content": [{"type": "image", "image": wrap(item["video"])} if item.get("type") == "video"
                                   else item for item in content]}


class TemplateWarning(UserWarning):
    """The model has no chat template of its own: a family default is used."""


def _special_text(model, which: str) -> str:
    """Text of the vocabulary's BOS or EOS token ("" when it has none)."""
    from llama_cpp import llama_cpp

    tok = {"bos": llama_cpp.llama_vocab_bos, "eos": llama_cpp.llama_vocab_eos}[which](model._vocab)
    return model.detokenize([tok], special=True) if tok >= 0 else ""


def chat(model, messages_or_prompt: str | Sequence[dict], **options) -> ChatResult | Iterator[str]:
    """Answer a prompt or a conversation; see ``GazeModel.chat``."""
    return model.conversations.chat(messages_or_prompt, **options)
