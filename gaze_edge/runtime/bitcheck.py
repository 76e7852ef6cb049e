"""Gaze off is the unpatched computation, bit for bit (GAZE_SPEC.md, "Generated tokens").

Runs one sequence through two llama.cpp builds (two library folders) and compares every logit
bit for bit: a prompt of tokens and image-like embeddings (the grid and the context tokens, as
mtmd would feed them), then decode steps. The gaze build runs it three ways: gaze disabled; gaze
enabled with the grid registered but every token a prompt token; gaze enabled and the steps marked
generated but no image registered. All three must equal the other build (one with only the bug-fix
patches, e.g. a stock llama-cpp-python with patches 0001-0002).

    python -m gaze_edge.runtime.bitcheck MODEL.gguf BASE_LIB_DIR GAZE_LIB_DIR

Each build runs in a child process (the library folder is fixed when llama_cpp is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

N_GRID = (6, 5)  # grid height, width
N_CONTEXT = 3
N_STEPS = 8

_silent = None


def _child(model: str, out: str, variant: str) -> None:
    """Evaluate the fixed sequence with the library llama_cpp loaded; save the logits to out."""
    import ctypes

    from llama_cpp import llama_cpp as ll

    global _silent
    _silent = ll.llama_log_callback(lambda *a: None)  # kept alive: llama.cpp calls it later
    ll.llama_log_set(_silent, ctypes.c_void_p(0))
    ll.llama_backend_init()
    mparams = ll.llama_model_default_params()
    mparams.use_extra_bufts = False
    m = ll.llama_model_load_from_file(model.encode(), mparams)
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 256
    cparams.n_threads = cparams.n_threads_batch = 2
    cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = ll.llama_init_from_model(m, cparams)
    n_embd = ll.llama_model_n_embd_inp(m)
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(m))

    gz = None
    if variant != "base":
        from gaze_edge.runtime import bindings as gz

        gz.llama_gaze_set_enabled(ctx, variant != "off")
        gz.llama_gaze_set_top_k(ctx, 1, 0.25)

    rng = np.random.default_rng(0)
    n_img = N_GRID[0] * N_GRID[1] + N_CONTEXT
    embd = rng.normal(0, 1, size=(n_img, n_embd)).astype(np.float32)
    batch = ll.llama_batch_ext_init(ctx)
    pos = ll.llama_pos(0)
    logits = []

    def run(tokens=None, rows=None, generated=False):
        ll.llama_batch_ext_clear(batch)
        items = tokens if tokens is not None else list(range(rows.shape[0]))
        idx = -1
        for i, t in enumerate(items):
            if tokens is not None:
                idx = ll.llama_batch_ext_add_token(batch, 0, t)
            else:
                e = ll.llama_embd(rows[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, n_embd)
                idx = ll.llama_batch_ext_add_embd(batch, 0, e)
            ll.llama_batch_ext_set_pos(batch, idx, ctypes.byref(pos))
            pos.value += 1
        ll.llama_batch_ext_set_output_logits(batch, idx, True)
        if gz is not None:
            gz.llama_gaze_set_generated(ctx, generated)
        assert ll.llama_process(ctx, ll.LLAMA_PROCESS_TYPE_DECODE, batch) == 0
        ptr = ll.llama_get_logits_ith(ctx, -1)
        logits.append(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy())

    run(tokens=[1, 5, 9, 7])
    grid_pos = pos.value
    run(rows=embd)
    if variant in ("off", "prompt"):
        img = gz.llama_gaze_image(0, grid_pos, N_GRID[1], N_GRID[0], 2, 2)
        assert gz.llama_gaze_add_image(ctx, ctypes.byref(img)) >= 0
    run(tokens=[3, 4])
    for step in range(N_STEPS):
        token = int(logits[-1].argmax())
        run(tokens=[token], generated=variant in ("off", "no-image"))
        del step
    np.save(out, np.stack(logits))


def compare(model: Path, base_lib: Path, gaze_lib: Path) -> dict:
    """Bit-for-bit comparison of the gaze build's three dense variants against the base build."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("base", base_lib), ("off", gaze_lib), ("prompt", gaze_lib), ("no-image", gaze_lib)]
        for variant, lib in runs:
            env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib), MTMD_CPP_LIB=str(lib))
            out = str(Path(tmp) / f"{variant}.npy")
            subprocess.run([sys.executable, "-m", "gaze_edge.runtime.bitcheck", "--child", variant,
                            str(model), out], check=True, env=env)
        base = np.load(Path(tmp) / "base.npy")
        for variant in ("off", "prompt", "no-image"):
            got = np.load(Path(tmp) / f"{variant}.npy")
            results[variant] = {
                "bit_identical": bool(got.shape == base.shape and got.tobytes() == base.tobytes()),
                "max_abs_diff": float(np.abs(got - base).max()),
                "n_logits": int(base.size),
            }
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None)
    p.add_argument("model")
    p.add_argument("base_lib", nargs="?")
    p.add_argument("gaze_lib", nargs="?")
    args = p.parse_args(argv)
    if args.child:
        _child(args.model, args.base_lib, args.child)
        return 0
    res = compare(Path(args.model), Path(args.base_lib), Path(args.gaze_lib))
    print(json.dumps(res, indent=2))
    return 0 if all(r["bit_identical"] for r in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
