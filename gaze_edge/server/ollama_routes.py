"""The Ollama-style routes many desktop apps speak: POST /api/chat, GET /api/tags, POST /api/show, GET /api/version.

``/api/chat`` streams by default, as Ollama does: one JSON object per line
(application/x-ndjson), each with a piece of the message, then a last one with ``done: true``,
``done_reason`` and the counts and durations (nanoseconds). ``"stream": false`` gives that last
object with the whole message. ``format`` is "json" or a JSON schema; ``options`` takes Ollama's
sampling names (``num_predict``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``,
``stop``, ``repeat_penalty``, ...). Options about loading (``num_ctx``, ``num_gpu``,
``num_thread``, ...) are ignored: the server's model and context are fixed when it starts.
Responses also carry ``visual_kv_fraction``, as on the OpenAI route.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from gaze_edge.server.answers import Answer, ClientGone
from gaze_edge.server.errors import INTERNAL_MESSAGE, ApiError
from gaze_edge.server.openai_routes import CLIENT_CLOSED
from gaze_edge.server.parse import ollama_chat, read_json
from gaze_edge.server.state import ServerState

log = logging.getLogger("gaze_edge.server")


def ollama_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/api/chat")
    async def chat(request: Request):
        t0 = time.perf_counter()
        body = await read_json(request, state.max_body_bytes)
        chat = await run_in_threadpool(ollama_chat, body, state.default_max_tokens)
        name = state.name_for(chat.model)
        if not chat.messages:  # Ollama's way of asking to load a model: it is loaded already
            return {"model": name, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                    "done_reason": "load", "done": True}
        try:
            answer = await state.answers.start(request, chat)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        if chat.stream:
            return StreamingResponse(_lines(answer, name, t0), media_type="application/x-ndjson")
        try:
            text = await answer.text()
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(_final(name, answer.result, t0, text))

    @router.get("/api/tags")
    async def tags():
        return {"models": [_listing(state)]}

    @router.post("/api/show")
    async def show(request: Request):
        body = await read_json(request, state.max_body_bytes)
        model = state.model
        info = {"general.architecture": model.arch, "general.name": model.meta("general.name") or state.model_name,
                f"{model.arch}.context_length": model.n_ctx_train,
                f"{model.arch}.embedding_length": model.n_embd, f"{model.arch}.block_count": model.n_layer}
        return {
            "modelfile": f"# served by gaze-edge\nFROM {model.files.model}\n",
            "parameters": "",
            "template": model.meta("tokenizer.chat_template") or "",
            "details": state.details(),
            "model_info": info,
            "capabilities": state.capabilities,
            "modified_at": _time(state.modified()),
            "model": state.name_for(body.get("model") or body.get("name")),
            "gaze": state.facts()["gaze"],
        }

    @router.get("/api/version")
    async def version():
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"version": version("gaze-edge")}
        except PackageNotFoundError:
            return {"version": "unknown"}

    return router


def _listing(state: ServerState) -> dict:
    name = state.model_name if ":" in state.model_name else f"{state.model_name}:latest"
    return {"name": name, "model": name, "modified_at": _time(state.modified()),
            "size": state.model.size_bytes(), "digest": state.digest(), "details": state.details(),
            "capabilities": state.capabilities}


def _final(name: str, result, t0: float, content: str = "") -> dict:
    """Ollama's last object of an answer: done, the reason, the counts and durations in nanoseconds."""
    return {
        "model": name, "created_at": _now(), "message": {"role": "assistant", "content": content},
        "done_reason": "length" if result.finish_reason == "length" else "stop", "done": True,
        "total_duration": int(1e9 * (time.perf_counter() - t0)), "load_duration": 0,
        "prompt_eval_count": result.n_prompt_tokens, "prompt_eval_duration": int(1e9 * result.prompt_seconds),
        "eval_count": result.n_generated_tokens, "eval_duration": int(1e9 * result.generate_seconds),
        "cached_count": result.n_cached_tokens, "visual_kv_fraction": result.visual_kv_fraction,
    }


async def _lines(answer: Answer, name: str, t0: float):
    """The NDJSON stream; closing it (the client left) cancels the answer."""
    try:
        async for piece in answer.pieces():
            yield _line({"model": name, "created_at": _now(), "message": {"role": "assistant", "content": piece},
                         "done": False})
        yield _line(_final(name, answer.result, t0))
    except ClientGone:
        return
    except ApiError as e:  # after the stream began: Ollama's error line
        yield _line(e.ollama_body())
    except Exception:
        log.exception("unexpected error while streaming an answer")
        yield _line({"error": INTERNAL_MESSAGE})
    finally:
        answer.cancel()


def _line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def _now() -> str:
    return _time(time.time())


def _time(t: float) -> str:
    """RFC 3339 in UTC with a Z, as Ollama writes times."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")
