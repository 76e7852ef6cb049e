"""The interactive chat of ``gaze-edge chat`` on a terminal: one warm conversation, slash commands.

Each turn sends the whole conversation to a ``Conversation``, which keeps its llama.cpp context:
only the new turn is evaluated. Commands: ``/image PATH`` (attach an image to the next message),
``/clear`` (start over), ``/exit`` (or an empty line, or Ctrl-D).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

from gaze_edge.errors import GazeEdgeError
from gaze_edge.images import load_image

HELP = "commands: /image PATH (attach to your next message), /clear (start over), /exit (or Ctrl-D)"


def run_interactive(model, *, images=(), options: dict, read: Callable[[], str], write: Callable[[str], None],
                    warn: Callable[[str], None], n_ctx: int | None = None) -> None:
    """Hold a conversation: ``read()`` gives the user's lines (EOFError ends), ``write`` shows the
    answer as it streams, ``warn`` shows notes and errors (one line each, the chat goes on)."""
    pending = [load_image(p) for p in images]  # attached to the first message
    messages: list[dict] = []
    warn(f"gaze-edge chat: {HELP}")
    with model.conversation(n_ctx=n_ctx) as conv:
        while True:
            try:
                line = read()
            except (EOFError, KeyboardInterrupt):
                break
            text = line.strip()
            if not text or text in ("/exit", "/quit", "/bye"):
                break
            if text == "/clear":
                messages, pending = [], []
                conv.reset()
                warn("(conversation cleared)")
                continue
            if text.startswith("/image"):
                try:
                    paths = shlex.split(text[len("/image"):])
                    if not paths:
                        raise GazeEdgeError("usage: /image PATH")
                    pending += [load_image(p) for p in paths]
                    warn(f"(image attached to your next message: {', '.join(paths)})")
                except (GazeEdgeError, ValueError) as e:
                    warn(f"error: {e}")
                continue
            if text.startswith("/"):
                warn(f"unknown command {text.split()[0]}; {HELP}")
                continue
            content = [{"type": "image", "image": im} for im in pending] + [{"type": "text", "text": line}]
            turn = {"role": "user", "content": content if pending else line}
            try:
                answer = ""
                for piece in conv.chat(messages + [turn], stream=True, **options):
                    answer += piece
                    write(piece)
                write("\n")
            except GazeEdgeError as e:
                warn(f"error: {e}")
                continue
            messages += [turn, {"role": "assistant", "content": answer.strip()}]
            pending = []
