"""The FastAPI app: routes, the API key, error bodies; and ``serve`` (uvicorn).

Errors: every refusal is an OpenAI error object ({"error": {"message", "type", "param", "code"}}),
or Ollama's {"error": "..."} under /api/. An exception nobody expected is a 500 with a generic
message, logged with its traceback; the server keeps serving.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gaze_edge.server.answers import AnswerQueue
from gaze_edge.server.errors import INTERNAL_MESSAGE, ApiError
from gaze_edge.server.image_sources import UrlPolicy
from gaze_edge.server.ollama_routes import ollama_router
from gaze_edge.server.openai_routes import openai_router
from gaze_edge.server.state import ServerState, default_model_name

log = logging.getLogger("gaze_edge.server")

MAX_BODY_BYTES = 32 * 2**20
URL_TIMEOUT = 10.0
URL_MAX_BYTES = 20 * 2**20
# connections served at once (uvicorn's limit_concurrency); more get 503 instead of piling up in memory
MAX_CONNECTIONS = 64


def create_app(model, *, model_name: str | None = None, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, allow_file_urls: bool = False, allow_http_urls: bool = False,
               url_timeout: float = URL_TIMEOUT, url_max_bytes: int = URL_MAX_BYTES) -> FastAPI:
    """The server's ASGI app for ``model`` (a loaded GazeModel), e.g. for ``uvicorn.run(app)``.

    model_name: the name /v1/models and /api/tags list (default: the GGUF's file name); requests
      may name any model. api_key: when set, every route but /health wants
      ``Authorization: Bearer <key>`` (or ``X-Api-Key``). max_body_bytes: larger bodies get 413.
    allow_file_urls / allow_http_urls: follow file:// and http(s):// image URLs (off: data: URLs
      only); url_timeout (seconds) and url_max_bytes bound one download.
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    state = ServerState(
        model=model, model_name=model_name or default_model_name(model), api_key=api_key or None,
        max_body_bytes=int(max_body_bytes),
        url_policy=UrlPolicy(allow_file=allow_file_urls, allow_http=allow_http_urls, timeout=float(url_timeout),
                             max_bytes=int(url_max_bytes)),
        answers=AnswerQueue(model),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.answers.close()

    app = FastAPI(title="gaze-edge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gaze = state
    guard = [Depends(_api_key_check(state))]
    app.include_router(openai_router(state), dependencies=guard)
    app.include_router(ollama_router(state), dependencies=guard)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, "waiting": state.answers.waiting, **state.answers.counts}

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


def serve(model, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "info", **app_options) -> None:
    """Serve ``model`` over HTTP until interrupted (Ctrl-C); ``app_options`` go to ``create_app``."""
    import uvicorn

    app = create_app(model, **app_options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=MAX_CONNECTIONS,
                timeout_graceful_shutdown=5)


# --- the API key -------------------------------------------------------------------------------


def _api_key_check(state: ServerState):
    def check(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("x-api-key")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
        if not given:
            raise ApiError(401, "an API key is needed: send the header 'Authorization: Bearer <key>'",
                           code="missing_api_key")
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            raise ApiError(401, "wrong API key", code="invalid_api_key")

    return check


# --- error bodies ------------------------------------------------------------------------------


def _body(request: Request, error: ApiError) -> JSONResponse:
    ollama = request.url.path.startswith("/api/")
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.ollama_body() if ollama else error.openai_body(), status_code=error.status,
                        headers=headers)


async def _api_error(request: Request, e: ApiError):
    return _body(request, e)


async def _http_error(request: Request, e: StarletteHTTPException):
    messages = {404: f"no such route: {request.method} {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}
    message = messages.get(e.status_code, str(e.detail))
    return _body(request, ApiError(e.status_code, message, code="not_found" if e.status_code == 404 else None))


async def _validation_error(request: Request, e: RequestValidationError):
    return _body(request, ApiError(400, f"bad request: {e.errors()[:1]}"))


async def _unexpected_error(request: Request, e: Exception):
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=(type(e), e, e.__traceback__))
    return _body(request, ApiError(500, INTERNAL_MESSAGE))
