"""Saved state restores gaze too (issue "correct at the edges", finding 6).

After llama_state_seq_set_data the cache holds the image but the gaze registry has forgotten it:
decode was dense until someone registered it again. GazeSession.save()/load() keep the images and
register them again: the steps after a load equal the uninterrupted session's (logits bit for bit,
the same selections), for LLaVA (1-D RoPE) and Qwen2-VL (M-RoPE positions).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from PIL import Image

from gaze_edge.config import GazeConfig

pytestmark = pytest.mark.runtime


def picture(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(h // 7 + 1, w // 7 + 1, 3))
    return Image.fromarray(np.kron(coarse, np.ones((7, 7, 1)))[:h, :w].astype(np.uint8))


@pytest.fixture(scope="module", params=["default", "qwen2vl"])
def model(request, tmp_path_factory):
    from gaze_edge.runtime.model import GazeModel

    if request.param == "default":
        m = GazeModel.load(n_threads=2)
        m.pictures = ["examples/scene.png", picture(196, 196, 1)]
    else:
        from gaze_edge.convert import convert
        from gaze_edge.convert.tiny import tiny_checkpoint

        root = tmp_path_factory.mktemp("state-qwen")
        gaze = GazeConfig(region_h=2, region_w=2, n_context_tokens=2, top_k=0, keep_ratio=0.25)
        ckpt = tiny_checkpoint("qwen2vl", root / "ckpt", gaze=gaze, seed=4)
        llm, _ = convert(ckpt, root / "gguf", outtype="f32", progress=False)
        m = GazeModel.load(llm.parent, n_threads=2)
        m.pictures = [picture(112, 140, 0), picture(112, 112, 1)]
    yield m
    m.close()


def prompt(s, pictures) -> int:
    s.add_text("USER: ")
    for p in pictures:
        s.add_image(p)
    s.add_text("\nDescribe.\nASSISTANT:")
    return int(s.logits().argmax())


def test_a_loaded_session_gazes_like_the_uninterrupted_one(model, tmp_path):
    with model.session() as s:
        tok = prompt(s, model.pictures)
        for _ in range(3):
            tok = int(s.append(tok).argmax())
        data = s.save(tmp_path / "conv.gazestate")  # `tok` is the next token to evaluate
        feed = tok
        going_on = []
        for _ in range(4):
            logits = s.append(tok)
            going_on.append((logits, s.trace().selected))
            tok = int(logits.argmax())
    assert (tmp_path / "conv.gazestate").read_bytes() == data
    for source in (data, tmp_path / "conv.gazestate"):
        with model.session() as r:
            r.load(source)
            assert r.n_regions == sum(im.n_regions for im in r.images) > 0
            tok = feed
            for logits, selected in going_on:
                got = r.append(tok)
                assert got.tobytes() == logits.tobytes()
                assert np.array_equal(r.trace().selected, selected)
                tok = int(got.argmax())


def test_without_registering_again_the_restored_cache_would_decode_densely(model):
    """What llama.cpp's state load alone gives (the defect): no image known, a dense step."""
    from gaze_edge.runtime import bindings
    from gaze_edge.runtime.session import SEQ

    llama_cpp = bindings._llama_cpp
    with model.session() as s:
        prompt(s, model.pictures)
        size = llama_cpp.llama_state_seq_get_size(s._ctx, SEQ)
        buf = (ctypes.c_uint8 * size)()
        llama_cpp.llama_state_seq_get_data(s._ctx, buf, size, SEQ)
        with model.session() as r:
            assert llama_cpp.llama_state_seq_set_data(r._ctx, buf, size, SEQ) == size
            assert r.n_regions == 0  # the registry forgot the images: hence save()/load()


def test_a_saved_state_from_another_model_or_corrupt_is_refused(model, tmp_path):
    from gaze_edge.runtime.saved import SavedStateError

    with model.session() as s:
        prompt(s, model.pictures[:1])
        data = s.save()
        with pytest.raises(SavedStateError, match="not a saved"):
            s.load(b"garbage")
        with pytest.raises(SavedStateError, match="corrupt"):
            s.load(data[:12] + b"{" + data[13:])
        bad = data.replace(model.files.model.name.encode(), b"x" * len(model.files.model.name), 1)
        with pytest.raises(SavedStateError, match="saved with model"):
            s.load(bad)
        cut = data[:-100]
        with pytest.raises(SavedStateError, match="refused"):
            s.load(cut)
