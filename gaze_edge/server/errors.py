"""HTTP errors of the server, and what a library error means for a client.

Every refusal is an ``ApiError`` (status, one-line message, OpenAI's ``type`` / ``param`` /
``code``), written as an OpenAI error object on the OpenAI routes and as Ollama's
``{"error": "..."}`` on its routes. Errors the user can fix (gaze_edge.errors.GazeEdgeError and
its subclasses) are 400s; anything else is a 500 whose body says nothing about the internals.
"""

from __future__ import annotations

from gaze_edge.errors import ContextOverflowError, GazeEdgeError, ImageError

# OpenAI's error types, by status
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error"}

INTERNAL_MESSAGE = "internal server error (the request was not answered; the server is still running)"


class ApiError(Exception):
    """A request the server refuses: the HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict:
        return {"error": self.message}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_exception(e: BaseException) -> ApiError:
    """The ApiError for an exception raised while preparing or answering a request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextOverflowError):
        return ApiError(400, _one_line(e), param="messages", code="context_length_exceeded")
    if isinstance(e, ImageError):
        return ApiError(400, _one_line(e), param="messages", code="invalid_image")
    if isinstance(e, GazeEdgeError):
        return ApiError(400, _one_line(e))
    return ApiError(500, INTERNAL_MESSAGE)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__
