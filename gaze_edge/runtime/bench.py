"""Decode time with gaze vs dense, on one prefilled cache full of image tokens.

    python -m gaze_edge.runtime.bench --visual 8192 --ratios 0.1 0.25 0.5

A random-weight text model shaped like Qwen2-0.5B (24 layers, hidden 896, 14 heads, 2 KV heads,
head dim 64; vocab 1024) is written to a temporary GGUF (f16 weights). The prompt is text, then
``n_images`` images of ``--grid`` x ``--grid`` random embeddings (each followed by context tokens,
as mtmd would feed them) registered with the runtime, then text. It is prefilled once; every
timed step then appends one generated token and removes it again, so all modes decode on the very
same cache. Modes are interleaved in rounds of a few steps (the machine's speed drifts over minutes;
a mode's first step in a round rebuilds the graph and is not timed) and the median per mode is reported, with the ratio to dense and the share of a dense step spent in
attention (dense step time minus the time of a step over the text alone, over the dense step).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = dict(n_layer=24, n_embd=896, n_head=14, n_head_kv=2, n_ff=4864, n_vocab=1024)


def write_model(path: Path, seed: int = 0, **shape) -> None:
    """A random llama-architecture GGUF of the given shape (f16 matrices, f32 norms)."""
    import gguf

    s = {**SHAPE, **shape}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(32768)
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(s["n_vocab"])])
    w.add_token_scores([0.0] * s["n_vocab"])
    w.add_token_types([gguf.TokenType.NORMAL] * s["n_vocab"])
    n_embd, head = s["n_embd"], s["n_embd"] // s["n_head"]

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", mat(s["n_vocab"], n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", mat(s["n_vocab"], n_embd))
    for i in range(s["n_layer"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(s["n_head_kv"] * head, n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(s["n_head_kv"] * head, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(s["n_ff"], n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(s["n_ff"], n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(n_embd, s["n_ff"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class Bench:
    """One context holding the prefilled sequence; ``step(mode)`` times one generated token."""

    def __init__(self, model_path: Path, n_visual: int, grid: int, n_context: int, region: int,
                 n_threads: int, kv_type: str, gather: bool, focus: float = 0.0) -> None:
        from gaze_edge.runtime import bindings as gz

        self.gz = gz
        ll = self.ll = gz._llama_cpp
        self._silent = ll.llama_log_callback(lambda level, text, _: level >= 4 and sys.stderr.write(text.decode()))
        ll.llama_log_set(self._silent, ctypes.c_void_p(0))
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.use_extra_bufts = False
        self.model = ll.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        n_images = max(1, n_visual // (grid * grid))
        n_ctx = n_images * (grid * grid + n_context) + 256
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        kv = {"f16": ll.GGML_TYPE_F16, "q8_0": ll.GGML_TYPE_Q8_0}[kv_type]
        cparams.type_k = cparams.type_v = kv
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        gz.llama_gaze_set_gather(self.ctx, gather)
        self.n_embd = ll.llama_model_n_embd_inp(self.model)
        self.batch = ll.llama_batch_ext_init(self.ctx)
        self.pos = 0
        self.n_images = n_images
        rng = np.random.default_rng(1)
        self._decode(tokens=list(range(1, 33)))
        self.n_text_pos = self.pos
        for i in range(n_images):
            rows = rng.standard_normal((grid * grid + n_context, self.n_embd), dtype=np.float32)
            if i == 0 and focus:  # a first image whose tokens share a direction: its regions score far above
                # or far below the others, so every selection gathers in it or avoids it (clustered cells)
                rows[: grid * grid] += focus * rng.standard_normal(self.n_embd, dtype=np.float32)
            p0 = self.pos
            for i in range(0, rows.shape[0], 512):
                self._decode(rows=rows[i : i + 512])
            img = gz.llama_gaze_image(0, p0, grid, grid, region, region)
            if gz.llama_gaze_add_image(self.ctx, ctypes.byref(img)) < 0:
                raise RuntimeError("could not register an image")
        self._decode(tokens=list(range(40, 72)))
        self.n_regions = ctypes.c_int32(0)
        gz.llama_gaze_n_images(self.ctx, 0, ctypes.byref(self.n_regions))
        self.n_regions = self.n_regions.value

    def _decode(self, tokens=None, rows=None) -> float:
        ll = self.ll
        ll.llama_batch_ext_clear(self.batch)
        pos = ll.llama_pos(0)
        items = tokens if tokens is not None else range(rows.shape[0])
        idx = -1
        for i, t in enumerate(items):
            if tokens is not None:
                idx = ll.llama_batch_ext_add_token(self.batch, 0, t)
            else:
                e = ll.llama_embd(rows[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd)
                idx = ll.llama_batch_ext_add_embd(self.batch, 0, e)
            pos.value = self.pos
            ll.llama_batch_ext_set_pos(self.batch, idx, ctypes.byref(pos))
            self.pos += 1
        ll.llama_batch_ext_set_output_logits(self.batch, idx, True)
        t0 = time.perf_counter()
        if ll.llama_process(self.ctx, ll.LLAMA_PROCESS_TYPE_DECODE, self.batch) != 0:
            raise RuntimeError("decode failed")
        ll.llama_get_logits_ith(self.ctx, -1)
        return time.perf_counter() - t0

    def step(self, keep_ratio: float | None) -> float:
        """Seconds for one generated token with gaze at keep_ratio (None: dense); the cache is
        left as it was."""
        gz = self.gz
        gz.llama_gaze_set_enabled(self.ctx, keep_ratio is not None)
        if keep_ratio is not None:
            gz.llama_gaze_set_top_k(self.ctx, 0, keep_ratio)
        gz.llama_gaze_set_generated(self.ctx, True)
        dt = self._decode(tokens=[7])
        gz.llama_gaze_set_generated(self.ctx, False)
        self.pos -= 1
        self.ll.llama_memory_seq_rm(self.ll.llama_get_memory(self.ctx), 0, self.pos, -1)
        return dt

    def close(self) -> None:
        self.ll.llama_batch_ext_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


def text_only_step(model_path: Path, n_threads: int, n_steps: int) -> float:
    """Median seconds of a step over a short text cache (the non-attention part of a step)."""
    b = Bench(model_path, 0, 1, 0, 1, n_threads, "f16", False)
    b.step(None)
    t = statistics.median(b.step(None) for _ in range(n_steps))
    b.close()
    return t


def run(n_visual: int, ratios: list[float], grid: int, region: int, n_context: int, n_steps: int,
        n_threads: int, kv_type: str, gather: bool, model: Path | None = None, focus: float = 0.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = model or Path(tmp) / "bench.gguf"
        if model is None:
            write_model(path)
        t0 = time.perf_counter()
        b = Bench(path, n_visual, grid, n_context, region, n_threads, kv_type, gather, focus)
        prefill_s = time.perf_counter() - t0
        modes = [None, *ratios]
        times = {m: [] for m in modes}
        # rounds of a few steps per mode: switching settings rebuilds the graph (untimed first step),
        # then consecutive steps reuse it as in a real generation
        per_round = 3
        for _ in range(max(1, n_steps // per_round)):
            for m in modes:
                b.step(m)
                times[m] += [b.step(m) for _ in range(per_round)]
        n_kv = b.pos
        n_grid_tokens = b.n_images * grid * grid
        n_regions = b.n_regions
        b.close()
        base = text_only_step(path, n_threads, n_steps)
    dense = statistics.median(times[None])
    res = {
        "cached_tokens": n_kv, "grid_tokens": n_grid_tokens, "regions": n_regions,
        "threads": n_threads, "kv_type": kv_type, "gather": gather, "focus": focus,
        "prefill_s": round(prefill_s, 1),
        "dense_ms": round(1e3 * dense, 2), "text_only_ms": round(1e3 * base, 2),
        "attention_share_dense": round((dense - base) / dense, 3),
        "gaze": {},
    }
    for r in ratios:
        t = statistics.median(times[r])
        res["gaze"][str(r)] = {
            "ms": round(1e3 * t, 2), "vs_dense": round(t / dense, 3),
            "attention_vs_dense": round((t - base) / (dense - base), 3),
        }
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--visual", type=int, default=8192, help="image grid tokens in the cache")
    p.add_argument("--grid", type=int, default=32, help="grid side of each image, in tokens")
    p.add_argument("--region", type=int, default=2, help="region side, in tokens")
    p.add_argument("--context-tokens", type=int, default=4)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--kv-type", default="f16", choices=["f16", "q8_0"])
    p.add_argument("--gather", action="store_true", help="gather the visible K/V rows instead of masking")
    p.add_argument("--model", type=Path, default=None, help="a GGUF to use instead of the random one")
    p.add_argument("--focus", type=float, default=0.0,
                   help="give the first image's tokens a shared direction of this size: every selection gathers "
                        "in that image or avoids it (the clustered worst case for splitting the cells over threads)")
    args = p.parse_args(argv)
    res = run(args.visual, args.ratios, args.grid, args.region, args.context_tokens, args.steps,
              args.threads, args.kv_type, args.gather, args.model, args.focus)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
