"""Check a converted pair against HF transformers (the independent reference).

The GGUFs run through the patched runtime's low-level API (``llama_cpp.llama_cpp`` and
``llama_cpp.mtmd_cpp``), dense, with an f32 KV cache; the checkpoint runs in transformers, f32.
Both get the same image and the same token sequence (llama.cpp's tokens, with each image chunk
standing for as many image-placeholder tokens in HF), and the comparison covers:

- image embeddings: mtmd's output for the image chunk vs ``get_image_features`` (a dense
  conversion: transformers knows no context tokens, so their rows would have no reference),
  also after removing HF's mean token from both: in a random model the projector's bias is
  shared by every token and dominates the plain cosine (a CLS-order bug that scrambles every
  row still scores 0.98 plain, 0.00 centered on the tiny LLaVA);
- the logits that choose the first answer token (last prompt position);
- ``n_decode`` more steps, teacher-forced on HF's greedy tokens so both see the same sequence.

Feed an image at the model's native size (see docs/CONVERT.md): mtmd and transformers resize
differently by design, so only such inputs go through both preprocessors unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TEXT, IMAGE = 0, 1  # MTMD_INPUT_CHUNK_TYPE_*


@dataclass(frozen=True)
class Parity:
    """How close llama.cpp is to transformers on one prompt (cosines of flattened vectors)."""

    n_image_tokens: int
    image_cosine: float
    image_centered_cosine: float  # both minus HF's mean token: the image-dependent part alone
    image_max_abs: float
    first_cosine: float
    first_max_abs: float
    first_argmax_same: bool
    decode_min_cosine: float  # over the n_decode steps after the first
    decode_max_abs: float
    decode_argmax_same: bool
    logit_scale: float  # max |logit| in HF's compared rows, to read the max_abs values against

    def to_dict(self) -> dict:
        return asdict(self)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep llama.cpp's and mtmd's load logs to errors (they print every tensor otherwise)."""
    from llama_cpp import _logger, mtmd_cpp

    level = _logger.logger.level
    _logger.logger.setLevel(logging.ERROR)
    mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        _logger.logger.setLevel(level)


class Runtime:
    """A llama.cpp model + context + mtmd context over one GGUF pair (CPU, f32 KV cache)."""

    def __init__(self, llm: Path, mmproj: Path, n_threads: int | None = None, n_ctx: int = 1024):
        from llama_cpp import llama_cpp as ll
        from llama_cpp import mtmd_cpp as mt

        self.ll, self.mt = ll, mt
        n_threads = n_threads or min(2, os.cpu_count() or 1)
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = 0
        # No repacked "extra" CPU buffers: on CPUs that advertise AMX, ggml picks AMX kernels for
        # quantized weights, and they die with SIGILL where the OS/VM has not enabled AMX (seen on
        # the project's build machine). The plain kernels compute the same products.
        mparams.use_extra_bufts = False
        self.model = ll.llama_model_load_from_file(str(llm).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {llm}")
        n_ctx = min(n_ctx, ll.llama_model_n_ctx_train(self.model))
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.type_k = cparams.type_v = ll.GGML_TYPE_F32
        cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp cannot create a context")
        self.n_batch = n_ctx
        tparams = mt.mtmd_context_params_default()
        tparams.use_gpu = False
        tparams.n_threads = n_threads
        tparams.warmup = False
        tparams.print_timings = False
        self.mctx = mt.mtmd_init_from_file(str(mmproj).encode(), self.model, tparams)
        if not self.mctx:
            raise RuntimeError(f"mtmd cannot load {mmproj}")
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.n_embd = ll.llama_model_n_embd(self.model)

    def close(self) -> None:
        self.mt.mtmd_free(self.mctx)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, prompt: str, image: np.ndarray):
        """mtmd chunks for prompt (with one media marker) and an RGB uint8 image [H, W, 3]."""
        mt = self.mt
        image = np.ascontiguousarray(image, dtype=np.uint8)
        data = image.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = mt.mtmd_bitmap_init(image.shape[1], image.shape[0], data)
        text = mt.mtmd_input_text(prompt.encode(), len(prompt.encode()), True, True)
        chunks = mt.mtmd_input_chunks_init()
        bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = mt.mtmd_tokenize(self.mctx, chunks, ctypes.byref(text), bitmaps, 1)
        mt.mtmd_bitmap_free(bitmap)
        if rc != 0:
            mt.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize failed ({rc})")
        return chunks

    def chunk_list(self, chunks) -> list[tuple[int, object]]:
        """[(TEXT, token ids) | (IMAGE, chunk pointer)] in order."""
        mt = self.mt
        out = []
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(chunk) == TEXT:
                n = ctypes.c_size_t()
                ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                out.append((TEXT, [ptr[j] for j in range(n.value)]))
            else:
                out.append((IMAGE, chunk))
        return out

    def image_embeddings(self, chunk) -> np.ndarray:
        """[n_tokens, n_embd] that mtmd feeds the language model for an image chunk."""
        mt = self.mt
        if mt.mtmd_encode_chunk(self.mctx, chunk) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        n = mt.mtmd_input_chunk_get_n_tokens(chunk)
        ptr = mt.mtmd_get_output_embd(self.mctx)
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()

    def logits_last(self) -> np.ndarray:
        ptr = self.ll.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def eval_prompt(self, chunks) -> int:
        """Evaluate all chunks from position 0; returns n_past (the next position)."""
        new_n_past = self.ll.llama_pos(0)
        rc = self.mt.mtmd_helper_eval_chunks(self.mctx, self.ctx, chunks, 0, 0, self.n_batch, True,
                                             ctypes.byref(new_n_past))
        if rc != 0:
            raise RuntimeError(f"mtmd_helper_eval_chunks failed ({rc})")
        return new_n_past.value

    def decode(self, token: int, pos: int) -> None:
        ll = self.ll
        batch = ll.llama_batch_init(1, 0, 1)
        try:
            batch.n_tokens = 1
            batch.token[0] = token
            batch.pos[0] = pos
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = 0
            batch.logits[0] = 1
            if ll.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        finally:
            ll.llama_batch_free(batch)


