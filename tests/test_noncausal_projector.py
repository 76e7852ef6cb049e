"""Gaze context tokens with a projector whose image tokens attend to each other (Gemma 3).

mtmd_decode_use_non_causal() is true for Gemma 3: upstream decodes an image chunk with causal
attention off, so its grid tokens attend to each other both ways. Our chunks end with the gaze
context tokens, which must stay causal (GAZE_SPEC.md, "Context tokens"): they see the grid and the
context tokens before them, and no grid token sees them. So mtmd_helper_decode_image_chunk must
decode the grid non-causally, then the context tokens with causal attention on (issue 17, finding 2).

Checked on a tiny random Gemma 3 pair (tests/gemma3_tiny.py, a 4 x 4 grid, 4 context tokens, f32
weights and KV cache): the last logits of "text, image, text" evaluated by mtmd's helper equal a
reference evaluated by hand with the raw llama API (the text; the grid rows of mtmd's embeddings in
non-causal batches; the context-token rows in causal batches; the text; mtmd's positions and batch
splits), within 1e-4 of the largest |logit|. The same evaluation with the whole chunk non-causal
(the build before the fix) is shown to differ from the reference by far more than that, so the test
tells the two apart. Every evaluation runs in a child process: llama.cpp aborts ("non-causal
attention requires n_ubatch >= n_tokens") when a non-causal batch outgrows n_ubatch, and that must
be a test failure, not a dead pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.runtime

TOL = 1e-4  # max |diff| of the last logits, relative to the largest |logit| (f32 weights and cache)
MIN_GAP = 20 * TOL  # the whole-chunk-non-causal evaluation must be at least this far from the reference
N_CTX = 256
BIG_BATCH = 64  # holds a whole image chunk (16 grid + 4 context tokens) in one batch
PROMPT = "<start_of_turn>user\n<__media__>Describe the image.<end_of_turn>\n<start_of_turn>model\n"
CHILD_TIMEOUT = 120


# --- child process: one evaluation, results to a JSON + .npy pair ---------------------------------

def _child(args: dict) -> None:
    import ctypes

    from llama_cpp import llama_cpp as ll
    from llama_cpp import mtmd_cpp as mt

    # mtmd's gaze accessors (patches/0006), bound here: no gaze_edge import, so the child needs only the library
    get_grid = mt._libmtmd.mtmd_image_tokens_get_grid
    get_grid.argtypes, get_grid.restype = [ctypes.c_void_p] + [ctypes.POINTER(ctypes.c_int32)] * 2, None
    get_n_ctx = mt._libmtmd.mtmd_image_tokens_get_n_ctx_tokens
    get_n_ctx.argtypes, get_n_ctx.restype = [ctypes.c_void_p], ctypes.c_int32

    silent = ll.llama_log_callback(lambda *a: None)  # kept alive: llama.cpp calls it later
    if not args.get("verbose"):
        ll.llama_log_set(silent, ctypes.c_void_p(0))
        mt.mtmd_log_set(silent, ctypes.c_void_p(0))
        mt.mtmd_helper_log_set(silent, ctypes.c_void_p(0))
    ll.llama_backend_init()
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mparams.use_extra_bufts = False  # no AMX repacking (SIGILL on VMs without AMX, docs/CONVERT.md)
    model = ll.llama_model_load_from_file(args["llm"].encode(), mparams)
    assert model, "llama.cpp cannot load the model"
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = N_CTX
    cparams.n_batch = args["n_batch"]
    cparams.n_ubatch = args["n_ubatch"]
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = 2
    cparams.type_k = cparams.type_v = ll.GGML_TYPE_F32
    cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED  # as GazeSession
    ctx = ll.llama_init_from_model(model, cparams)
    assert ctx, "llama.cpp cannot create a context"
    tparams = mt.mtmd_context_params_default()
    tparams.use_gpu = False
    tparams.n_threads = 2
    tparams.warmup = False
    tparams.print_timings = False
    mctx = mt.mtmd_init_from_file(args["mmproj"].encode(), model, tparams)
    assert mctx, "mtmd cannot load the projector"
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    n_embd = ll.llama_model_n_embd_inp(model)

    size = args["image_size"]
    rng = np.random.default_rng(0)
    pixels = np.ascontiguousarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
    bitmap = mt.mtmd_bitmap_init(size, size, pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
    prompt = PROMPT.encode()
    text = mt.mtmd_input_text(prompt, len(prompt), True, True)
    chunks = mt.mtmd_input_chunks_init()
    assert mt.mtmd_tokenize(mctx, chunks, ctypes.byref(text), (mt.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0

    info: dict = {"non_causal": bool(mt.mtmd_decode_use_non_causal(mctx, None)), "chunks": []}
    parts = []  # ("text", [ids]) | ("image", chunk)
    for i in range(mt.mtmd_input_chunks_size(chunks)):
        chunk = mt.mtmd_input_chunks_get(chunks, i)
        if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            ids = [ptr[j] for j in range(n.value)]
            parts.append(("text", ids))
            info["chunks"].append({"type": "text", "tokens": ids})
        else:
            tokens = mt.mtmd_input_chunk_get_tokens_image(chunk)
            nx, ny = ctypes.c_int32(0), ctypes.c_int32(0)
            get_grid(tokens, ctypes.byref(nx), ctypes.byref(ny))
            parts.append(("image", chunk))
            info["chunks"].append({
                "type": "image", "n_tokens": int(mt.mtmd_input_chunk_get_n_tokens(chunk)),
                "n_pos": int(mt.mtmd_input_chunk_get_n_pos(chunk)), "grid": [ny.value, nx.value],
                "n_ctx_tokens": int(get_n_ctx(tokens)),
                "tokens_nx_ny": [int(mt.mtmd_image_tokens_get_nx(tokens)), int(mt.mtmd_image_tokens_get_ny(tokens))],
            })

    if args["how"] == "mtmd":
        n_past = ll.llama_pos(0)
        rc = mt.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, args["helper_n_batch"], True, ctypes.byref(n_past))
        assert rc == 0, f"mtmd_helper_eval_chunks failed ({rc})"
        info["n_past"] = n_past.value
    else:
        info["n_past"] = _by_hand(ll, mt, ctx, mctx, parts, n_embd, args["how"], args["helper_n_batch"], info)
    logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
    np.save(args["out"] + ".npy", logits)
    Path(args["out"] + ".json").write_text(json.dumps(info))
    mt.mtmd_input_chunks_free(chunks)
    mt.mtmd_bitmap_free(bitmap)
    mt.mtmd_free(mctx)
    ll.llama_free(ctx)
    ll.llama_model_free(model)


def _by_hand(ll, mt, ctx, mctx, parts, n_embd: int, how: str, n_batch: int, info: dict) -> int:
    """The reference ("split": grid non-causal, then context tokens causal) or the whole chunk
    non-causal ("whole"), with the raw llama API; batches split every n_batch as mtmd's helper does.
    Returns the next position."""
    import ctypes

    batch = ll.llama_batch_ext_init(ctx)
    pos = 0

    def decode(items, embd: bool, logits: bool, causal: bool = True) -> None:
        nonlocal pos
        for start in range(0, len(items), n_batch):
            piece = items[start : start + n_batch]
            ll.llama_batch_ext_clear(batch)
            idx = -1
            for item in piece:
                if embd:
                    row = ll.llama_embd(item.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, n_embd)
                    idx = ll.llama_batch_ext_add_embd(batch, 0, row)
                else:
                    idx = ll.llama_batch_ext_add_token(batch, 0, item)
                assert idx >= 0, idx
                p = ll.llama_pos(pos)
                assert ll.llama_batch_ext_set_pos(batch, idx, ctypes.byref(p))
                pos += 1
            if logits and start + n_batch >= len(items):
                assert ll.llama_batch_ext_set_output_logits(batch, idx, True)
            ll.llama_set_causal_attn(ctx, causal)
            rc = ll.llama_process(ctx, ll.LLAMA_PROCESS_TYPE_DECODE, batch)
            ll.llama_set_causal_attn(ctx, True)
            assert rc == 0, f"llama_process failed ({rc})"

    for i, (kind, item) in enumerate(parts):
        last = i == len(parts) - 1
        if kind == "text":
            decode(item, embd=False, logits=last)
            continue
        assert mt.mtmd_encode_chunk(mctx, item) == 0
        n_tokens = mt.mtmd_input_chunk_get_n_tokens(item)
        n_ctx_tok = info["chunks"][i]["n_ctx_tokens"]
        out = mt.mtmd_get_output_embd(mctx)
        rows = np.ctypeslib.as_array(out, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()
        info["image_rows"] = rows.tolist()
        start = pos
        n_grid = n_tokens - n_ctx_tok
        if how == "whole":
            assert n_tokens <= n_batch, "the whole chunk must fit one non-causal batch"
            decode(list(rows), embd=True, logits=False, causal=False)
        else:
            decode(list(rows[:n_grid]), embd=True, logits=False, causal=False)
            decode(list(rows[n_grid:]), embd=True, logits=False, causal=True)
        pos = start + mt.mtmd_input_chunk_get_n_pos(item)  # positions after the chunk, as mtmd counts them
    ll.llama_batch_ext_free(batch)
    return pos


# --- parent side -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from gemma3_tiny import gemma3_pair

    return gemma3_pair()


def evaluate(pair, tmp_path: Path, how: str, n_batch: int, n_ubatch: int, helper_n_batch: int | None = None,
             gaze: bool = True):
    """Run one evaluation in a child; (logits, info) or a failed test with the child's exit and log.
    gaze=False: the mmproj without the gaze keys and context tokens."""
    out = tmp_path / f"{how}-{n_batch}-{n_ubatch}-{helper_n_batch}-{gaze}"
    mmproj = pair.mmproj if gaze else pair.mmproj_without_gaze
    args = dict(llm=str(pair.llm), mmproj=str(mmproj), image_size=pair.image_size, how=how, n_batch=n_batch,
                n_ubatch=n_ubatch, helper_n_batch=helper_n_batch or n_batch, out=str(out))
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # an abort prints its message, not a gdb session
    proc = subprocess.run([sys.executable, __file__, json.dumps(args)], capture_output=True, text=True,
                          errors="replace", timeout=CHILD_TIMEOUT, env=env)
    if proc.returncode != 0:
        pytest.fail(f"the {how} evaluation (n_batch {n_batch}, n_ubatch {n_ubatch}, helper n_batch "
                    f"{args['helper_n_batch']}) exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return np.load(str(out) + ".npy"), json.loads(Path(str(out) + ".json").read_text())


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over the largest |logit| of b."""
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """(n_batch, gaze) -> (reference logits, info), evaluated by hand once each."""
    root = tmp_path_factory.mktemp("noncausal-reference")
    cache = {}

    def get(n_batch: int, gaze: bool = True):
        if (n_batch, gaze) not in cache:
            cache[n_batch, gaze] = evaluate(pair, root, "split", BIG_BATCH, BIG_BATCH, helper_n_batch=n_batch,
                                            gaze=gaze)
        return cache[n_batch, gaze]

    return get


