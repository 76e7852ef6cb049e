"""Chat templates rendered exactly as Hugging Face transformers renders them.

A converted model carries its checkpoint's Jinja chat template (``tokenizer.chat_template`` in the
GGUF). Those templates are written for transformers' environment, not plain Jinja: llava-hf's
LLaVA-1.5 template uses transformers' ``{% generation %}`` tag, others call ``raise_exception``
or ``strftime_now``, pass arguments to ``tojson`` or ``break`` out of loops. This module mirrors
that environment (transformers 5, ``utils/chat_template_utils.py``: ``_compile_jinja_template``
and ``render_jinja_template``) in a few lines of jinja2, so the chat path needs neither
transformers nor torch. jinja2 comes with llama-cpp-python.

A model without a template gets its family's usual one (``FAMILY_TEMPLATES``) and a warning, as
llama.cpp falls back to a built-in template.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

from gaze_edge.errors import GazeEdgeError

# --- the families' usual templates ------------------------------------------------------------
# Published with the checkpoints (tests/data/chat_templates/README.md says where each is from).

# llava-hf/llava-1.5-7b-hf, chat_template.json
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen/Qwen2.5-VL-7B-Instruct, chat_template.json (Qwen2-VL-7B-Instruct's first release is the same)
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or "
    "'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FAMILY_TEMPLATES: dict[str, str] = {"LLaVA-1.5": LLAVA_15_TEMPLATE, "Qwen2-VL": QWEN2_VL_TEMPLATE}


def family_template(arch: str) -> str:
    """Name of the usual template for GGUF text architecture ``arch`` (a key of FAMILY_TEMPLATES).

    Qwen2-VL and Qwen2.5-VL share llama.cpp's ``qwen2vl`` text architecture; every other text
    model gaze-edge converts (Llama or Qwen2 inside LLaVA) is a LLaVA-1.5.
    """
    plain = re.sub(r"[^a-z0-9]", "", (arch or "").lower())
    return "Qwen2-VL" if plain.startswith(("qwen2vl", "qwen25vl")) else "LLaVA-1.5"


# --- transformers' template environment --------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks the assistant's text for training masks;
    renders its body unchanged (transformers' AssistantTracker, without the tracking)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


class _Raised(jinja2.TemplateError):
    """What ``raise_exception`` raises: the template refusing a conversation."""


def _raise_exception(message):
    raise _Raised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces Jinja's filter, which escapes HTML characters, and exposes these options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without handing the template the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes (no way to CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env


_ENV = _environment()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        problem = " ".join(str(e.message).split())
        raise GazeEdgeError(f"the chat template has a syntax error at line {e.lineno}: {problem}") from None


# --- what the template sees ---------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` rebuilt from plain JSON types, anything else (decoded images, arrays, paths)
    replaced by the placeholder ``"<TypeName>"``, as transformers does: templates only test
    whether a media key is there, and the sandbox is not told which methods of rich objects are
    dangerous."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())  # np.bool_(False) must not become a truthy placeholder string
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers hands them to a template: keys whose value is None dropped, plain
    data only, and a message's reasoning under every name templates read it by."""
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise GazeEdgeError(f"a chat message must be a dict, got {type(message).__name__}")
        m = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat(template: str | None, messages: list[dict], *, arch: str, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True, **extra) -> tuple[str, str | None]:
    """The prompt transformers' ``apply_chat_template(messages, tokenize=False)`` renders; returns
    (prompt, warning).

    template: the model's chat template; None or "" uses the family's (``family_template(arch)``)
      and returns a one-line warning, else warning is None.
    messages: HF-style [{"role", "content": str | [{"type": "text", "text"}, {"type": "image", ...}]}].
    extra: more template variables (e.g. ``add_vision_id=True``, ``tools=[...]``), as
      apply_chat_template's keyword arguments.
    Raises GazeEdgeError (one line) when the template does not parse, calls ``raise_exception``,
    or fails on these messages.
    """
    warning = None
    if not template or not template.strip():
        name = family_template(arch)
        template = FAMILY_TEMPLATES[name]
        warning = f"the model has no chat template; using the {name} template"
    compiled = _compile(template)
    variables = {"tools": None, "documents": None, "bos_token": bos_token, "eos_token": eos_token, **extra}
    try:
        prompt = compiled.render(messages=_template_messages(messages),
                                 add_generation_prompt=add_generation_prompt, **_plain(variables))
    except _Raised as e:
        raise GazeEdgeError(f"the chat template refused the conversation: {e.message}") from None
    except jinja2.TemplateError as e:
        raise GazeEdgeError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise GazeEdgeError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None
    return prompt, warning
