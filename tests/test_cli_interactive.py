"""`gaze-edge chat` as a person uses it on a terminal: the interactive chat and the progress bar.

The command runs in a child process on real pseudo-terminals (stdin and stdout on one, stderr on
another, so answers and notes can be told apart), typed at line by line; every read has a deadline
and the child is killed at the end, so a hung chat fails the test instead of hanging it. The
embedded default model answers; a cold evaluation of the same conversation in this process (no
warm conversations) says what each turn must print, so the checks hold for any retrained model.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gaze_edge.cli import main
from gaze_edge.scenes import caption, render, sample_scene

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "scene.png"
TRUTH = (ROOT / "examples" / "scene.txt").read_text().strip()
PROMPT = "Describe the image."
PROMPT_MARK = "you> "  # on stderr: Python's input() writes it there when readline is not loaded
HELP_START = "commands: /image PATH"
MAX_TOKENS = 128  # the CLI's default -n
DEADLINE = 30.0  # seconds any one expected output may take (a turn takes well under one)
BAR = re.compile(r"prompt:\s+\d+%\|")  # tqdm's "prompt:  42%|####      | 179/426 [...tok/s]"


def gaze_edge_command() -> list[str]:
    """The installed console script beside this Python (what `pip install` makes), else the module."""
    script = Path(sys.executable).with_name("gaze-edge")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gaze_edge.cli"]


class Terminal:
    """A command on two pseudo-terminals (stdin + stdout, and stderr), read with deadlines."""

    def __init__(self, args: list[str], *, stdin_tty: bool = True, rows: int = 24, cols: int = 120) -> None:
        self.io_fd, io_slave = os.openpty()
        self.err_fd, err_slave = os.openpty()
        for fd in (io_slave, err_slave):
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        stdin = io_slave if stdin_tty else subprocess.DEVNULL
        self.proc = subprocess.Popen(gaze_edge_command() + args, stdin=stdin, stdout=io_slave, stderr=err_slave,
                                     cwd=ROOT, close_fds=True, start_new_session=True)
        os.close(io_slave)
        os.close(err_slave)
        self.out = ""  # everything read from stdout's terminal (input echo included), \r\n as \n
        self.err = ""
        self._raw = {self.io_fd: b"", self.err_fd: b""}
        self._open = {self.io_fd, self.err_fd}

    def _pump(self, timeout: float) -> None:
        """Read whatever the terminals have within ``timeout`` seconds."""
        if not self._open:
            time.sleep(min(timeout, 0.05))
            return
        ready, _, _ = select.select(list(self._open), [], [], timeout)
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed its side
                data = b""
            if not data:
                self._open.discard(fd)
                continue
            self._raw[fd] += data
        self.out = self._raw[self.io_fd].decode("utf-8", errors="replace").replace("\r\n", "\n")
        self.err = self._raw[self.err_fd].decode("utf-8", errors="replace").replace("\r\n", "\n")

    def expect(self, pattern: str, *, start: int = 0, on: str = "out", timeout: float = DEADLINE) -> re.Match:
        """Wait until ``pattern`` (a regex) shows in stdout (or ``on="err"``) after ``start``."""
        end = time.monotonic() + timeout
        while True:
            text = self.out if on == "out" else self.err
            found = re.compile(pattern).search(text, start)
            if found:
                return found
            if time.monotonic() > end or (not self._open and self.proc.poll() is not None):
                raise AssertionError(f"no {pattern!r} on std{on} within {timeout} s; stdout:\n{self.out}\n"
                                     f"stderr:\n{self.err}")
            self._pump(0.1)

    def drain(self, seconds: float = 0.2) -> None:
        """Read what is already written (notes printed before the prompt came back)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._pump(0.05)

    def type(self, line: str) -> None:
        os.write(self.io_fd, line.encode() + b"\r")

    def turn(self, line: str) -> tuple[str, str]:
        """Type ``line`` and wait for the next prompt: (what stdout showed, what stderr showed)."""
        out_at, err_at = len(self.out), len(self.err)
        self.type(line)
        found = self.expect(re.escape(PROMPT_MARK), start=err_at, on="err")
        self.drain()  # the answer was written before the prompt
        shown = self.out[out_at:]
        assert shown.startswith(line + "\n"), shown  # the terminal echoed what was typed
        return shown[len(line) + 1:], self.err[err_at:found.start()]

    def wait(self, timeout: float = DEADLINE) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            self._pump(0.1)
        self.drain(0.1)
        if self.proc.poll() is None:
            raise AssertionError(f"still running after {timeout} s; stdout:\n{self.out}\nstderr:\n{self.err}")
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for fd in (self.io_fd, self.err_fd):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def start(*args: str, **kwargs) -> Terminal:
        t = Terminal(list(args), **kwargs)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


@pytest.fixture(scope="module")
def model():
    """The default model answering cold (no warm conversations): what each turn must print."""
    from gaze_edge import GazeModel

    m = GazeModel.load(n_threads=1, cached_conversations=0)
    yield m
    m.close()


@pytest.fixture(scope="module")
def second_scene(tmp_path_factory):
    """A second GazeScenes image (a path) and its caption."""
    scene = sample_scene(5)
    path = tmp_path_factory.mktemp("scenes") / "second.png"
    render(scene).save(path)
    return path, caption(scene)


