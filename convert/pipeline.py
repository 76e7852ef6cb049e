"""``convert()``: an HF checkpoint (dense or gaze) to a language-model GGUF and an mmproj GGUF.

Steps: resolve SRC (folder or Hub id) -> check every input (config, family, files, gaze parts)
-> language model with llama.cpp's converter -> vision projector (ours for CLIP/LLaVA, llama.cpp's
for Qwen-VL) -> for q8_0/q4_k_m, llama.cpp's quantizer on the f32 files -> publish both files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tqdm import tqdm

from gaze_edge.convert import OUTTYPES, clip_mmproj, gaze, llama_cpp, source
from gaze_edge.convert.errors import ConvertError
from gaze_edge.convert.families import (
    MMPROJ_CLIP_MLP,
    MMPROJ_LLAMA_CPP,
    family_for,
    text_converter,
)
from gaze_edge.convert.output import staged_outputs
from gaze_edge.convert.quantize import quantize, require_quantizer
from gaze_edge.convert.tokenizer import pre_tokenizer_fallback

# The mmproj's type for each outtype: vision encoders are small and sensitive, so a quantized
# language model is paired with a q8_0 projector (what ggml-org publishes next to Q4_K_M models).
MMPROJ_TYPE = {"f32": "f32", "f16": "f16", "q8_0": "q8_0", "q4_k_m": "q8_0"}


def output_names(name: str, outtype: str) -> tuple[str, str]:
    """(language model, mmproj) file names, llama.cpp style."""
    return f"{name}-{outtype}.gguf", f"mmproj-{name}-{outtype}.gguf"


def default_name(src: str | os.PathLike, folder: Path) -> str:
    """The model's name for file names: the folder's name, or the repo's name for a Hub id."""
    text = str(src)
    if not Path(text).expanduser().is_dir() and source.looks_like_repo_id(text):
        return text.split("/")[-1]
    return folder.resolve().name


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[gaze-edge convert] {msg}", file=sys.stderr, flush=True)


def convert(src: str | os.PathLike, outdir: str | os.PathLike, outtype: str = "f16",
            name: str | None = None, progress: bool = True) -> tuple[Path, Path]:
    """Convert checkpoint ``src`` (local HF folder or Hub repo id) into ``outdir``.

    Writes ``outdir/<name>-<outtype>.gguf`` (language model) and
    ``outdir/mmproj-<name>-<outtype>.gguf`` (vision projector; q8_0 for both quantized outtypes).
    A gaze checkpoint gets its gaze keys and context tokens (see gaze.py); a dense one none.
    Returns (language model path, mmproj path). Raises ConvertError (one-line message) for any
    input a user can fix; on any failure nothing is left in outdir.
    """
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    folder = source.resolve_source(src)
    config = source.read_config(folder)
    family = family_for(config)
    shards = source.check_complete(folder)
    processor = source.image_processor_config(folder)
    gaze_parts = gaze.read_gaze(folder, config)
    shard_paths = {folder / f: names for f, names in shards.items()}
    if family.mmproj == MMPROJ_CLIP_MLP:
        clip_mmproj.check(config, processor, shard_paths)
    if outtype not in ("f32", "f16"):
        require_quantizer(outtype)
    name = name or default_name(src, folder)
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise ConvertError(f"invalid model name {name!r} (it becomes part of the file names)")

    base = outtype if outtype in ("f32", "f16") else "f32"
    llm_name, mmproj_name = output_names(name, outtype)
    kind = "gaze" if gaze_parts else "dense"
    _say(progress, f"{family.name} ({kind}) from {folder} -> {outdir} at {outtype}")
    with staged_outputs(Path(outdir)) as stage:
        llm_out, mmproj_out = stage.output(llm_name), stage.output(mmproj_name)
        llm_base = llm_out if base == outtype else stage.path(f"llm-{base}.gguf")
        mmproj_base = mmproj_out if MMPROJ_TYPE[outtype] == base else stage.path(f"mmproj-{base}.gguf")

        keys, tensors = gaze.mmproj_keys(gaze_parts), gaze.mmproj_tensors(gaze_parts)
        parts = [llama_cpp.Part("text", folder, text_converter(family, config), llm_base, base, name,
                                pre_tokenizer_fallback=pre_tokenizer_fallback(folder),
                                extra_keys=gaze.llm_keys(gaze_parts, _text_layers(config)))]
        if family.mmproj == MMPROJ_LLAMA_CPP:
            parts.append(llama_cpp.Part("mmproj", folder, config["architectures"][0], mmproj_base, base, name,
                                        extra_keys=keys, extra_tensors=tensors))
        _say(progress, f"{' and '.join(p.what for p in parts)} with llama.cpp's converter")
        llama_cpp.run(parts, progress=progress)
        if family.mmproj == MMPROJ_CLIP_MLP:
            _say(progress, "vision projector (CLIP + MLP projector, written with gguf)")
            clip_mmproj.write(mmproj_base, config, processor, shard_paths, base, name, keys, tensors,
                              progress=progress)

        if outtype not in ("f32", "f16"):
            _say(progress, f"quantizing with llama.cpp: language model {outtype}, "
                           f"projector {MMPROJ_TYPE[outtype]}")
            jobs = [(llm_base, llm_out, outtype), (mmproj_base, mmproj_out, MMPROJ_TYPE[outtype])]
            for job in tqdm(jobs, desc="quantizing", unit="file", disable=not progress):
                quantize(*job)
        llm_path, mmproj_path = stage.publish()
    _say(progress, f"wrote {llm_path} and {mmproj_path}")
    return llm_path, mmproj_path


def _text_layers(config: dict) -> int | None:
    """The text model's layer count from an HF config (LLaVA's text_config, Qwen2-VL's own)."""
    text = config.get("text_config") or config
    n = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    return int(n) if n is not None else None
