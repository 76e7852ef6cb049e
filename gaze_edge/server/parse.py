"""Reading and checking request bodies: OpenAI chat completions and Ollama /api/chat, as model.chat calls.

``read_json`` enforces the body limit (the declared Content-Length and the bytes actually
received) and parses JSON. ``openai_chat`` and ``ollama_chat`` turn a body into a ``ChatRequest``:
messages in the library's form (images as data: URLs or bytes, never as paths) and the keyword
arguments of ``GazeModel.chat``. Every malformed field is an ApiError 400 naming it; values the
library checks itself (temperature ranges, schemas) are left to it and come back as 400s too.

Both parse functions may read files or fetch URLs (image_sources): call them from a worker
thread, not the event loop.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from starlette.requests import ClientDisconnect

from gaze_edge.errors import ImageError
from gaze_edge.server.errors import ApiError, bad_request
from gaze_edge.server.image_sources import UrlPolicy, image_from_base64, image_from_url

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
GAZE_FIELDS = ("enabled", "keep_ratio", "keep_regions", "gather")
# sampling fields both APIs may send, passed to SamplingSettings as they are (it checks them)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
                   "presence_penalty", "frequency_penalty")
MAX_STOP_STRINGS = 16
# whole numbers go to llama.cpp as C ints: larger ones are refused here, not overflowed there
MAX_INT = 2**31 - 1


@dataclass
class ChatRequest:
    """A chat request, checked: what to pass to ``GazeModel.chat`` and how to answer."""

    messages: list[dict]
    options: dict = field(default_factory=dict)  # keyword arguments of GazeModel.chat
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage
    model: str | None = None  # the name the client asked for


async def read_json(request, max_bytes: int) -> dict:
    """The request body as a JSON object; 413 over ``max_bytes`` (declared or received), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise bad_request("bad Content-Length header")
        if int(declared) > max_bytes:
            raise _too_large(int(declared), max_bytes)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise _too_large(len(body), max_bytes)
    except ClientDisconnect:
        raise bad_request("the client disconnected before the body was complete") from None
    if not body.strip():
        raise bad_request("the request has no body (a JSON object is expected)")
    try:
        value = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"malformed JSON: {e}") from None
    except RecursionError:
        raise bad_request("malformed JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise bad_request(f"the request body must be a JSON object, not {_kind(value)}")
    return value


def _too_large(n: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is too large: {n} bytes or more (limit {limit} bytes; "
                         "the server's --max-body-mb)", code="request_too_large")


# --- OpenAI ----------------------------------------------------------------------------------


def openai_chat(body: dict, policy: UrlPolicy, default_max_tokens: int) -> ChatRequest:
    """A ``POST /v1/chat/completions`` body as a ChatRequest."""
    model = _optional(body, "model", str)
    n = body.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise bad_request(f"only n = 1 is supported, got {n!r}", "n")
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise bad_request(f"{name} is not supported by this server", name)
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise bad_request("tool_choice is not supported by this server", "tool_choice")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad_request("logprobs are not supported by this server", "logprobs")
    stream = bool(_optional(body, "stream", bool))
    stream_options = _optional(body, "stream_options", dict) or {}
    include_usage = bool(_optional(stream_options, "include_usage", bool, "stream_options.include_usage"))

    options = _sampling(body, "")
    max_tokens = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = body.get("max_tokens"), "max_tokens"
    options["max_tokens"] = _max_tokens(max_tokens, name, default_max_tokens)
    options.update(_stop(body.get("stop"), "stop"))
    options.update(_openai_constraint(body))
    options.update(gaze_options(body.get("gaze"), "gaze"))
    messages = _openai_messages(body.get("messages"), policy)
    return ChatRequest(messages, options, stream, include_usage, model)


def _openai_messages(messages, policy: UrlPolicy) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = _role(m, where)
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content must be a string or a list of parts, not {_kind(content)}",
                              f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"{at}: a text part needs a 'text' string", at)
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if role != "user":
                    raise bad_request(f"{at}: images go in user messages", at)
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                parts.append({"type": "image", "image": _image(image_from_url, url, policy, at)})
            else:
                shown = repr(kind) if isinstance(part, dict) else _kind(part)
                raise bad_request(f"{at}: unsupported content part {shown} (text or image_url)", at)
        out.append({"role": role, "content": parts})
    return out


def _openai_constraint(body: dict) -> dict:
    """response_format (and llama-server's grammar / json_schema fields) as sampler settings."""
    found = {}
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise bad_request("response_format must be an object with a 'type'", "response_format")
        kind = fmt["type"]
        if kind == "json_object":
            if fmt.get("schema") is not None:  # llama-server's form: a schema alongside json_object
                found["json_schema"] = _schema(fmt["schema"], "response_format.schema")
            else:
                found["json_object"] = True
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is None and isinstance(fmt.get("schema"), dict):
                schema = fmt["schema"]
            found["json_schema"] = _schema(schema, "response_format.json_schema.schema")
        elif kind != "text":
            raise bad_request(f"unsupported response_format type {kind!r} (text, json_object or json_schema)",
                              "response_format")
    if body.get("json_schema") is not None:
        found["json_schema"] = _schema(body["json_schema"], "json_schema")
    if body.get("grammar") is not None:
        if not isinstance(body["grammar"], str):
            raise bad_request("grammar must be GBNF text", "grammar")
        found["grammar"] = body["grammar"]
    return found


# --- Ollama ----------------------------------------------------------------------------------


def ollama_chat(body: dict, default_max_tokens: int) -> ChatRequest:
    """A ``POST /api/chat`` body as a ChatRequest (streams unless "stream": false, as Ollama does)."""
    model = _optional(body, "model", str)
    if body.get("tools"):
        raise bad_request("tools are not supported by this server", "tools")
    stream = _optional(body, "stream", bool)
    options_in = _optional(body, "options", dict) or {}
    options = _sampling(options_in, "options.")
    options["max_tokens"] = _max_tokens(options_in.get("num_predict"), "options.num_predict", default_max_tokens)
    options.update(_stop(options_in.get("stop"), "options.stop"))
    fmt = body.get("format")
    if fmt == "json":
        options["json_object"] = True
    elif isinstance(fmt, dict):
        options["json_schema"] = _schema(fmt, "format")
    elif fmt not in (None, ""):
        raise bad_request("format must be \"json\" or a JSON schema object", "format")
    options.update(gaze_options(body.get("gaze"), "gaze"))
    messages = body.get("messages")
    if messages is None:
        messages = []
    if not isinstance(messages, list):
        raise bad_request("messages must be a list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = _role(m, where)
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string", f"{where}.content")
        images = m.get("images") or []
        if not isinstance(images, list):
            raise bad_request(f"{where}.images must be a list of base64 strings", f"{where}.images")
        if images and role != "user":
            raise bad_request(f"{where}: images go in user messages", f"{where}.images")
        parts = [{"type": "image", "image": _image(image_from_base64, im, f"{where}.images[{j}]")}
                 for j, im in enumerate(images)]
        out.append({"role": role, "content": parts + [{"type": "text", "text": content or ""}]})
    return ChatRequest(out, options, True if stream is None else stream, False, model)


# --- shared fields ---------------------------------------------------------------------------


def gaze_options(value, param: str) -> dict:
    """The extra ``gaze`` field ({"enabled", "keep_ratio", "keep_regions", "gather"}, or a bool)
    as GazeModel.chat keyword arguments."""
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"gaze": value}
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be an object with {', '.join(GAZE_FIELDS)}", param)
    unknown = sorted(set(value) - set(GAZE_FIELDS))
    if unknown:
        raise bad_request(f"{param}: unknown field(s) {', '.join(unknown)} (known: {', '.join(GAZE_FIELDS)})", param)
    out = {}
    if value.get("enabled") is not None:
        out["gaze"] = _typed(value["enabled"], bool, f"{param}.enabled")
    if value.get("gather") is not None:
        out["gather"] = _typed(value["gather"], bool, f"{param}.gather")
    ratio = value.get("keep_ratio")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise bad_request(f"{param}.keep_ratio must be a number in (0, 1], got {ratio!r}", f"{param}.keep_ratio")
        out["keep_ratio"] = float(ratio)
    regions = value.get("keep_regions")
    if regions is not None:
        if isinstance(regions, bool) or not isinstance(regions, int) or not 1 <= regions <= MAX_INT:
            raise bad_request(f"{param}.keep_regions must be an integer >= 1, got {regions!r}",
                              f"{param}.keep_regions")
        out["keep_regions"] = regions
    return out


def _sampling(source: dict, prefix: str) -> dict:
    out = {}
    for name in SAMPLING_FIELDS:
        value = source.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or abs(value) > MAX_INT:
                raise bad_request(f"{prefix}{name} must be a number, got {value!r:.40}", prefix + name)
            out[name] = value
    seed = source.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise bad_request(f"{prefix}seed must be an integer, got {seed!r}", prefix + "seed")
        if seed != -1:  # -1: a random seed, as in llama.cpp
            out["seed"] = seed
    return out


def _max_tokens(value, name: str, default: int) -> int:
    """max_tokens / num_predict: None, -1 (and Ollama's -2) mean "until the context is full"."""
    if value is None or (not isinstance(value, bool) and value in (-1, -2)):
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT:
        raise bad_request(f"{name} must be an integer in [1, {MAX_INT}], got {value!r:.40}", name)
    return value


def _stop(value, name: str) -> dict:
    if value is None:
        return {}
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"{name} must be a string or a list of strings", name)
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"{name}: at most {MAX_STOP_STRINGS} stop strings", name)
    return {"stop": tuple(s for s in stops if s)}


def _schema(schema, param: str):
    if not isinstance(schema, dict | bool):
        raise bad_request(f"{param} must be a JSON schema object", param)
    return schema


def _role(m, where: str) -> str:
    if not isinstance(m, dict):
        raise bad_request(f"{where} must be an object with role and content, not {_kind(m)}", where)
    role = m.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}: unsupported role {role!r} (system, user or assistant)", f"{where}.role")
    return ROLES[role]


def _image(fn, value, *args):
    try:
        return fn(value, *args)
    except ImageError as e:
        raise ApiError(400, str(e), param=args[-1], code="invalid_image") from None


def _optional(body: dict, name: str, kind: type, param: str | None = None):
    value = body.get(name)
    return None if value is None else _typed(value, kind, param or name)


def _typed(value, kind: type, param: str):
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad_request(f"{param} must be {_article(kind)}, not {_kind(value)}", param)
    return value


def _article(kind: type) -> str:
    return {bool: "true or false", str: "a string", dict: "an object", list: "a list"}.get(kind, kind.__name__)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__)
