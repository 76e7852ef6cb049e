"""HF checkpoints (dense or gaze) to GGUF: installed as ``gaze_edge.convert``.

    from gaze_edge.convert import convert, ConvertError
    llm, mmproj = convert("path/to/hf-folder", "out/", outtype="f16")

See docs/CONVERT.md. Heavy dependencies (torch, transformers, gguf, llama_cpp) load on first use.
"""

from gaze_edge.convert.errors import ConvertError

__all__ = ["OUTTYPES", "ConvertError", "convert"]

OUTTYPES = ("f32", "f16", "q8_0", "q4_k_m")


def convert(src, outdir, outtype="f16", name=None, progress=True):
    """Convert checkpoint ``src`` (local HF folder or Hub repo id; dense or gaze) into ``outdir``:
    ``<name>-<outtype>.gguf`` and ``mmproj-<name>-<outtype>.gguf``; returns their paths.

    outtype: one of OUTTYPES. name: file base name (default: the folder's or repo's name).
    Raises ConvertError (a one-line message) for anything a user can fix; a failed or
    interrupted conversion leaves no .gguf in outdir. Details: gaze_edge.convert.pipeline.convert.
    """
    from gaze_edge.convert.pipeline import convert as _convert

    return _convert(src, outdir, outtype=outtype, name=name, progress=progress)
