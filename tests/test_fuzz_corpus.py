"""The fuzz corpus and oversized inputs: each gives `gaze-edge chat` one clear error line and exit 1.

tests/data/fuzz/gguf_recipes.json holds the reproducers scripts/fuzz.py found (and a few of the
same kinds), as small edits of the default GGUF pair (or of the tiny Gemma 3 pair of
tests/gemma3_tiny.py) that gguf-py's GGUFReader locates (a key's type or value, a tensor's name,
dims or type, a token's text, the header's counts); tests/data/fuzz/images/ holds
image files of a few hundred bytes. Each runs through ``gaze-edge chat`` in a subprocess, which
must exit 1 with exactly one stderr line ``gaze-edge: error: ...`` naming the problem: no signal,
no traceback, no core file. Before gaze_edge/runtime/gguf_check.py most of the GGUF ones killed
the process (the recipe's "before"); docs/FUZZ.md has the fuzzing figures.

Oversized inputs (a GGUF claiming absurd counts or sizes, a 30k x 30k PNG, a conversation longer
than the context) must also stay within bounded memory (the child's peak RSS, from wait4) and
write nothing.
"""

from __future__ import annotations

import json
import os
import re
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from gaze_edge.default_model import DEFAULT_DIR
from gaze_edge.runtime import gguf_check

DATA = Path(__file__).parent / "data" / "fuzz"
RECIPES = json.loads((DATA / "gguf_recipes.json").read_text())["recipes"]
IMAGES = sorted((DATA / "images").glob("*"))
MODEL = next(p for p in sorted(DEFAULT_DIR.glob("*.gguf")) if not p.name.startswith("mmproj"))
MMPROJ = next(p for p in sorted(DEFAULT_DIR.glob("mmproj*.gguf")))
CLI = Path(sys.executable).with_name("gaze-edge")
MAX_RSS = 1 << 30  # a chat with the default model peaks near 0.2 GiB
MAX_ADDRESS_SPACE = 2 << 30  # the chat's address space (RLIMIT_AS); 1 GiB is enough with one thread


# --------------------------------------------------------------------------- recipes


def _offsets(path: Path):
    """(reader, offset of a part): where gguf-py's GGUFReader found each part of the file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    base = reader.data.ctypes.data
    return reader, lambda part: part.ctypes.data - base


def _pack(value, dtype: np.dtype) -> bytes:
    if isinstance(value, str):
        value = float(value)
    if dtype.kind == "f":
        return np.array(value, dtype=dtype).tobytes()
    return int(value % (1 << (8 * dtype.itemsize))).to_bytes(dtype.itemsize, "little")


def base_pair(recipe: dict) -> tuple[Path, Path]:
    """(model, mmproj) the recipe's base file belongs to: the default pair, or the tiny Gemma 3
    pair (tests/gemma3_tiny.py, built once and cached) for bases named gemma3-*."""
    if recipe["base"].startswith("gemma3-"):
        from gemma3_tiny import gemma3_pair

        pair = gemma3_pair()
        return pair.llm, pair.mmproj
    return MODEL, MMPROJ


def is_projector(recipe: dict) -> bool:
    return recipe["base"].endswith("mmproj")


def apply_recipe(recipe: dict, out: Path) -> Path:
    """Write the recipe's mutated copy of its base file to ``out`` (a folder); its path."""
    model, mmproj = base_pair(recipe)
    base = mmproj if is_projector(recipe) else model
    data = bytearray(base.read_bytes())
    reader, at = _offsets(base)
    for edit in recipe["edits"]:
        op = edit["op"]
        if op == "kv":
            parts = reader.fields[edit["key"]].parts
            index = {"type": 2, "item_type": 3, "count": 4, "value": 3}[edit["part"]]
            part = parts[index]
            if edit["part"] == "value" and len(parts) > 5:  # an array: items after the count
                part = parts[5 + edit.get("index", 0)]
            raw = _pack(edit["value"], part.dtype)
            data[at(part):at(part) + len(raw)] = raw
        elif op == "tensor":
            t = next(t for t in reader.tensors if t.name == edit["name"])
            part = t.field.parts[{"n_dims": 2, "dim": 3, "type": 4, "offset": 5}[edit["part"]]]
            pos = at(part) + edit.get("index", 0) * part.dtype.itemsize
            raw = _pack(edit["value"], part.dtype)
            data[pos:pos + len(raw)] = raw
        elif op == "tensor_rename":
            t = next(t for t in reader.tensors if t.name == edit["name"])
            data[at(t.field.parts[1]) + edit["at"]] = ord(edit["char"])
        elif op == "token_text":
            field = reader.fields["tokenizer.ggml.tokens"]
            part = next(field.parts[i] for i in field.data if bytes(field.parts[i]) == edit["token"].encode())
            text = edit["text"].encode()
            assert len(text) == part.size, "token_text keeps the token's length"
            data[at(part):at(part) + len(text)] = text
        elif op == "header":
            pos, size = {"version": (4, 4), "tensor_count": (8, 8), "kv_count": (16, 8)}[edit["field"]]
            data[pos:pos + size] = int(edit["value"]).to_bytes(size, "little")
        elif op == "truncate":
            del data[int(len(data) * edit["fraction"]):]
        else:
            raise ValueError(f"unknown edit {op!r}")
    path = out / ("mmproj-fuzz.gguf" if is_projector(recipe) else "fuzz.gguf")
    path.write_bytes(bytes(data))
    assert path.read_bytes() != base.read_bytes(), f"{recipe['name']}: the edits changed nothing"
    return path


