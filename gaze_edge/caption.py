"""Captioning many images with one loaded model, into a JSON-lines file that a rerun resumes.

    summary = caption(model, ["photos/", "extra.jpg"], jsonl="captions.jsonl")

writes one line per image, in order, appended and flushed one at a time::

    {"path": "photos/a.png", "text": "...", "finish_reason": "stop", "prompt_tokens": 212,
     "generated_tokens": 9, "prompt_seconds": 0.08, "generate_seconds": 0.1, "ms_per_token": 11.1,
     "visual_kv_fraction": 0.27}
    {"path": "photos/b.png", "error": "not an image (or an unsupported format): photos/b.png"}

Which files: a file named in ``inputs`` is always tried, whatever its name. A folder gives the
files in it whose extension Pillow knows (``.png``, ``.jpg``, ``.webp``, ...), sorted by name;
other files there (captions in ``.txt``, ``.json`` side files) are not images and are left out,
and so are hidden files (``.DS_Store``, ``._a.png``). A file with an image extension that does
not decode gets an error line. ``recursive=True`` also walks the sub-folders.

Resume (the default): images whose path already has a caption line are skipped. Error lines are
retried (the file may have been fixed): they are dropped from the file before the run, so the file
ends with one line per image. A last line cut short by a crash is dropped and its image redone.
Paths are compared after resolving them (relative ones against the current folder). With
``resume=False`` the file is started over.

``caption_images`` is the same without the file: it yields the lines as dicts.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gaze_edge.errors import ContextOverflowError, GazeEdgeError, ImageError
from gaze_edge.files import write_atomic

DEFAULT_PROMPT = "Describe the image."


@dataclass
class CaptionSummary:
    """What a ``caption`` run did."""

    jsonl: Path
    total: int  # images found
    captioned: int  # captioned by this run
    skipped: int  # already captioned in the file
    failures: list[dict] = field(default_factory=list)  # this run's error lines

    @property
    def failed(self) -> int:
        return len(self.failures)

    def __str__(self) -> str:
        parts = [f"captioned {self.captioned} of {self.total} images"]
        if self.skipped:
            parts.append(f"{self.skipped} already done")
        parts.append(f"{self.failed} failed")
        return ", ".join(parts) + f" -> {self.jsonl}"


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) that Pillow opens."""
    from PIL import Image

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def find_images(inputs: Iterable[str | os.PathLike], *, recursive: bool = False) -> list[Path]:
    """The image files named by ``inputs`` (files, or folders expanded as the module docstring
    says), in order, each once. A name that does not exist is kept: it gets an error line.
    Raises GazeEdgeError when nothing is found."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    extensions = image_extensions()
    found: list[Path] = []
    seen: set[str] = set()
    named = []
    for item in inputs:
        path = Path(item)
        named.append(str(path))
        for p in _folder_images(path, extensions, recursive) if path.is_dir() else [path]:
            key = _key(p)
            if key not in seen:
                seen.add(key)
                found.append(p)
    if not found:
        raise GazeEdgeError(f"no images found in {', '.join(named) or 'no inputs'}")
    return found


def _folder_images(folder: Path, extensions: frozenset[str], recursive: bool) -> list[Path]:
    found = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if recursive:
                found.extend(_folder_images(entry, extensions, recursive))
        elif entry.suffix.lower() in extensions:
            found.append(entry)
    return found


def caption_images(model, paths: Iterable[str | os.PathLike], *, prompt: str = DEFAULT_PROMPT,
                   **chat_options) -> Iterator[dict]:
    """One line (a dict) per image, as it is captioned: ``model.chat(prompt, image=..., trace=True,
    **chat_options)``'s numbers and its text (stripped), or {"path", "error"} for an image that
    cannot be captioned (it does not load, or does not fit the context)."""
    from gaze_edge.images import load_image

    if not model.has_vision:
        raise GazeEdgeError("this model has no vision projector (mmproj): it cannot caption images "
                            "(load a folder with its mmproj-*.gguf, or give the mmproj file)")
    for path in paths:
        path = str(path)
        try:
            picture = load_image(path)  # decoded once, here: chat takes the decoded image
            result = model.chat(prompt, image=picture, trace=True, **chat_options)
        except (ImageError, ContextOverflowError, RuntimeError) as e:  # RuntimeError: mtmd refused it
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            yield {"path": path, "error": message}
            continue
        record = result.to_dict()
        yield {"path": path, **record, "text": record["text"].strip()}


def caption(
    model,
    inputs: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    jsonl: str | os.PathLike,
    prompt: str = DEFAULT_PROMPT,
    resume: bool = True,
    recursive: bool = False,
    progress: bool | None = None,
    **chat_options,
) -> CaptionSummary:
    """Caption every image of ``inputs`` into ``jsonl`` (see the module docstring).

    progress: None shows a bar (tqdm, when installed) on a terminal's stderr, False never, True
      always. chat_options: passed to ``model.chat`` (max_tokens, temperature, seed, gaze,
      keep_ratio, ...).
    Returns a CaptionSummary; the caller decides what failures mean (the CLI exits 1).
    """
    paths = find_images(inputs, recursive=recursive)
    out = Path(jsonl)
    done = _prepare(out, resume)
    todo = [p for p in paths if _key(p) not in done]
    summary = CaptionSummary(jsonl=out, total=len(paths), captioned=0, skipped=len(paths) - len(todo))
    bar = _progress_bar(progress, total=len(paths), initial=summary.skipped)
    try:
        with out.open("a", encoding="utf-8") as f:
            for record in caption_images(model, todo, prompt=prompt, **chat_options):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                if "error" in record:
                    summary.failures.append(record)
                else:
                    summary.captioned += 1
                if bar is not None:
                    bar.update(1)
                    if summary.failures:
                        bar.set_postfix(failed=summary.failed, refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return summary


def _key(path: str | os.PathLike) -> str:
    """What decides that two paths name the same image."""
    return os.path.realpath(os.path.expanduser(path))


def _prepare(out: Path, resume: bool) -> set[str]:
    """Make ``out`` ready for appending; return the keys of the images already captioned in it.

    Keeps the first caption line of each path, in order; drops error lines (they are retried),
    repeated paths and a last line cut short; rewrites the file (atomically) when it dropped any.
    A damaged line elsewhere is not ours to delete: GazeEdgeError.
    """
    if out.is_dir():
        raise GazeEdgeError(f"the output is a folder, not a .jsonl file: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not resume or not out.exists():
        out.write_bytes(b"")
        return set()
    original = out.read_bytes()
    lines = original.split(b"\n")
    complete = original.endswith(b"\n") or not original
    kept: list[bytes] = []
    done: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            if number == len(lines) and not complete:
                continue  # an interrupted write: redo that image
            raise GazeEdgeError(f"{out} line {number} is not a caption line; fix or remove it (or pass "
                                f"--no-resume to start over)")
        if "error" in record or "text" not in record:
            continue
        key = _key(record["path"])
        if key not in done:
            done.add(key)
            kept.append(line)
    repaired = b"".join(line + b"\n" for line in kept)
    if repaired != original:
        write_atomic(out, repaired)
    return done


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        return None
    return record


def _progress_bar(progress: bool | None, *, total: int, initial: int):
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="image", file=sys.stderr, dynamic_ncols=True)
