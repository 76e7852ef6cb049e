"""Answering requests one at a time, in arrival order, off the event loop; stopping when the client leaves.

    answer = await answers.start(request, chat)   # checks the input (400s raise here), queues it
    async for piece in answer.pieces(): ...       # the text as it is generated
    answer.result                                 # then the ChatResult (tokens, timings, gaze)

Preparing a request (decoding its images, rendering its prompt, parsing its grammar) runs in
Starlette's thread pool, several at once. The answers themselves run in ONE worker thread, a
first-in-first-out queue: the model answers one request at a time anyway (``model.lock``), a
single thread keeps every llama.cpp call of an answer on the thread that took the lock (a
streamed answer is a generator holding it), and the queue's order is the order requests were
prepared in. Why queued and not parallel sequences: see gaze_edge/server/__init__.py.

A client that disconnects, or a stream that is closed, sets the answer's cancel flag: the
generation loop checks it before every token (``cancel=`` of GazeModel.chat) and the prompt's
evaluation between batches (its ``progress`` callback), so the worker moves on to the next
request within a token; an answer still waiting in the queue is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from starlette.concurrency import run_in_threadpool

from gaze_edge.chat import ChatResult
from gaze_edge.conversation import prepare_call
from gaze_edge.server.errors import from_exception
from gaze_edge.server.parse import ChatRequest

log = logging.getLogger("gaze_edge.server")

# how often a waiting answer asks whether its client is still there, in seconds
POLL_SECONDS = 0.1

_END = object()  # the worker posts it last


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class _Cancelled(Exception):
    """Raised by the progress callback to stop a prompt evaluation nobody waits for."""


class AnswerQueue:
    """The model's answers, one at a time, first in first out."""

    def __init__(self, model) -> None:
        self.model = model
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gaze-edge-answer")
        self._lock = threading.Lock()
        self._live: set[Answer] = set()
        # how answers ended: "answered", "cancelled" (the client left), "errors" (e.g. a prompt over
        # the context)
        self.counts = {"answered": 0, "cancelled": 0, "errors": 0}

    @property
    def waiting(self) -> int:
        """Answers queued or running."""
        with self._lock:
            return len(self._live)

    async def start(self, request, chat: ChatRequest) -> Answer:
        """Check ``chat`` and queue its answer; returns once the answer has begun (its first text,
        or its end). Raises ApiError for bad input (including a prompt over the context, found
        when its turn comes) and ClientGone when the client left meanwhile."""
        answer = Answer(self, request)
        # trace: the selections each step made, for the answer's visual_kv_fraction
        options = {**chat.options, "trace": True, "cancel": answer.cancelled, "progress": answer._check_progress}
        try:
            call = await run_in_threadpool(prepare_call, self.model, chat.messages, options)
        except Exception as e:
            raise _as_api_error(e) from None
        with self._lock:
            self._live.add(answer)
        self._worker.submit(answer._work, call)
        try:
            await answer._wait_first()
        except BaseException:  # an error, the client gone, or this task cancelled: nobody will read it
            answer.cancel()
            raise
        return answer

    def close(self) -> None:
        """Cancel every answer and stop the worker (the server is shutting down)."""
        with self._lock:
            live = list(self._live)
        for answer in live:
            answer.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _done(self, answer: Answer, outcome: str) -> None:
        with self._lock:
            self._live.discard(answer)
            self.counts[outcome] += 1


class Answer:
    """One request's answer: its text pieces as the worker makes them, then ``result``."""

    def __init__(self, queue: AnswerQueue, request) -> None:
        self._queue = queue
        self._request = request
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self._checked = self._loop.time()
        self._ahead: list = []  # events read by _wait_first, not yet handed on
        self.result: ChatResult | None = None

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop generating (before the next token); harmless once the answer is complete."""
        self._cancel.set()

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text pieces; ``result`` is set when they end. Raises ApiError for an error
        during the answer and ClientGone when the client disconnects (the answer is cancelled)."""
        while True:
            item = self._ahead.pop(0) if self._ahead else await self._next()
            if item is _END:
                if self.result is None:
                    raise ClientGone()  # cancelled before it began
                return
            if isinstance(item, BaseException):
                raise _as_api_error(item)
            if isinstance(item, ChatResult):
                self.result = item
            else:
                yield item

    async def text(self) -> str:
        """The whole answer's text (``result`` is set)."""
        try:
            return "".join([piece async for piece in self.pieces()])
        finally:
            self.cancel()  # if this task was cancelled before the end (harmless after it)

    # --- in the event loop -------------------------------------------------------------------

    async def _wait_first(self) -> None:
        """Wait for the answer's first event; raise its error, if it is one."""
        item = await self._next()
        if isinstance(item, BaseException):
            raise _as_api_error(item)
        if item is _END:
            raise ClientGone()  # cancelled before it began
        self._ahead.append(item)

    async def _next(self):
        """The worker's next event; checks every POLL_SECONDS whether the client is still there."""
        while True:
            now = self._loop.time()
            if now - self._checked >= POLL_SECONDS:
                self._checked = now
                if await self._request.is_disconnected():
                    self.cancel()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(self._events.get(), POLL_SECONDS)
            except asyncio.TimeoutError:
                pass

    # --- in the worker thread ----------------------------------------------------------------

    def _work(self, call) -> None:
        outcome = "cancelled"
        try:
            if self._cancel.is_set():
                return  # its client left while it waited
            # the pool's generator: text pieces, then the ChatResult (it holds model.lock meanwhile)
            for item in self._queue.model.conversations.answer(call):
                if isinstance(item, ChatResult) and item.finish_reason != "cancelled":
                    outcome = "answered"
                self._post(item)
        except _Cancelled:
            pass
        except Exception as e:
            outcome = "errors"
            self._post(e)
        finally:
            self._queue._done(self, outcome)
            self._post(_END)

    def _check_progress(self, done: int, total: int) -> None:
        if self._cancel.is_set():
            raise _Cancelled()

    def _post(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass


def _as_api_error(e: BaseException):
    error = from_exception(e)
    if error.status >= 500:
        log.error("unexpected error while answering", exc_info=(type(e), e, e.__traceback__))
    return error