# --------------------------------------------------------------------------- running the CLI


def scene(path: Path) -> Path:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (196, 196), (240, 240, 240))
    ImageDraw.Draw(im).ellipse((10, 10, 80, 80), fill=(220, 30, 30))
    im.save(path)
    return path


def run_chat(cwd: Path, *args: str) -> tuple[int, str, int]:
    """``gaze-edge chat ARGS -p hi -n 2`` in ``cwd`` under a 2 GiB address-space limit: (exit
    status, stderr, peak RSS in bytes); a negative status is the signal that killed it."""
    argv = [str(CLI), "chat", *args, "-p", "hi", "-n", "2", "-q", "-t", "1"]
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}

    def limit() -> None:  # what "bounded memory" means here: a request past it fails in the child
        resource.setrlimit(resource.RLIMIT_AS, (MAX_ADDRESS_SPACE, MAX_ADDRESS_SPACE))

    with open(cwd / ".stderr", "w+b") as err:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=env, preexec_fn=limit)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    (cwd / ".stderr").unlink()
    return proc.returncode, stderr, usage.ru_maxrss * 1024


def assert_one_clear_line(code: int, stderr: str, cwd: Path, expect: str | None = None) -> str:
    lines = stderr.strip().splitlines()
    assert code == 1, f"exit {code} (negative: a signal): {stderr[-2000:]}"
    assert len(lines) == 1, stderr
    assert lines[0].startswith("gaze-edge: error: "), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    assert not list(cwd.glob("core*")), "a core file was written"
    if expect:
        assert re.search(expect, lines[0]), f"{expect!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def inputs(tmp_path):
    """A folder holding the chat's inputs only (so that anything written to it shows)."""
    folder = tmp_path / "run"
    folder.mkdir()
    scene(folder / "scene.png")
    return folder