CONFIGS = pytest.mark.parametrize("n_batch, n_ubatch", [(BIG_BATCH, BIG_BATCH), (16, 16), (BIG_BATCH, 16)],
                                  ids=["chunk-fits-a-ubatch", "batch=ubatch=grid", "ubatch=grid"])


def test_the_fixture_is_a_gemma3_gaze_pair(pair, reference):
    """mtmd loads the pair as a non-causal projector; the image chunk is the 4 x 4 grid, then the
    context tokens as stored in v.gaze.ctx_tok, one position each (1-D RoPE)."""
    _, info = reference(pair.n_grid)
    assert info["non_causal"]
    (image,) = [c for c in info["chunks"] if c["type"] == "image"]
    assert image["n_tokens"] == pair.n_grid + pair.n_ctx_tokens
    assert image["n_ctx_tokens"] == pair.n_ctx_tokens
    assert image["n_pos"] == image["n_tokens"]
    assert image["grid"] == [pair.grid_side, pair.grid_side]
    rows = np.asarray(info["image_rows"], dtype=np.float32)
    np.testing.assert_allclose(rows[pair.n_grid:], pair.context_tokens(), rtol=0, atol=1e-6)
    n_text = sum(len(c["tokens"]) for c in info["chunks"] if c["type"] == "text")
    assert info["n_past"] == n_text + image["n_pos"]


