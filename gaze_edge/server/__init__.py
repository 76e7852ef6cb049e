"""``gaze-edge serve``: an OpenAI- and Ollama-compatible HTTP server for one GazeModel (docs/SERVER.md).

    from gaze_edge.runtime.model import GazeModel
    from gaze_edge.server import create_app, serve
    serve(GazeModel.load(), port=8080)          # or: uvicorn.run(create_app(model, model_name="m"))

Routes: POST /v1/chat/completions, GET /v1/models (openai_routes); POST /api/chat, GET /api/tags,
POST /api/show (ollama_routes); GET /health. Gaze settings ride in an extra ``gaze`` field
({"enabled", "keep_ratio", "keep_regions", "gather"}); answers come from the model's pool of warm
conversations, so a follow-up turn evaluates only its new tokens.

Concurrency: queued, not parallel. Requests are answered one at a time in arrival order
(answers.AnswerQueue), while the event loop keeps accepting, checking and preparing others.
llama.cpp already runs one answer on the cores it is given (threads = cores), so a second
answer at once only shares them. Measured on the default model (docs/SERVER.md, "Concurrency"),
1 thread per answer on the 2-core machine this targets: two answers at once gave the same
tokens/s as one after the other (decode ~3000 tokens/s either way; ~630 with the image's
encoding) and each took twice as long (11-17 ms instead of 6 ms for a warm answer, 47 instead
of 22 ms cold), so queued, the first of two requests is done in half the time and the second at
the same time. Parallel sequences of one context (llama-server's slots) pay where decode is
bound by memory bandwidth with compute to spare, which it is not on these CPUs, and would need
a multi-sequence gaze registry; a queue also keeps each answer equal to the same request
served alone, which the load test checks.

The modules: app (the FastAPI app, API key, error bodies, serve), parse (request bodies into
GazeModel.chat calls), image_sources (data:, file://, http(s):// images), answers (the queue and
cancellation), state (what the routes share), errors (the ApiError bodies).

The extra ``pip install gaze-edge[server]`` brings FastAPI, uvicorn and sse-starlette; this module
imports them only when the app is made, so ``missing_packages()`` can say what is missing.
"""

from __future__ import annotations

import importlib.util

SERVER_PACKAGES = ("fastapi", "uvicorn", "sse_starlette")
INSTALL_HINT = "the server needs its extra: pip install 'gaze-edge[server]'"


def missing_packages() -> list[str]:
    """The server's packages that are not installed (empty: it can run)."""
    return [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]


def create_app(model, **options):
    """The ASGI app serving ``model``; see gaze_edge.server.app.create_app."""
    from gaze_edge.server.app import create_app as make

    return make(model, **options)


def serve(model, host: str = "127.0.0.1", port: int = 8080, **options) -> None:
    """Serve ``model`` until interrupted; see gaze_edge.server.app.serve."""
    from gaze_edge.server.app import serve as run

    run(model, host=host, port=port, **options)


__all__ = ["INSTALL_HINT", "create_app", "missing_packages", "serve"]