def _listing(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


# --------------------------------------------------------------------------- the corpus


# the Gemma 3 pair is made with llama.cpp's converter from the runtime's source tree
GUARD_CASES = [pytest.param(r, id=r["name"], marks=[pytest.mark.runtime] if r["base"].startswith("gemma3-") else [])
               for r in RECIPES]


@pytest.mark.parametrize("recipe", GUARD_CASES)
def test_guard_names_the_problem(recipe, tmp_path):
    """In-process: gguf_check refuses each reproducer with the recipe's message (no llama.cpp)."""
    path = apply_recipe(recipe, tmp_path)
    check = gguf_check.check_projector if is_projector(recipe) else gguf_check.check_model
    with pytest.raises(gguf_check.InvalidGGUFError, match=recipe["expect"]) as caught:
        check(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message


def test_guard_passes_the_default_pair():
    assert gguf_check.check_model(MODEL).get("general.architecture") == "llama"
    assert gguf_check.check_projector(MMPROJ, n_embd_text=192).get("clip.projector_type") == "mlp"


@pytest.mark.runtime
@pytest.mark.parametrize("recipe", RECIPES, ids=[r["name"] for r in RECIPES])
def test_chat_on_gguf_reproducer_is_one_clear_error(recipe, inputs):
    path = apply_recipe(recipe, inputs)
    model, mmproj = base_pair(recipe)
    model, mmproj = (model, path) if is_projector(recipe) else (path, mmproj)
    before = _listing(inputs)
    code, stderr, rss = run_chat(inputs, "-m", str(model), "--mmproj", str(mmproj), "--image", "scene.png")
    assert_one_clear_line(code, stderr, inputs, recipe["expect"])
    assert rss < MAX_RSS, f"peak RSS {rss / 2**20:.0f} MiB"
    assert _listing(inputs) == before, "the chat wrote a file"


@pytest.mark.runtime
@pytest.mark.parametrize("image", IMAGES, ids=[p.name for p in IMAGES])
def test_chat_on_image_reproducer_is_one_clear_error(image, inputs):
    (inputs / image.name).write_bytes(image.read_bytes())
    code, stderr, rss = run_chat(inputs, "--image", image.name)
    line = assert_one_clear_line(code, stderr, inputs)
    assert image.name in line, line
    assert rss < MAX_RSS, f"peak RSS {rss / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- oversized inputs


def png_bomb(path: Path, side: int = 30000) -> Path:
    """A real, decodable 1-bit PNG of side x side pixels (about 110 KB; 2.7 GB once decoded to RGB)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = bytes(side // 8 + 1)  # filter byte 0, then side bits
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.runtime
def test_png_bomb_30k_is_refused_before_decoding(inputs, monkeypatch):
    png_bomb(inputs / "bomb.png")
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # only to look at the header here
    with Image.open(inputs / "bomb.png") as im:  # a real PNG of that size, not a broken one
        assert im.size == (30000, 30000) and im.mode == "1"
    before = _listing(inputs)
    code, stderr, rss = run_chat(inputs, "--image", "bomb.png", "--gaze-map", "map.png")
    assert_one_clear_line(code, stderr, inputs, r"image too large .*bomb\.png \(900 MP, limit 64 MP\)")
    assert rss < MAX_RSS, f"peak RSS {rss / 2**20:.0f} MiB"
    assert _listing(inputs) == before, "the chat wrote a file (the gaze map?)"


@pytest.mark.runtime
@pytest.mark.parametrize("name", ["mmproj-tensor-count-absurd", "mmproj-tensor-size-absurd",
                                  "model-token-count-absurd", "model-block-count-absurd"])
def test_gguf_claiming_absurd_sizes_costs_nothing(name, inputs):
    recipe = next(r for r in RECIPES if r["name"] == name)
    path = apply_recipe(recipe, inputs)
    model, mmproj = (MODEL, path) if is_projector(recipe) else (path, MMPROJ)
    before = _listing(inputs)
    code, stderr, rss = run_chat(inputs, "-m", str(model), "--mmproj", str(mmproj), "--image", "scene.png",
                                 "--gaze-map", "map.png")
    assert_one_clear_line(code, stderr, inputs, recipe["expect"])
    assert rss < MAX_RSS, f"peak RSS {rss / 2**20:.0f} MiB"
    assert _listing(inputs) == before


@pytest.mark.runtime
def test_conversation_larger_than_the_context(inputs):
    before = _listing(inputs)
    code, stderr, rss = run_chat(inputs, "--image", "scene.png", "-c", "64", "--gaze-map", "map.png")
    line = assert_one_clear_line(code, stderr, inputs)
    numbers = [int(n) for n in re.findall(r"\d+", line)]
    assert re.search(r"needs \d+ context cells .* holds 64", line), line
    assert numbers[0] > 64, line  # what it needs is more than the context
    assert "-c/--ctx-size" in line, line
    assert rss < MAX_RSS
    assert _listing(inputs) == before


# --------------------------------------------------------------------------- the harness


@pytest.mark.runtime
@pytest.mark.parametrize("target", ["mmproj", "image"])
def test_fuzz_script_runs(target, tmp_path):
    """scripts/fuzz.py itself (a few inputs): every input classified, nothing crashed."""
    script = Path(__file__).parent.parent / "scripts" / "fuzz.py"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), "--target", target, "--n", "8", "--seed", "1", "--quiet",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert summary["inputs"] == 8 and summary["ok"] + summary["clean_errors"] == 8, summary
    assert summary["crashes"] == summary["hangs"] == summary["unclean"] == 0
