#!/usr/bin/env python3
"""Fuzz the files users hand gaze-edge: the language-model GGUF, the mmproj GGUF, image files.

    .venv/bin/python scripts/fuzz.py --target mmproj --n 10000 --tiny-gemma3
    .venv/bin/python scripts/fuzz.py --target model  --n 10000 --tiny-gemma3
    .venv/bin/python scripts/fuzz.py --target image  --n 10000

(docs/FUZZ.md has the figures of these runs.) Each input is a mutated copy of a real file (seeds:
the default GGUF pair of gaze_edge/models/default, the tiny Gemma 3 pair of tests/gemma3_tiny.py
with --tiny-gemma3, any --pair given, and small PNG/JPEG/GIF/WebP images drawn with PIL),
run through what ``gaze-edge chat -m MODEL --mmproj MMPROJ --image IMAGE -p hi -n 2`` runs: the
CLI's own chat command (image load, ``GazeModel.load``, one short chat), in a process of its own.

Fast and isolated: this process is a fork server. It imports llama_cpp and gaze_edge once and
forks one child per input; the child runs under an address-space limit (--memory-gib, so a file
that claims absurd sizes cannot eat the machine) and an alarm (--timeout), and exits with the
CLI's status. Each input is classified:

    ok          exit 0
    clean       exit 1 with one ``gaze-edge: error:`` line that is not an internal error
    crash       killed by a signal (SIGSEGV, SIGABRT from a GGML_ASSERT or an uncaught C++
                exception, SIGFPE, ...), or out of memory (std::bad_alloc, MemoryError)
    hang        still running at the timeout
    unclean     an uncaught Python exception ("internal error (...)"), several lines or a
                traceback on stderr, or another exit status

Failures are grouped into kinds (signal + the llama.cpp/ggml line that came last + the innermost
gaze_edge function, or the exception type + its message with numbers blanked); the first inputs
of each kind are kept under --out/<class>/<kind>/ with the recipe that makes them from the seed
(recipe.json: seed file and the byte edits) and the child's stderr. A JSON summary ends the run
(inputs, ok, clean errors, crashes, hangs, unclean, distinct kinds) and is written to
--out/summary.json. Exit status: 0 when nothing crashed, hung or failed uncleanly, else 1.
--unguarded turns gaze_edge.runtime.gguf_check off in the children, to see what llama.cpp
alone makes of the same inputs.

Mutations (1 to 4 per input, seeded by --seed and the input's number): bit flips and random bytes
in the first 4 KiB (GGUF metadata) or anywhere; truncation; extension; integer fields at the
offsets gguf-py's GGUFReader finds (header counts, KV types, string lengths, array counts, values,
tensor dims, types and offsets) set to extremes (0, -1, 2^31, 2^63, ...) and float fields to
NaN/inf; for images, header fields (PNG IHDR with its CRC fixed, JPEG SOF, GIF screen and frame,
WebP VP8/VP8L/VP8X sizes) set to extremes, and chunk data mutated with the PNG CRC fixed.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import hashlib
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAD = 4096  # the metadata region: the default mmproj's KV and tensor infos end at 4160
KEEP_PER_KIND = 3  # reproducers kept per distinct failure kind
IMAGE_FORMATS = ("png", "jpeg", "gif", "webp")

# --------------------------------------------------------------------------- recipes


def apply_recipe(data: bytes, ops: list[dict]) -> bytes:
    """The bytes ``ops`` make from ``data``: {"op": "write", "offset", "hex"}, {"op": "truncate",
    "size"}, {"op": "append", "hex"}, in order."""
    out = bytearray(data)
    for op in ops:
        if op["op"] == "write":
            raw = bytes.fromhex(op["hex"])
            end = op["offset"] + len(raw)
            if end > len(out):
                out.extend(b"\0" * (end - len(out)))
            out[op["offset"]:end] = raw
        elif op["op"] == "truncate":
            del out[op["size"]:]
        elif op["op"] == "append":
            out.extend(bytes.fromhex(op["hex"]))
        else:
            raise ValueError(f"unknown op {op['op']!r}")
    return bytes(out)


# --------------------------------------------------------------------------- seeds


@dataclasses.dataclass
class Slot:
    """An integer or float field of a seed file: where it is and what it is."""

    offset: int
    size: int
    kind: str  # "int" or "float"
    label: str  # e.g. "kv clip.vision.patch_size value", "tensor mm.0.weight dim1"


@dataclasses.dataclass
class Seed:
    name: str
    path: Path
    data: bytes
    slots: list[Slot]
    pair: tuple[Path, Path] | None = None  # GGUF seeds: the pair it belongs to (model, mmproj)
    fmt: str = "gguf"


def gguf_slots(path: Path) -> list[Slot]:
    """Integer and float fields of a GGUF, found with gguf-py's GGUFReader."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    base = reader.data.ctypes.data
    slots: list[Slot] = []

    def add(part, label: str, limit: int = 4) -> None:
        if part.dtype.kind not in "iuf" or part.dtype == np.uint8 and part.size > 1:
            return  # the bytes of a string
        for j in range(min(part.size, limit)):
            off = part.ctypes.data - base + j * part.dtype.itemsize
            slots.append(Slot(off, part.dtype.itemsize, "float" if part.dtype.kind == "f" else "int",
                              f"{label}[{j}]" if part.size > 1 else label))

    for name, field in reader.fields.items():
        parts = field.parts
        if name.startswith("GGUF."):
            add(parts[0], f"header {name}")
            continue
        names = ["key length", "key", "type"]
        if field.types and field.types[0].name == "ARRAY":
            names += ["item type", "count"]
        for i, part in enumerate(parts[:12]):
            what = names[i] if i < len(names) else "value"
            if what == "key":
                continue
            add(part, f"kv {name} {what}")
    for t in reader.tensors:
        parts = t.field.parts
        labels = ["name length", "name", "n_dims", "dims", "type", "offset"]
        for label, part in zip(labels, parts, strict=False):
            if label != "name":
                add(part, f"tensor {t.name} {label}")
    return slots


