"""The pinned llama.cpp converter (convert_hf_to_gguf.py's ``conversion`` package), run in a child
process on one part of a checkpoint: the language model, or a projector llama.cpp supports.

Why a child process and not an import: the converter is written against the gguf-py of its own
tree, which differs from the ``gguf`` release installed here under the same version number (2k
lines of constants.py alone) and would shadow it for the rest of the process; it also registers
global state (its ``conversion`` package, logging). A child keeps the two apart, and an
interrupted conversion stops with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gaze_edge.convert.errors import ConvertError
from gaze_edge.convert.gaze import KeyValue

CHILD = Path(__file__).with_name("_llama_cpp_child.py")


def llama_cpp_dir() -> Path:
    """The patched vendor/llama.cpp tree (unpacked once by the runtime builder)."""
    from gaze_edge.runtime import build

    try:
        path = build.source_dir()
    except build.BuildError as err:
        raise ConvertError(f"cannot get the pinned llama.cpp converter: {err}") from err
    if not (path / "conversion").is_dir() or not (path / "gguf-py").is_dir():
        raise ConvertError(f"{path} has no llama.cpp converter (conversion/, gguf-py/)")
    return path


@dataclass
class Part:
    """One GGUF for the converter to write: the ``kind`` part ("text" or "mmproj") of model_dir,
    with llama.cpp's class for ``hf_arch``, at ``outtype`` (f32 or f16)."""

    kind: str
    model_dir: Path
    hf_arch: str
    outfile: Path
    outtype: str
    name: str
    pre_tokenizer_fallback: str | None = None
    extra_keys: list[KeyValue] = field(default_factory=list)
    extra_tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def what(self) -> str:
        return "language model" if self.kind == "text" else "vision projector"


def run(parts: list[Part], progress: bool = True) -> list[str]:
    """Write every part in one child process (the converter's imports are paid once).

    Returns the GGUF architecture of each part (e.g. "qwen2vl"); raises ConvertError on failure.
    """
    with tempfile.TemporaryDirectory(prefix="gaze-edge-convert-") as tmp:
        tmp = Path(tmp)
        jobs = []
        for p, part in enumerate(parts):
            tensors = {}
            for i, (tname, array) in enumerate(part.extra_tensors.items()):
                npy = tmp / f"part{p}-tensor{i}.npy"
                np.save(npy, np.ascontiguousarray(array, dtype=np.float32))
                tensors[tname] = str(npy)
            jobs.append({
                "kind": part.kind, "model_dir": str(part.model_dir), "hf_arch": part.hf_arch,
                "outfile": str(part.outfile), "outtype": part.outtype, "name": part.name,
                "pre_tokenizer_fallback": part.pre_tokenizer_fallback,
                "extra_keys": [kv.to_json() for kv in part.extra_keys], "extra_tensors": tensors,
            })
        result_path = tmp / "result.json"
        job = {"llama_cpp_dir": str(llama_cpp_dir()), "parts": jobs, "progress": progress,
               "result": str(result_path)}
        (tmp / "job.json").write_text(json.dumps(job))
        env = dict(os.environ, PYTHONNOUSERSITE="1")
        proc = subprocess.run([sys.executable, str(CHILD), str(tmp / "job.json")], env=env,
                              stdout=subprocess.DEVNULL, stderr=None if progress else subprocess.PIPE,
                              text=True)
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if proc.returncode == 0 and result and result.get("ok"):
        return result["archs"]
    if result and "error" in result:
        what = parts[result.get("part", 0)].what
        raise ConvertError(f"llama.cpp's converter failed on the {what}: {result['error'].splitlines()[0]}",
                           detail=result.get("traceback"))
    raise ConvertError(f"llama.cpp's converter failed (exit code {proc.returncode})", detail=proc.stderr)