def _hf(folder: Path):
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoImageProcessor.from_pretrained(folder)


def _forward(model, ids: list[int], image_token: int, hf_inputs: dict):
    """One full forward of transformers on ids (no cache)."""
    import inspect

    import torch

    input_ids = torch.tensor([ids])
    extra = {}
    # M-RoPE models (Qwen-VL) place image tokens by mm_token_type_ids (1 = image); without it
    # transformers 5 falls back to 1-D positions (Qwen2.5-VL silently, Qwen2-VL with an error).
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        extra["mm_token_type_ids"] = (input_ids == image_token).int()
    return model(input_ids=input_ids, **hf_inputs, **extra)


def compare(folder: str | os.PathLike, llm: str | os.PathLike, mmproj: str | os.PathLike,
            image: np.ndarray, prompt: str, n_decode: int = 8, n_threads: int | None = None) -> Parity:
    """Run checkpoint ``folder`` (transformers) and the GGUF pair (llama.cpp) on ``prompt`` (one
    ``<__media__>`` marker) with ``image`` (RGB uint8 [H, W, 3]) and measure how close they are."""
    import torch
    from PIL import Image

    model, image_processor = _hf(Path(folder))
    hf_inputs = dict(image_processor(images=[Image.fromarray(image)], return_tensors="pt"))
    image_token = model.config.image_token_id
    with torch.no_grad():
        hf_image = model.model.get_image_features(**hf_inputs).pooler_output[0].float().numpy()
    n_grid = hf_image.shape[0]
    with quiet(), Runtime(Path(llm), Path(mmproj), n_threads) as rt:
        chunks = rt.tokenize(prompt, image)
        try:
            ids: list[int] = []
            cpp_image = None
            for kind, item in rt.chunk_list(chunks):
                if kind == TEXT:
                    ids += item
                else:
                    cpp_image = rt.image_embeddings(item)
                    ids += [image_token] * n_grid
            if cpp_image is None:
                raise ValueError("the prompt has no media marker")
            if cpp_image.shape[0] != n_grid:  # e.g. a gaze mmproj's context tokens after the grid
                raise ValueError(f"mtmd's image chunk has {cpp_image.shape[0]} rows, transformers' "
                                 f"{n_grid}: compare a dense conversion")
            n_past = rt.eval_prompt(chunks)
            cpp_logits = [rt.logits_last()]

            with torch.no_grad():
                seq = list(ids)
                for _ in range(n_decode):  # HF's greedy continuation, the teacher-forced tokens
                    out = _forward(model, seq, image_token, hf_inputs)
                    seq.append(int(out.logits[0, -1].argmax()))
                out = _forward(model, seq, image_token, hf_inputs)
                hf_logits = out.logits[0, len(ids) - 1:].float().numpy()  # [n_decode + 1, n_vocab]

            for i, token in enumerate(seq[len(ids):]):
                rt.decode(token, n_past + i)
                cpp_logits.append(rt.logits_last())
        finally:
            rt.mt.mtmd_input_chunks_free(chunks)

    cpp_grid = cpp_image
    cpp = np.stack(cpp_logits)
    dec_cos = [cosine(cpp[i], hf_logits[i]) for i in range(1, len(cpp))]
    return Parity(
        n_image_tokens=n_grid,
        image_cosine=cosine(cpp_grid, hf_image),
        image_centered_cosine=cosine(cpp_grid - hf_image.mean(0), hf_image - hf_image.mean(0)),
        image_max_abs=float(np.abs(cpp_grid - hf_image).max()),
        first_cosine=cosine(cpp[0], hf_logits[0]),
        first_max_abs=float(np.abs(cpp[0] - hf_logits[0]).max()),
        first_argmax_same=bool(cpp[0].argmax() == hf_logits[0].argmax()),
        decode_min_cosine=min(dec_cos) if dec_cos else 1.0,
        decode_max_abs=float(np.abs(cpp[1:] - hf_logits[1:]).max()) if len(cpp) > 1 else 0.0,
        decode_argmax_same=bool((cpp[1:].argmax(-1) == hf_logits[1:].argmax(-1)).all()),
        logit_scale=float(np.abs(hf_logits).max()),
    )