def gguf_seeds(pairs: list[tuple[Path, Path]], target: str) -> list[Seed]:
    seeds = []
    for model, mmproj in pairs:
        path = model if target == "model" else mmproj
        seeds.append(Seed(path.name, path, path.read_bytes(), gguf_slots(path), pair=(model, mmproj)))
    return seeds


def scene(width: int = 64, height: int = 48):
    """A small picture with a few coloured shapes (what the default model knows)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (240, 240, 240))
    d = ImageDraw.Draw(im)
    d.ellipse((4, 4, width // 3, height // 3), fill=(220, 30, 30))
    d.rectangle((width // 2, height // 2, width - 4, height - 4), fill=(30, 30, 220))
    d.polygon([(width // 2, 4), (width - 8, height // 3), (width // 3, height // 3)], fill=(30, 180, 30))
    return im


def image_seeds() -> list[Seed]:
    """Images in each format and the modes users have: PNG (RGB, RGBA, palette, grey, 16-bit,
    interlaced), JPEG (baseline, progressive, grey), GIF (still, animated), WebP (lossy,
    lossless, animated)."""
    from PIL import Image

    im = scene()
    frames = [im, scene(64, 48).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    made: list[tuple[str, str, dict, Image.Image]] = [
        ("rgb.png", "PNG", {}, im),
        ("rgba.png", "PNG", {}, im.convert("RGBA")),
        ("palette.png", "PNG", {}, im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
        ("grey.png", "PNG", {}, im.convert("L")),
        ("grey16.png", "PNG", {}, im.convert("I;16")),
        ("interlaced.png", "PNG", {"interlace": 1}, im),
        ("baseline.jpeg", "JPEG", {"quality": 80}, im),
        ("progressive.jpeg", "JPEG", {"quality": 70, "progressive": True}, im),
        ("grey.jpeg", "JPEG", {}, im.convert("L")),
        ("still.gif", "GIF", {}, im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
        ("animated.gif", "GIF", {"save_all": True, "append_images": frames[1:], "duration": 100, "loop": 0},
         frames[0]),
        ("lossy.webp", "WEBP", {"quality": 70}, im),
        ("lossless.webp", "WEBP", {"lossless": True}, im),
        ("animated.webp", "WEBP", {"save_all": True, "append_images": frames[1:], "duration": 100}, frames[0]),
    ]
    seeds = []
    for name, fmt, kwargs, picture in made:
        buf = io.BytesIO()
        picture.save(buf, fmt, **kwargs)
        data = buf.getvalue()
        seeds.append(Seed(name, Path(name), data, image_slots(data), fmt=name.rsplit(".", 1)[1]))
    return seeds


def image_slots(data: bytes) -> list[Slot]:
    """Header fields of an image file: sizes, depths, chunk lengths (big- or little-endian as the
    format has them; the size says which: negative = big-endian)."""
    slots: list[Slot] = []
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        pos = 8
        while pos + 8 <= len(data):
            length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
            slots.append(Slot(pos, -4, "int", f"png {ctype.decode('latin-1')} length"))
            if ctype == b"IHDR":
                slots += [Slot(pos + 8, -4, "int", "png width"), Slot(pos + 12, -4, "int", "png height"),
                          Slot(pos + 16, 1, "int", "png bit depth"), Slot(pos + 17, 1, "int", "png colour type"),
                          Slot(pos + 20, 1, "int", "png interlace")]
            pos += 12 + length
    elif data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            marker = data[pos + 1]
            length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
            slots.append(Slot(pos + 2, -2, "int", f"jpeg {marker:02x} length"))
            if marker in (0xC0, 0xC1, 0xC2):
                slots += [Slot(pos + 4, 1, "int", "jpeg precision"), Slot(pos + 5, -2, "int", "jpeg height"),
                          Slot(pos + 7, -2, "int", "jpeg width"), Slot(pos + 9, 1, "int", "jpeg components")]
            if marker == 0xDA:
                break
            pos += 2 + length
    elif data[:3] == b"GIF":
        slots += [Slot(6, 2, "int", "gif screen width"), Slot(8, 2, "int", "gif screen height"),
                  Slot(10, 1, "int", "gif flags")]
        for m in re.finditer(rb"\x2c", data[13:]):
            p = 13 + m.start()
            if p + 10 <= len(data):
                slots += [Slot(p + 1, 2, "int", "gif frame left"), Slot(p + 5, 2, "int", "gif frame width"),
                          Slot(p + 7, 2, "int", "gif frame height"), Slot(p + 9, 1, "int", "gif frame flags")]
            break
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        slots.append(Slot(4, 4, "int", "webp riff size"))
        pos = 12
        while pos + 8 <= len(data):
            ctype, length = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
            slots.append(Slot(pos + 4, 4, "int", f"webp {ctype.decode('latin-1')} length"))
            if ctype == b"VP8X":
                slots += [Slot(pos + 12, 3, "int", "webp canvas width"), Slot(pos + 15, 3, "int", "webp canvas height")]
            elif ctype == b"VP8 ":
                slots += [Slot(pos + 14, 2, "int", "webp vp8 width"), Slot(pos + 16, 2, "int", "webp vp8 height")]
            elif ctype == b"VP8L":
                slots.append(Slot(pos + 9, 4, "int", "webp vp8l size bits"))
            elif ctype == b"ANMF":
                slots += [Slot(pos + 14, 3, "int", "webp frame width"), Slot(pos + 17, 3, "int", "webp frame height")]
                pos += 24  # into the frame's own chunks
                continue
            pos += 8 + length + (length & 1)
    return slots


# --------------------------------------------------------------------------- mutations


def _extremes(size: int, old: int, rng: random.Random) -> int:
    bits = 8 * size
    choices = [0, 1, 2, 3, -1, 2**31, 2**31 - 1, 2**32 - 1, 2**63, 2**63 - 1, 2**(bits - 1), 2**(bits - 1) - 1,
               old + 1, old - 1, old * 2, old * 16, old // 2, rng.randrange(0, 64), rng.randrange(0, 2**bits)]
    return rng.choice(choices) % (2**bits)


def _encode_int(value: int, size: int) -> bytes:
    big = size < 0
    n = abs(size)
    return (value % (2 ** (8 * n))).to_bytes(n, "big" if big else "little")


def _png_fix_crcs(data: bytearray) -> None:
    """Recompute every PNG chunk CRC, so a mutation reaches the decoder instead of the CRC check."""
    pos = 8
    while pos + 12 <= len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(data):
            return
        data[end:end + 4] = struct.pack(">I", zlib.crc32(data[pos + 4:end]) & 0xFFFFFFFF)
        pos = end + 4


def mutate(seed: Seed, rng: random.Random) -> list[dict]:
    """Byte edits (a recipe for apply_recipe) of one mutated input made from ``seed``."""
    data = seed.data
    n = len(data)
    ops: list[dict] = []
    tail: list[dict] = []
    is_gguf = seed.fmt == "gguf"
    head = min(HEAD if is_gguf else 64, n)
    strategies = ["flip_head", "bytes_head", "flip_any", "field", "truncate", "extend", "png_chunk"]
    weights = [3, 2, 1, 3, 1, 0.5, 0] if is_gguf else [2, 2, 2, 3, 1, 0.5, 2 if seed.fmt == "png" else 0]
    for _ in range(rng.choice((1, 1, 1, 1, 2, 2, 3, 4))):
        what = rng.choices(strategies, weights)[0]
        if what == "flip_head" or what == "flip_any":
            off = rng.randrange(head if what == "flip_head" else n)
            ops.append({"op": "write", "offset": off, "hex": bytes([data[off] ^ (1 << rng.randrange(8))]).hex(),
                        "why": what})
        elif what == "bytes_head":
            k = rng.randint(1, 4)
            off = rng.randrange(max(1, head - k))
            ops.append({"op": "write", "offset": off, "hex": rng.randbytes(k).hex(), "why": what})
        elif what == "field" and seed.slots:
            slot = rng.choice(seed.slots)
            size = abs(slot.size)
            if slot.kind == "float":
                value = rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e30, -1e-30, 1e-45])
                raw = struct.pack("<f" if size == 4 else "<d", value)
            else:
                old = int.from_bytes(data[slot.offset:slot.offset + size], "big" if slot.size < 0 else "little")
                raw = _encode_int(_extremes(size, old, rng), slot.size)
            ops.append({"op": "write", "offset": slot.offset, "hex": raw.hex(), "why": slot.label})
        elif what == "png_chunk":
            off = rng.randrange(8, n)
            ops.append({"op": "write", "offset": off, "hex": rng.randbytes(rng.randint(1, 8)).hex(),
                        "why": "png chunk data"})
            tail.append({"op": "png_crc"})
        elif what == "truncate":
            size = rng.choice([rng.randrange(head), rng.randrange(n), n - rng.randint(1, 64)])
            tail.append({"op": "truncate", "size": max(0, size), "why": what})
        elif what == "extend":
            tail.append({"op": "append", "hex": rng.randbytes(rng.choice([1, 7, 64, 4096])).hex(), "why": what})
    if seed.fmt == "png" and ops and rng.random() < 0.7:  # most edits should reach the decoder, not the CRC check
        tail.append({"op": "png_crc"})
    if not ops and not tail:
        off = rng.randrange(head)
        ops.append({"op": "write", "offset": off, "hex": bytes([data[off] ^ 0xFF]).hex(), "why": "flip_head"})
    if any(op["op"] == "png_crc" for op in tail):  # resolve the CRC fix into plain writes
        tail = [op for op in tail if op["op"] != "png_crc"]
        mutated = bytearray(apply_recipe(data, ops))
        before = bytes(mutated)
        _png_fix_crcs(mutated)
        for i in range(len(before)):
            if before[i] != mutated[i]:
                ops.append({"op": "write", "offset": i, "hex": bytes([mutated[i]]).hex(), "why": "png crc"})
    return ops + tail


# --------------------------------------------------------------------------- the child


def _normalise(line: str) -> str:
    """A message with paths, numbers and hex blanked, so that inputs of one kind group together."""
    line = re.sub(r"(/[^\s:'\"]+)+", lambda m: Path(m.group(0)).name, line)
    line = re.sub(r"0x[0-9a-fA-F]+", "X", line)
    line = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", line)
    line = re.sub(r"'[^']{20,}'", "'S'", line)
    return line.strip()[:160]


_LLAMA_LOG = {"fd": -1}  # the child's file for llama.cpp's log (see _log_hook)


def run_child(argv: list[str], log: Path, timeout: float, memory: int) -> None:
    """In the forked child: the CLI's chat command on ``argv``, stderr to ``log``, llama.cpp's log
    to ``log`` + ".llama". Never returns."""
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 2)
        _LLAMA_LOG["fd"] = os.open(f"{log}.llama", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        faulthandler.enable(file=sys.stderr, all_threads=False)
        faulthandler.dump_traceback_later(max(1.0, timeout - 1.0), exit=False, file=sys.stderr)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(timeout) + 1)  # SIG_DFL: killed by SIGALRM, counted as a hang
        from gaze_edge import cli

        code = 0
        try:
            cli.main(argv, prog_name="gaze-edge")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - anything past the CLI's own handler
            import traceback

            traceback.print_exc()
            code = 70
    except BaseException:  # noqa: BLE001
        code = 71
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _log_hook() -> None:
    """Make each child write llama.cpp's log to its own file as it comes (a crash loses what
    gaze_edge.runtime.logs keeps in memory): the last line before a crash says where it was."""
    from gaze_edge.runtime import logs

    original = logs._on_log

    def on_log(level: int, text: bytes, user_data) -> None:
        if text and _LLAMA_LOG["fd"] >= 0:
            try:
                os.write(_LLAMA_LOG["fd"], text)
            except OSError:
                pass
        original(level, text, user_data)

    logs._on_log = on_log


@dataclasses.dataclass
class Outcome:
    index: int
    cls: str  # ok, clean, crash, hang, unclean
    kind: str
    seconds: float
    stderr: str


def classify(status: int, stderr: str, timed_out: bool, llama_log: str = "") -> tuple[str, str]:
    """(class, kind) of a finished child from its wait status, stderr and llama.cpp log."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    ours = [ln for ln in lines if not ln.startswith(" ")]
    llama = [ln.strip() for ln in llama_log.splitlines() if ln.strip().strip(".")]
    frames = re.findall(r'File "([^"]+)", line \d+ in (\w+)', stderr)
    ours_frame = next((f"{Path(f).stem}.{fn}" for f, fn in frames if "gaze_edge" in f), "")
    asserts = [ln for ln in lines if "GGML_ASSERT" in ln or "GGML_ABORT" in ln or "terminate called" in ln
               or "what():" in ln]
    last_llama = llama[-1] if llama else ""
    errors = [ln for ln in lines if ln.startswith("gaze-edge: error:")]
    where = _normalise(asserts[-1] if asserts else last_llama)
    if timed_out or (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM):
        return "hang", f"hang | {where} | {ours_frame}"
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        if any("bad_alloc" in ln for ln in asserts):
            name += " (out of memory)"
        return "crash", f"{name} | {where} | {ours_frame}"
    code = os.WEXITSTATUS(status)
    if code == 0:
        return "ok", "ok"
    message = errors[-1][len("gaze-edge: error:"):].strip() if errors else ""
    if code == 1 and message:
        if "internal error (MemoryError)" in message:
            return "crash", f"out of memory (MemoryError) | {_normalise(message)}"
        if message.startswith("internal error ("):
            return "unclean", _normalise(message)
        stray = [ln for ln in ours if not ln.startswith(("gaze-edge: error:", "gaze-edge: warning:"))]
        if "Traceback" in stderr or stray:
            return "unclean", f"stray output | {_normalise(stray[0] if stray else 'Traceback')}"
        return "clean", _normalise(message)
    return "unclean", f"exit {code} | {_normalise(ours[-1] if ours else where)}"


