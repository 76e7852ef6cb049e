"""llama.cpp's, clip's and mtmd's own log lines: silent unless --verbose, and the reason in errors.

llama.cpp writes from C to file descriptor 2, past Python's sys.stderr, so the command runs in a
child process and its stderr is read as the file descriptor it is. The model is a tiny random
Qwen2-VL, converted here (f32): its projector makes mtmd warn (``load_hparams: Qwen-VL models
require at minimum 1024 image tokens``), which llama-cpp-python's own quiet setting lets through.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parents[1]
# how llama.cpp, ggml, clip and mtmd lines begin: "function_name: message"
LOG_LINE = re.compile(r"^\s*[A-Za-z_]\w*: ")
LOG_WORDS = ("load_hparams", "llama_", "clip_", "mtmd", "ggml_", "gguf_")


def gaze_edge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The installed console script (else the module) in a child process, output captured."""
    script = Path(sys.executable).with_name("gaze-edge")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "gaze_edge.cli"]
    return subprocess.run(command + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def log_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if LOG_LINE.match(line) or any(w in line for w in LOG_WORDS)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A converted tiny Qwen2-VL (folder with its GGUF pair) and an image it takes natively."""
    from gaze_edge.convert import convert
    from gaze_edge.convert.tiny import QWEN_IMAGE_SIZE, tiny_checkpoint

    root = tmp_path_factory.mktemp("logs")
    ckpt = tiny_checkpoint("qwen2vl", root / "ckpt", seed=0)
    llm, mmproj = convert(ckpt, root / "gguf", outtype="f32", name="tiny-qwen2vl", progress=False)
    image = root / "red.png"
    Image.new("RGB", (QWEN_IMAGE_SIZE, QWEN_IMAGE_SIZE), (200, 40, 40)).save(image)
    return llm, mmproj, image


def chat_args(model: Path, image: Path) -> list[str]:
    return ["chat", "-m", str(model), "--image", str(image), "-p", "Describe.", "-n", "4", "--threads", "1"]


def test_quiet_without_verbose(tiny):
    llm, _, image = tiny
    run = gaze_edge(*chat_args(llm.parent, image))
    assert run.returncode == 0, run.stderr
    assert log_lines(run.stderr) == [], run.stderr


def test_verbose_shows_the_logs(tiny):
    llm, _, image = tiny
    run = gaze_edge("--verbose", *chat_args(llm.parent, image))
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    for start in ("load_hparams", "llama_", "clip_", "mtmd"):
        assert any(line.startswith(start) for line in lines), f"no {start}* line in:\n{run.stderr[:3000]}"
    assert any("1024 image tokens" in line for line in lines)  # the warning quiet mode hides


def _truncated(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize(
    ("case", "said", "reason"),
    [
        # gaze_edge.runtime.gguf_check reads the files before llama.cpp does (docs/FUZZ.md)
        ("truncated model", "is not a usable GGUF file", "runs past the end of the file"),
        ("not a gguf", "is not a GGUF file", "does not start with 'GGUF'"),
        ("truncated projector", "is not a usable GGUF file", "past the end of the file"),
    ],
)
def test_a_corrupt_gguf_is_one_line_naming_the_problem(tiny, tmp_path, case, said, reason):
    llm, mmproj, image = tiny
    folder = tmp_path / "model"
    folder.mkdir()
    if case == "truncated model":
        _truncated(llm, folder / llm.name, 0.5)
        shutil.copy(mmproj, folder / mmproj.name)
    elif case == "not a gguf":
        (folder / llm.name).write_text("this is not a GGUF file, just text with a .gguf name\n")
        shutil.copy(mmproj, folder / mmproj.name)
    else:
        shutil.copy(llm, folder / llm.name)
        _truncated(mmproj, folder / mmproj.name, 0.3)
    run = gaze_edge(*chat_args(folder, image))
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("gaze-edge: error: ") and said in lines[0] and reason in lines[0], lines[0]
    assert "Traceback" not in run.stderr


def test_the_python_api_says_why_and_prints_nothing(tiny, tmp_path, capfd, monkeypatch):
    """What llama.cpp logged as the reason reaches the one-line error (the file guard is off here:
    with it, gguf_check names this truncation first)."""
    from gaze_edge.runtime import gguf_check
    from gaze_edge.runtime.model import GazeModel, ModelFilesError

    monkeypatch.setattr(gguf_check, "check_model", lambda *a, **k: None)
    monkeypatch.setattr(gguf_check, "check_projector", lambda *a, **k: None)
    llm, mmproj, _ = tiny
    broken = _truncated(llm, tmp_path / llm.name, 0.5)
    with pytest.raises(ModelFilesError) as e:
        GazeModel.load(broken, mmproj)
    message = str(e.value)
    assert "\n" not in message and "model is corrupted or incomplete" in message
    assert capfd.readouterr().err == ""
    # the reason is not kept for the next error: a second failure says only its own
    with pytest.raises(ModelFilesError) as again:
        GazeModel.load(broken, mmproj)
    assert str(again.value).count("model is corrupted or incomplete") == 1
