"""Run the pinned llama.cpp converter on one part of a checkpoint (child process; see llama_cpp.py).

Usage: python _llama_cpp_child.py JOB.json

Runs as a plain script, not as part of gaze_edge, so that the ``gguf`` it imports is the pinned
tree's gguf-py (which its converter is written against) and never the installed one. Each part
of the job names the converter class (by HF architecture), the output file, extra gaze
keys/tensors and the pre-tokenizer to use when llama.cpp does not know the vocabulary's hash.
The outcome (the GGUF architecture of each part, or the error) is written as JSON to the job's
``result`` path.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path


def _convert(part: dict, progress: bool) -> str:
    import gguf  # noqa: I001  (the pinned gguf-py: main() put it first on sys.path)
    import numpy as np
    import torch
    from conversion import get_model_class

    base = get_model_class(part["hf_arch"], mmproj=part["kind"] == "mmproj")
    fallback = part.get("pre_tokenizer_fallback")
    extra_keys = part.get("extra_keys", [])
    extra_tensors = part.get("extra_tensors", {})

    class Model(base):  # the pinned class, plus gaze keys/tensors and the pre-tokenizer mapping
        model_arch = base.model_arch

        def get_vocab_base_pre(self, tokenizer):
            log = logging.getLogger("hf-to-gguf")
            level = log.level
            log.setLevel(logging.ERROR)  # its "not recognized" banner is expected when we map
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                if fallback:
                    return fallback
                raise
            finally:
                log.setLevel(level)

        def set_gguf_parameters(self):
            super().set_gguf_parameters()
            arch = self.gguf_writer.arch
            for kv in extra_keys:
                sub = gguf.GGUFValueType[kv["sub_type"]] if kv.get("sub_type") else None
                self.gguf_writer.add_key_value(kv["key"].format(arch=arch), kv["value"],
                                               gguf.GGUFValueType[kv["vtype"]], sub_type=sub)

        def prepare_tensors(self):
            super().prepare_tensors()
            for name, npy in extra_tensors.items():
                self.gguf_writer.add_tensor(name, np.ascontiguousarray(np.load(npy), dtype=np.float32))

        def write(self):  # ModelBase.write, with the progress bar optional
            self.prepare_tensors()
            self.prepare_metadata(vocab_only=False)
            self.gguf_writer.write_header_to_file(path=self.fname_out)
            self.gguf_writer.write_kv_data_to_file()
            self.gguf_writer.write_tensors_to_file(progress=progress)
            self.gguf_writer.close()

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}[part["outtype"]]
    with torch.inference_mode():
        model = Model(Path(part["model_dir"]), ftype, Path(part["outfile"]), model_name=part.get("name"))
        model.write()
    return model.gguf_writer.arch


def main(argv: list[str]) -> int:
    # this script's folder (gaze_edge/convert) must not shadow top-level modules in the child
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != here]
    job = json.loads(Path(argv[1]).read_text())
    llama_dir = Path(job["llama_cpp_dir"])
    sys.path[:0] = [str(llama_dir / "gguf-py"), str(llama_dir)]
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # transformers 5 writes rope_type "default" (no scaling), which this converter does not name
    logging.getLogger("hf-to-gguf").addFilter(lambda r: r.getMessage() != "Unknown RoPE type: default")
    result: dict = {"ok": True, "archs": []}
    code = 0
    for i, part in enumerate(job["parts"]):
        try:
            result["archs"].append(_convert(part, bool(job.get("progress", True))))
        except BaseException as err:  # report everything, KeyboardInterrupt included, then fail
            result = {"ok": False, "part": i, "error": f"{type(err).__name__}: {err}".strip(),
                      "traceback": traceback.format_exc()}
            code = 1
            break
    Path(job["result"]).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
