"""The OpenAI-compatible routes: POST /v1/chat/completions, GET /v1/models (also without /v1, as llama-server).

A completion is OpenAI's ``chat.completion`` object plus two extras: ``visual_kv_fraction`` (the
mean fraction of the image's KV entries a generated token attended to; null when nothing gazed)
and llama-server's ``timings`` (``prompt_n`` prompt tokens evaluated, ``cache_n`` reused from the
cache, ``predicted_n`` generated, with their milliseconds). A stream is a series of
``chat.completion.chunk`` server-sent events: the role, the text pieces, an empty delta with the
finish reason, timings and visual_kv_fraction, the usage when ``stream_options.include_usage``,
then ``data: [DONE]``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from gaze_edge.server.answers import Answer, ClientGone
from gaze_edge.server.errors import INTERNAL_MESSAGE, ApiError
from gaze_edge.server.parse import openai_chat, read_json
from gaze_edge.server.state import ServerState

log = logging.getLogger("gaze_edge.server")

CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, the access log shows it


def openai_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    @router.post("/chat/completions", include_in_schema=False)
    async def chat_completions(request: Request):
        body = await read_json(request, state.max_body_bytes)
        chat = await run_in_threadpool(openai_chat, body, state.url_policy, state.default_max_tokens)
        try:
            answer = await state.answers.start(request, chat)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": state.name_for(chat.model), "system_fingerprint": None}
        if chat.stream:
            return EventSourceResponse(_events(answer, meta, chat.include_usage), sep="\n", ping=15)
        try:
            text = await answer.text()
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(completion(meta, text, answer.result))

    @router.get("/v1/models")
    @router.get("/models", include_in_schema=False)
    async def models():
        entry = {
            "id": state.model_name, "object": "model", "created": int(state.modified()), "owned_by": "gaze-edge",
            "input_modalities": state.input_modalities, "output_modalities": ["text"],
            "architecture": {"input_modalities": state.input_modalities, "output_modalities": ["text"]},
            "capabilities": state.capabilities,
            "meta": state.facts(),
        }
        return {"object": "list", "data": [entry]}

    return router


def completion(meta: dict, text: str, result) -> dict:
    return {
        **meta, "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason(result)}],
        "usage": usage(result),
        "timings": timings(result),
        "visual_kv_fraction": result.visual_kv_fraction,
    }


def finish_reason(result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def usage(result) -> dict:
    n_prompt, n_gen = result.n_prompt_tokens, result.n_generated_tokens
    return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen,
            "prompt_tokens_details": {"cached_tokens": result.n_cached_tokens}}


def timings(result) -> dict:
    """llama-server's timings: prompt tokens evaluated (not those reused from the cache), generated tokens."""
    prompt_n = result.n_prompt_tokens - result.n_cached_tokens
    prompt_ms, predicted_ms = 1000 * result.prompt_seconds, 1000 * result.generate_seconds
    predicted_n = result.n_generated_tokens
    return {
        "cache_n": result.n_cached_tokens,
        "prompt_n": prompt_n, "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else None,
        "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms > 0 else None,
        "predicted_n": predicted_n, "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else None,
        "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms > 0 else None,
    }


async def _events(answer: Answer, meta: dict, include_usage: bool):
    """The stream's server-sent events; closing it (the client left) cancels the answer."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
        return {"data": json.dumps({**meta, "object": "chat.completion.chunk",
                                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}], **extra})}

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in answer.pieces():
            yield chunk({"content": piece})
        result = answer.result
        yield chunk({}, finish_reason(result), timings=timings(result),
                    visual_kv_fraction=result.visual_kv_fraction)
        if include_usage:
            yield {"data": json.dumps({**meta, "object": "chat.completion.chunk", "choices": [],
                                       "usage": usage(result)})}
        yield {"data": "[DONE]"}
    except ClientGone:
        return
    except ApiError as e:  # after the stream began: as an error event, as llama-server does
        yield {"data": json.dumps(e.openai_body())}
    except Exception:
        log.exception("unexpected error while streaming an answer")
        yield {"data": json.dumps(ApiError(500, INTERNAL_MESSAGE).openai_body())}
    finally:
        answer.cancel()