# --------------------------------------------------------------------------- the fork server


@dataclasses.dataclass
class Running:
    index: int
    pid: int
    start: float
    log: Path
    ops: list[dict]
    seed: Seed
    input_path: Path


def _import_runtime(retries: int = 20) -> None:
    """Import what the chat command uses, once. A rebuild of the runtime can make the import fail
    for a minute: then wait and start this script again (a half-imported llama_cpp cannot be
    imported twice in one process), at most ``retries`` times."""
    try:
        from PIL import Image

        import gaze_edge.chat  # noqa: F401
        import gaze_edge.cli  # noqa: F401
        import gaze_edge.conversation  # noqa: F401
        import gaze_edge.images  # noqa: F401
        import gaze_edge.runtime.gguf_check  # noqa: F401
        import gaze_edge.runtime.model  # noqa: F401
        import gaze_edge.runtime.session  # noqa: F401

        Image.init()
    except ImportError as e:
        attempt = int(os.environ.get("GAZE_FUZZ_IMPORT_ATTEMPT", "0"))
        if attempt >= retries:
            raise
        print(f"fuzz: import failed ({e}); retrying in 30 s", file=sys.stderr, flush=True)
        time.sleep(30)
        os.environ["GAZE_FUZZ_IMPORT_ATTEMPT"] = str(attempt + 1)
        os.execv(sys.executable, [sys.executable, *sys.argv])