def user(text: str, *images) -> dict:
    """A user turn as the interactive chat sends it: images first, then the text as typed."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "image": im} for im in images]
            + [{"type": "text", "text": text}]}


def cold(model, messages) -> str:
    return model.chat(messages, max_tokens=MAX_TOKENS).text.strip()


def test_an_interactive_chat_with_commands(terminal, model, second_scene):
    """Turns, a follow-up, /image (good and missing), an unknown command, /clear and /exit."""
    second, second_truth = second_scene
    t = terminal("chat", "--image", str(SCENE), "--threads", "1")
    t.expect(re.escape(HELP_START), on="err")
    t.expect(re.escape(PROMPT_MARK), on="err")

    answer, err = t.turn(PROMPT)
    assert answer.strip() == TRUTH and err == ""
    messages = [user(PROMPT, SCENE), {"role": "assistant", "content": TRUTH}]

    # the example: a follow-up answered from the same conversation, and right (the centre
    # of examples/scene.png is a yellow square; the model before the multi-turn fine-tune said "blue.")
    follow_up = "What colour is the shape in the center?"
    answer, err = t.turn(follow_up)
    messages.append(user(follow_up))
    assert answer.strip() == "yellow." and err == ""
    assert answer.strip() == cold(model, messages)  # the warm chat prints what a cold evaluation says
    messages.append({"role": "assistant", "content": answer.strip()})

    shown, note = t.turn(f"/image {second}")
    assert shown == "" and note.strip() == f"(image attached to your next message: {second})"
    answer, err = t.turn(PROMPT)
    messages.append(user(PROMPT, second))
    assert answer.strip() and err == ""
    assert answer.strip() == cold(model, messages)

    shown, note = t.turn("/image missing.png")
    assert shown == "" and note.strip() == "error: image not found: missing.png"
    shown, note = t.turn("/foo")
    assert shown == "" and note.startswith("unknown command /foo;") and HELP_START in note
    assert len(note.strip().splitlines()) == 1

    shown, note = t.turn("/clear")
    assert shown == "" and note.strip() == "(conversation cleared)"
    t.turn(f"/image {second}")
    answer, err = t.turn(PROMPT)
    assert answer.strip() == second_truth and err == ""  # a fresh one-turn chat about the new image

    t.turn("/clear")
    # no image and no history now: the answer is that of the lone question, and the chat goes on
    answer, err = t.turn(PROMPT)
    assert err == "" and answer.strip() == cold(model, [user(PROMPT)])

    t.type("/exit")
    assert t.wait() == 0
    assert "Traceback" not in t.out + t.err


def test_the_second_turn_reuses_the_cache(terminal, model, second_scene):
    """With two images the first prompt has > 256 cells: a progress bar. The follow-up's whole
    conversation is longer still, so a bar would show again were it evaluated anew; only its new
    tokens are evaluated: no bar. An empty line ends the chat, exit status 0."""
    second, _ = second_scene
    t = terminal("chat", "--image", str(SCENE), "--image", str(second), "--threads", "1")
    t.expect(re.escape(PROMPT_MARK), on="err")
    first = model.chat([user(PROMPT, SCENE, second)], max_tokens=MAX_TOKENS)
    assert first.n_prompt_tokens >= 256

    answer, err = t.turn(PROMPT)
    assert answer.strip() == first.text.strip()
    assert BAR.search(err), err
    assert f"{first.n_prompt_tokens}/{first.n_prompt_tokens}" in err  # the bar counts the prompt's cells

    messages = [user(PROMPT, SCENE, second), {"role": "assistant", "content": first.text.strip()},
                user("What is in the center?")]
    assert model.chat(messages, max_tokens=1).n_prompt_tokens >= 256  # cold, it would draw a bar
    answer, err = t.turn("What is in the center?")
    assert answer.strip() and err == ""

    t.type("")  # an empty line ends the chat
    assert t.wait() == 0


def test_ctrl_d_ends_the_chat(terminal):
    t = terminal("chat", "--threads", "1")
    t.expect(re.escape(PROMPT_MARK), on="err")
    os.write(t.io_fd, b"\x04")  # Ctrl-D: end of input
    code = t.wait()
    assert (code, t.err.split(PROMPT_MARK)[-1].strip()) == (0, "")


def test_a_progress_bar_only_on_a_terminal_and_not_when_quiet(terminal, model, second_scene):
    second, _ = second_scene
    two = model.chat(PROMPT, images=[SCENE, second], max_tokens=MAX_TOKENS)
    assert two.n_prompt_tokens >= 256
    args = ["chat", "--image", str(SCENE), "--image", str(second), "-p", PROMPT, "--threads", "1"]

    shown = terminal(*args, stdin_tty=False)
    assert shown.wait() == 0
    assert shown.out.strip() == two.text.strip()
    assert BAR.search(shown.err) and f"{two.n_prompt_tokens}/{two.n_prompt_tokens}" in shown.err, shown.err

    quiet = terminal(*args, "--quiet", stdin_tty=False)
    assert quiet.wait() == 0
    assert quiet.out.strip() == two.text.strip() and quiet.err == ""

    # one image: fewer than 256 cells evaluate in a blink, no bar
    short = terminal("chat", "--image", str(SCENE), "-p", PROMPT, "--threads", "1", stdin_tty=False)
    assert short.wait() == 0
    assert short.out.strip() == TRUTH and short.err == ""


def test_no_progress_bar_when_stderr_is_not_a_terminal(model, second_scene, capfd):
    second, _ = second_scene
    two = model.chat(PROMPT, images=[SCENE, second], max_tokens=MAX_TOKENS)
    capfd.readouterr()
    result = CliRunner().invoke(main, ["chat", "--image", str(SCENE), "--image", str(second), "-p", PROMPT,
                                       "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout == two.text.strip() + "\n"
    assert result.stderr == ""
    assert capfd.readouterr().err == ""  # nor anything from llama.cpp at the file-descriptor level