def test_the_check_tells_the_two_decodings_apart(pair, reference, tmp_path):
    """The whole chunk non-causal (grid tokens attend to the context tokens) moves the logits by far
    more than TOL, so the comparisons below can see the difference."""
    ref, _ = reference(BIG_BATCH)
    whole, _ = evaluate(pair, tmp_path, "whole", BIG_BATCH, BIG_BATCH)
    gap = rel_diff(whole, ref)
    print(f"\nwhole chunk non-causal vs reference: max |diff| = {gap:.3e} of the logit scale")
    assert gap > MIN_GAP, gap


@CONFIGS
def test_without_context_tokens_the_reference_is_mtmd(pair, reference, tmp_path, n_batch, n_ubatch):
    """The harness: on the converter's own mmproj (no gaze, upstream's decoding) the hand-made
    evaluation is mtmd's helper bit for bit (same embeddings, positions, batches, causal scope)."""
    ref, ref_info = reference(n_batch, gaze=False)
    (image,) = [c for c in ref_info["chunks"] if c["type"] == "image"]
    assert image["n_tokens"] == pair.n_grid and image["n_ctx_tokens"] == 0
    got, info = evaluate(pair, tmp_path, "mtmd", n_batch, n_ubatch, gaze=False)
    assert info["n_past"] == ref_info["n_past"]
    assert got.tobytes() == ref.tobytes(), rel_diff(got, ref)


@CONFIGS
def test_mtmd_decodes_context_tokens_causally(pair, reference, tmp_path, n_batch, n_ubatch):
    """mtmd's helper: grid tokens bidirectional among themselves and blind to the context tokens,
    context tokens causal. With n_ubatch equal to the grid size (16) nothing aborts: only the grid
    needs to fit one ubatch."""
    assert n_ubatch >= pair.n_grid
    ref, _ = reference(n_batch)
    got, info = evaluate(pair, tmp_path, "mtmd", n_batch, n_ubatch)
    diff = rel_diff(got, ref)
    print(f"\nmtmd (n_batch {n_batch}, n_ubatch {n_ubatch}) vs reference: max |diff| = {diff:.3e} of the logit scale")
    assert info["n_past"] == reference(n_batch)[1]["n_past"]
    assert diff <= TOL, diff


if __name__ == "__main__":  # the child: python tests/test_noncausal_projector.py '{json args}'
    _child(json.loads(sys.argv[1]))