def _slug(kind: str) -> str:
    return hashlib.sha1(kind.encode()).hexdigest()[:10]


class Fuzzer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.scratch = Path(tempfile.mkdtemp(prefix="gaze-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir()
                                             else None))
        self.pairs = [(Path(m), Path(p)) for m, p in args.pair] or [default_pair()]
        self.image = self.scratch / "scene.png"
        scene(196, 196).save(self.image)
        if args.target == "image":
            self.seeds = image_seeds()
        else:
            self.seeds = gguf_seeds(self.pairs, args.target)
        self.counts: Counter[str] = Counter()
        self.kinds: dict[str, dict] = {}
        self.clean_kinds: Counter[str] = Counter()

    def argv(self, seed: Seed, path: Path) -> list[str]:
        model, mmproj = self.pairs[0] if seed.pair is None else seed.pair
        image = self.image
        if self.args.target == "model":
            model = path
        elif self.args.target == "mmproj":
            mmproj = path
        else:
            image = path
        return ["chat", "-m", str(model), "--mmproj", str(mmproj), "--image", str(image), "-p", "hi",
                "-n", str(self.args.tokens), "-q", "-t", str(self.args.threads)]

    def start(self, index: int, slot: int) -> Running:
        rng = random.Random(f"{self.args.seed}:{self.args.target}:{index}")
        seed = rng.choice(self.seeds)
        ops = mutate(seed, rng)
        folder = self.scratch / f"slot{slot}"
        folder.mkdir(exist_ok=True)
        suffix = ".gguf" if seed.fmt == "gguf" else f".{seed.fmt}"
        prefix = "mmproj-fuzz" if self.args.target == "mmproj" else "fuzz"
        path = folder / f"{prefix}{suffix}"
        path.write_bytes(apply_recipe(seed.data, ops))
        log = folder / "stderr.txt"
        argv = self.argv(seed, path)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(argv, log, self.args.timeout, int(self.args.memory_gib * 2**30))
        return Running(index, pid, time.monotonic(), log, ops, seed, path)

    def finish(self, run: Running, status: int, timed_out: bool) -> Outcome:
        try:
            stderr = run.log.read_text(errors="replace")[-20000:]
            llama_log = Path(f"{run.log}.llama").read_text(errors="replace")[-20000:]
        except OSError:
            stderr, llama_log = "", ""
        cls, kind = classify(status, stderr, timed_out, llama_log)
        outcome = Outcome(run.index, cls, kind, time.monotonic() - run.start, stderr)
        self.counts[cls] += 1
        if cls == "clean":
            self.clean_kinds[kind] += 1
        elif cls != "ok":
            self.keep(run, outcome)
        return outcome

    def keep(self, run: Running, outcome: Outcome) -> None:
        entry = self.kinds.setdefault(outcome.kind, {"class": outcome.cls, "kind": outcome.kind, "count": 0,
                                                     "first_input": run.index, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) >= KEEP_PER_KIND:
            return
        folder = self.out / outcome.cls / _slug(outcome.kind) / str(run.index)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.input_path, folder / run.input_path.name)
        (folder / "stderr.txt").write_text(outcome.stderr)
        shutil.copyfile(f"{run.log}.llama", folder / "llama-log.txt")
        recipe = {"target": self.args.target, "seed_file": str(run.seed.path), "seed_name": run.seed.name,
                  "seed_sha256": hashlib.sha256(run.seed.data).hexdigest(), "ops": run.ops,
                  "kind": outcome.kind, "command": ["gaze-edge", *self.argv(run.seed, folder / run.input_path.name)]}
        (folder / "recipe.json").write_text(json.dumps(recipe, indent=1))
        entry["examples"].append(str(folder))

    def run(self) -> dict:
        from tqdm import tqdm

        from gaze_edge.bench.warm import cpu_name

        args = self.args
        begin = time.monotonic()
        running: dict[int, Running] = {}
        free = list(range(args.workers))
        slot_of: dict[int, int] = {}
        index = 0
        bar = tqdm(total=args.n, desc=f"fuzz {args.target}", unit="input", dynamic_ncols=True,
                   disable=args.quiet)
        try:
            while index < args.n or running:
                while index < args.n and free:
                    slot = free.pop()
                    run = self.start(index, slot)
                    running[run.pid] = run
                    slot_of[run.pid] = slot
                    index += 1
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    now = time.monotonic()
                    for run in list(running.values()):
                        if now - run.start > args.timeout + 5:  # the alarm did not fire: kill it
                            os.kill(run.pid, signal.SIGKILL)
                            _, status = os.waitpid(run.pid, 0)
                            self._done(running.pop(run.pid), status, True, bar)
                            free.append(slot_of.pop(run.pid))
                    time.sleep(0.002)
                    continue
                if pid in running:
                    self._done(running.pop(pid), status, False, bar)
                    free.append(slot_of.pop(pid))
        finally:
            bar.close()
            for run in running.values():
                os.kill(run.pid, signal.SIGKILL)
            shutil.rmtree(self.scratch, ignore_errors=True)
        seconds = time.monotonic() - begin
        failures = sorted(self.kinds.values(), key=lambda e: (-e["count"], e["kind"]))
        summary = {
            "target": args.target, "inputs": index, "ok": self.counts["ok"], "clean_errors": self.counts["clean"],
            "crashes": self.counts["crash"], "hangs": self.counts["hang"], "unclean": self.counts["unclean"],
            "distinct_failure_kinds": len(failures), "failure_kinds": failures,
            "clean_error_kinds": len(self.clean_kinds),
            "top_clean_errors": [{"message": k, "count": c} for k, c in self.clean_kinds.most_common(25)],
            "seconds": round(seconds, 1), "inputs_per_second": round(index / seconds, 2) if seconds else None,
            "seed": args.seed, "unguarded": args.unguarded, "workers": args.workers, "timeout": args.timeout, "memory_gib": args.memory_gib,
            "machine": cpu_name(), "seeds": [s.name for s in self.seeds],
            "command": " ".join([".venv/bin/python", "scripts/fuzz.py", *sys.argv[1:]]),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _done(self, run: Running, status: int, timed_out: bool, bar) -> None:
        outcome = self.finish(run, status, timed_out)
        bar.update(1)
        bar.set_postfix(ok=self.counts["ok"], clean=self.counts["clean"], crash=self.counts["crash"],
                        hang=self.counts["hang"], unclean=self.counts["unclean"], refresh=False)
        if outcome.cls not in ("ok", "clean") and self.args.verbose:
            tqdm_write(f"[{run.index}] {outcome.cls}: {outcome.kind}")


def tqdm_write(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def default_pair_paths() -> list[str]:
    """The default pair's two paths, without importing the runtime (the pair's naming rule:
    gaze_edge.runtime.model.find_model_files)."""
    folder = ROOT / "gaze_edge" / "models" / "default"
    mmproj = next(folder.glob("mmproj-*.gguf"))
    return [str(folder / mmproj.name[len("mmproj-"):]), str(mmproj)]


def tiny_gemma3_pair() -> list[str]:
    """The tiny Gemma 3 pair's paths, built (torch, transformers, llama.cpp's converter) in a
    child process the first time, so that none of that is imported into the fork server."""
    code = ("import sys; sys.path.insert(0, 'tests'); from gemma3_tiny import gemma3_pair; "
            "p = gemma3_pair(); print(p.llm); print(p.mmproj)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()[-2:]


def default_pair() -> tuple[Path, Path]:
    from gaze_edge.default_model import DEFAULT_DIR
    from gaze_edge.runtime.model import find_model_files

    files = find_model_files(DEFAULT_DIR)
    return files.model, files.mmproj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("model", "mmproj", "image"), required=True)
    parser.add_argument("--n", type=int, default=300, help="inputs to run (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutations (default 0)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per input before it is a hang")
    parser.add_argument("--workers", type=int, default=1, help="inputs run at once (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each chat (default 1)")
    parser.add_argument("--tokens", type=int, default=2, help="tokens each chat generates (default 2)")
    parser.add_argument("--memory-gib", type=float, default=4.0, help="address-space limit of each input")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("MODEL", "MMPROJ"),
                        help="a GGUF pair to seed from (repeatable; default: the embedded default pair)")
    parser.add_argument("--tiny-gemma3", action="store_true",
                        help="seed from the tiny Gemma 3 pair of tests/gemma3_tiny.py too (built once, cached)")
    parser.add_argument("--out", default=None, help="where reproducers and summary.json go "
                        "(default: <temp dir>/gaze-edge-fuzz/<target>)")
    parser.add_argument("--unguarded", action="store_true",
                        help="turn gaze_edge.runtime.gguf_check off in the children: what llama.cpp alone does")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="print each failure as it happens")
    args = parser.parse_args(argv)
    args.out = args.out or str(Path(tempfile.gettempdir()) / "gaze-edge-fuzz" / args.target)
    if args.tiny_gemma3:
        args.pair = [*(args.pair or [default_pair_paths()]), tiny_gemma3_pair()]
    os.environ["GGML_NO_BACKTRACE"] = "1"  # ggml would otherwise attach gdb to each aborting child
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(ROOT))
    _import_runtime()
    _log_hook()
    if args.unguarded:
        from gaze_edge.runtime import gguf_check

        gguf_check.check_model = gguf_check.check_projector = lambda *a, **k: None
    summary = Fuzzer(args).run()
    short = {k: v for k, v in summary.items() if k not in ("failure_kinds", "top_clean_errors")}
    short["failure_kinds"] = [{k: e[k] for k in ("class", "kind", "count", "examples")}
                              for e in summary["failure_kinds"]]
    print(json.dumps(short, indent=1))
    return 1 if summary["crashes"] or summary["hangs"] or summary["unclean"] else 0


if __name__ == "__main__":
    sys.exit(main())
