"""Edges of the patched runtime's C API (issue "correct at the edges", findings 5, 7 and 9).

- Every flash-attention node of a gaze step gets a mask that does not vary over ne[2], the one
  layout CUDA's flash attention takes (it rejects ``mask->ne[2] != 1`` and the step would fall back
  to the CPU), in every score mode, in mask and gather mode.
- A batch marked generated holds one token per sequence: sequences decoding together each gaze
  (the same logits as decoding them one by one), two tokens of one sequence or a token shared by
  two sequences are refused (llama_decode returns -1, the cache is unchanged).
- ``llama_gaze_set_top_k(ctx, 5, 0.0f)`` is accepted (keep_ratio is unused with top_k > 0);
  invalid settings return false; ``llama_gaze_n_images`` with a seq_id outside the range returns
  -1 (it threw through the C API).

A tiny random gaze LLaVA (7 x 7 grid, 2 x 2 regions: 16 regions; 2 context tokens), f32 GGUF.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from gaze_edge.config import GazeConfig
from gaze_edge.convert import convert
from gaze_edge.convert.tiny import tiny_checkpoint

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)

GAZE = GazeConfig(region_h=2, region_w=2, n_context_tokens=2, top_k=0, keep_ratio=0.25, score_mode="gqa_mean")
IMAGE_SIZE = 98  # CLIP patch 14: a 7 x 7 grid
GRID = 7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from gaze_edge.runtime.model import GazeModel

    root = tmp_path_factory.mktemp("runtime-edges")
    # 4 query heads over 2 KV heads, so per_head differs from gqa_mean
    ckpt = tiny_checkpoint("llava", root / "ckpt", gaze=GAZE, seed=5, image_size=IMAGE_SIZE, width=128)
    convert(ckpt, root / "gguf", outtype="f32", progress=False)
    m = GazeModel.load(root / "gguf", n_threads=2)
    yield m
    m.close()


def _image(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))


# --- finding 5: mask layouts every backend takes -------------------------------------------------


class _Tensor(ctypes.Structure):
    """The head of ggml's struct ggml_tensor (ggml.h), enough to read shapes and sources."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.POINTER(ctypes.c_char) * 10),
    ]


class _FlashAttnMasks:
    """An eval callback recording (q ne, mask ne) of every FLASH_ATTN_EXT node computed."""

    def __init__(self) -> None:
        from gaze_edge.bench.profile import _ggml_base
        from gaze_edge.runtime.bindings import _llama_cpp

        self._ggml = _ggml_base()
        self.nodes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
        self.callback = _llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, tensor, ask, _user_data) -> bool:
        if ask:
            return True
        if (self._ggml.ggml_op_desc(tensor) or b"") == b"FLASH_ATTN_EXT":
            t = ctypes.cast(tensor, ctypes.POINTER(_Tensor)).contents
            q = ctypes.cast(t.src[0], ctypes.POINTER(_Tensor)).contents
            mask = ctypes.cast(t.src[3], ctypes.POINTER(_Tensor)).contents
            name = (self._ggml.ggml_get_name(tensor) or b"").decode()
            self.nodes.append((name, tuple(q.ne), tuple(mask.ne)))
        return True


@pytest.mark.parametrize("gather", [False, True], ids=["mask", "gather"])
@pytest.mark.parametrize("mode", ["gqa_mean", "per_head", "layer_mean"])
def test_gaze_flash_attention_masks_never_vary_over_ne2(model, mode, gather):
    rec = _FlashAttnMasks()
    with model.session(keep_regions=4, score_mode=mode, gather=gather, eval_callback=rec.callback) as s:
        s.add_text("USER: ")
        s.add_image(_image(0))
        s.add_text("\nDescribe.\nASSISTANT:")
        rec.nodes.clear()
        s.append(int(s.logits().argmax()))
        assert s.trace() is not None and s.trace().k == 4
    gaze_nodes = [n for n in rec.nodes if n[0].startswith("gaze_fattn")]
    assert len(gaze_nodes) == model.n_layer, rec.nodes
    n_head_kv = model.n_head_kv
    for name, q_ne, mask_ne in gaze_nodes:
        assert mask_ne[2] == 1, (name, q_ne, mask_ne)
        assert q_ne[3] % mask_ne[3] == 0 and mask_ne[1] >= q_ne[1], (name, q_ne, mask_ne)
        # every KV head (gathered per query head: every query head) is a stream of its own
        assert q_ne[3] in (n_head_kv, model.n_head), (name, q_ne)


# --- finding 7: batches of several sequences -----------------------------------------------------


class _TwoSequences:
    """A context holding the same kind of prompt in sequences 0 and 1: text tokens, an image grid
    of random embeddings with its context tokens (registered for gaze), more text."""

    def __init__(self, model, keep_regions: int = 3) -> None:
        from gaze_edge.runtime import bindings as gz

        ll = gz._llama_cpp
        self.ll, self.gz, self.model = ll, gz, model
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 256
        cparams.n_seq_max = 2
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = 2
        cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.type_k = cparams.type_v = 1  # f16
        self.ctx = ll.llama_init_from_model(model._model, cparams)
        assert self.ctx
        assert gz.llama_gaze_set_top_k(self.ctx, keep_regions, 0.0)
        self.batch = ll.llama_batch_ext_init(self.ctx)
        self.n_embd = ll.llama_model_n_embd_inp(model._model)
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model._model))
        self.pos = [0, 0]
        for seq in (0, 1):
            rng = np.random.default_rng(10 + seq)
            self.decode([(seq, t) for t in (1, 5, 9)])
            grid_pos = self.pos[seq]
            rows = rng.normal(0, 1, size=(GRID * GRID + GAZE.n_context_tokens, self.n_embd)).astype(np.float32)
            self.decode_embd(seq, rows)
            img = gz.llama_gaze_image(seq, grid_pos, GRID, GRID, 2, 2)
            assert gz.llama_gaze_add_image(self.ctx, ctypes.byref(img)) >= 0
            self.decode([(seq, t) for t in (3, 4, 7 + seq)])

    def decode(self, items, generated: bool = False, seqs=None) -> int:
        """items: (seq, token); every token outputs logits. Returns llama_process's code."""
        ll = self.ll
        ll.llama_batch_ext_clear(self.batch)
        pos = list(self.pos)
        for i, (seq, tok) in enumerate(items):
            ids = seqs[i] if seqs else [seq]
            idx = ll.llama_batch_ext_add_token(self.batch, ids[0], tok)
            assert idx >= 0
            for extra in ids[1:]:
                assert ll.llama_batch_ext_add_seq(self.batch, idx, extra) >= 0
            p = ll.llama_pos(pos[seq])
            pos[seq] += 1
            assert ll.llama_batch_ext_set_pos(self.batch, idx, ctypes.byref(p))
            assert ll.llama_batch_ext_set_output_logits(self.batch, idx, True)
        self.gz.llama_gaze_set_generated(self.ctx, generated)
        try:
            ret = ll.llama_process(self.ctx, ll.LLAMA_PROCESS_TYPE_DECODE, self.batch)
        finally:
            self.gz.llama_gaze_set_generated(self.ctx, False)
        if ret == 0:
            self.pos = pos
        return ret

    def decode_embd(self, seq: int, rows: np.ndarray) -> None:
        ll = self.ll
        ll.llama_batch_ext_clear(self.batch)
        for i in range(rows.shape[0]):
            e = ll.llama_embd(rows[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd)
            idx = ll.llama_batch_ext_add_embd(self.batch, seq, e)
            p = ll.llama_pos(self.pos[seq] + i)
            assert ll.llama_batch_ext_set_pos(self.batch, idx, ctypes.byref(p))
        assert ll.llama_process(self.ctx, ll.LLAMA_PROCESS_TYPE_DECODE, self.batch) == 0
        self.pos[seq] += rows.shape[0]

    def logits(self, i: int) -> np.ndarray:
        ptr = self.ll.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def pos_max(self, seq: int) -> int:
        mem = self.ll.llama_get_memory(self.ctx)
        return int(self.ll.llama_memory_seq_pos_max(mem, seq))

    def close(self) -> None:
        self.ll.llama_batch_ext_free(self.batch)
        self.ll.llama_free(self.ctx)


def test_sequences_decoding_together_each_gaze(model):
    together = _TwoSequences(model)
    one_by_one = _TwoSequences(model)
    dense = _TwoSequences(model)
    try:
        got, want, flat = [], [], []
        toks = [11, 12]
        for _ in range(3):
            assert together.decode([(0, toks[0]), (1, toks[1])], generated=True) == 0
            got.append([together.logits(0), together.logits(1)])
            assert one_by_one.decode([(0, toks[0])], generated=True) == 0
            a = one_by_one.logits(0)
            assert one_by_one.decode([(1, toks[1])], generated=True) == 0
            want.append([a, one_by_one.logits(0)])
            assert dense.decode([(0, toks[0]), (1, toks[1])]) == 0  # not marked: prompt tokens, dense
            flat.append([dense.logits(0), dense.logits(1)])
            toks = [int(got[-1][0].argmax()), int(got[-1][1].argmax())]
        got, want, flat = np.array(got), np.array(want), np.array(flat)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-5 * scale  # each sequence gazed, as on its own
        assert np.abs(got - flat).max() > 1e-3 * scale  # and gazing is not the dense step
    finally:
        for c in (together, one_by_one, dense):
            c.close()


def test_a_generated_batch_with_two_tokens_of_a_sequence_is_refused(model):
    c = _TwoSequences(model)
    try:
        before = c.pos_max(0), c.pos_max(1)
        assert c.decode([(0, 11), (0, 12)], generated=True) == -1
        assert c.decode([(0, 11), (1, 12), (1, 13)], generated=True) == -1
        assert (c.pos_max(0), c.pos_max(1)) == before  # nothing was decoded
        # a token of two sequences: refused too (the cache cannot tell whose generated token it is)
        assert c.decode([(0, 11)], generated=True, seqs=[[0, 1]]) == -1
        assert (c.pos_max(0), c.pos_max(1)) == before
        # the same tokens unmarked are a prompt batch and decode (densely)
        assert c.decode([(0, 11), (0, 12)]) == 0
    finally:
        c.close()


# --- finding 9: the small ones -------------------------------------------------------------------


def test_set_top_k_takes_top_k_with_any_keep_ratio(model):
    from gaze_edge.runtime import bindings as gz

    with model.session() as s:
        ctx = s._ctx
        k, ratio = ctypes.c_int32(), ctypes.c_float()
        assert gz.llama_gaze_set_top_k(ctx, 0, 0.5)
        assert gz.llama_gaze_set_top_k(ctx, 5, 0.0)  # keep_ratio unused with top_k > 0
        gz.llama_gaze_get_top_k(ctx, ctypes.byref(k), ctypes.byref(ratio))
        assert (k.value, ratio.value) == (5, 0.5)  # the invalid ratio did not replace the valid one
        assert not gz.llama_gaze_set_top_k(ctx, 0, 0.0)
        assert not gz.llama_gaze_set_top_k(ctx, -1, 0.5)
        assert not gz.llama_gaze_set_top_k(ctx, 0, 1.5)
        gz.llama_gaze_get_top_k(ctx, ctypes.byref(k), ctypes.byref(ratio))
        assert (k.value, ratio.value) == (5, 0.5)  # refused calls change nothing
        assert not gz.llama_gaze_set_score_mode(ctx, 99)
        assert s.selection() == (5, 0.5)


def test_n_images_with_a_seq_id_out_of_range_returns_minus_one(model):
    from gaze_edge.runtime import bindings as gz

    with model.session() as s:
        s.add_image(_image(1))
        assert gz.llama_gaze_n_images(s._ctx, 0, None) == 1
        assert gz.llama_gaze_n_images(s._ctx, -1, None) == 1
        n = ctypes.c_int32(7)
        for bad in (256, 10_000, -2):  # LLAMA_MAX_SEQ is 256
            assert gz.llama_gaze_n_images(s._ctx, bad, ctypes.byref(n)) == -1
            assert n.value == 0


def test_every_layer_dense_is_the_dense_step_with_an_empty_trace(model):
    """n_dense_layers >= the layer count: the step is the dense one (it aborted in llama.cpp before:
    the gaze inputs were built but nothing read them) and the trace has no rows, fraction 1."""
    logits = {}
    for name, kwargs in (("dense", dict(gaze=False)), ("all", dict(n_dense_layers=99)),
                         ("one", dict(n_dense_layers=1))):
        with model.session(keep_regions=1, **kwargs) as s:
            s.add_text("USER: ")
            s.add_image(_image(2))
            s.add_text("\nDescribe.\nASSISTANT:")
            logits[name] = s.append(int(s.logits().argmax()))
            tr = s.trace()
            if name == "all":
                assert tr.selected.shape[0] == 0 and tr.n_dense_layers == model.n_layer
                assert tr.visual_kv_fraction() == 1.0
            if name == "one":
                assert tr.selected.shape[0] == model.n_layer - 1 and tr.n_dense_layers == 1
    assert logits["all"].tobytes() == logits["dense"].tobytes()
    assert not np.array_equal(logits["one"], logits["dense"])
    with model.session() as s, pytest.raises(ValueError, match="n_dense_layers"):
        s.configure(n_dense_layers=-1)
