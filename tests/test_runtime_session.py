"""The low-level session over the patched runtime: loading, images, settings, gaze vs dense.

A tiny random gaze LLaVA (7 x 7 grid, 2 x 2 regions: 16 regions, 4 of them partial; 2 context
tokens; keep_ratio 0.25 stored in the GGUF) is converted once per module at f32.
"""

from __future__ import annotations

import math

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
N_REGIONS = 16


def image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(IMAGE_SIZE // 7 + 1, IMAGE_SIZE // 7 + 1, 3))
    return np.kron(coarse, np.ones((7, 7, 1)))[:IMAGE_SIZE, :IMAGE_SIZE].astype(np.uint8)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-session")
    ckpt = tiny_checkpoint("llava", root / "ckpt", gaze=GAZE, seed=3, image_size=IMAGE_SIZE, width=128)
    llm, mmproj = convert(ckpt, root / "gguf", outtype="f32", progress=False)
    return ckpt, llm, mmproj


@pytest.fixture(scope="module")
def model(paths):
    from gaze_edge.runtime.model import GazeModel

    m = GazeModel.load(paths[1].parent, n_threads=2)
    yield m
    m.close()


def prompt(s, seed: int = 0):
    from PIL import Image

    s.add_text("USER: ")
    img = s.add_image(Image.fromarray(image(seed)), keep_embeddings=True)
    s.add_text("\nDescribe the image.\nASSISTANT:")
    return img


def decode(s, n: int) -> list[np.ndarray]:
    """Greedy steps from the prompt: the logits after each generated token."""
    out, logits = [], s.logits()
    for _ in range(n):
        logits = s.append(int(logits.argmax()))
        out.append(logits)
    return out


def test_model_files_from_a_folder_or_two_files(paths, tmp_path):
    from gaze_edge.runtime.model import ModelFilesError, find_model_files

    _, llm, mmproj = paths
    assert find_model_files(llm.parent) == find_model_files(llm, mmproj)
    assert find_model_files(llm) == find_model_files(llm, mmproj)  # paired by name
    with pytest.raises(ModelFilesError, match="exactly one language-model"):
        find_model_files(tmp_path)
    with pytest.raises(ModelFilesError, match="no such"):
        find_model_files(tmp_path / "missing.gguf")


def test_the_model_reports_the_gaze_settings_of_its_checkpoint(model):
    d = model.gaze_defaults()
    assert (d.region_h, d.region_w, d.n_context_tokens) == (2, 2, 2)
    assert (d.keep_regions, d.score_mode) == (0, "gqa_mean")
    assert d.keep_ratio == pytest.approx(0.25)


def test_an_image_adds_its_grid_then_the_checkpoints_context_tokens(model, paths):
    from gaze_edge.checkpoint import load_gaze

    with model.session() as s:
        s.add_text("USER: ")
        n_before = s.n_past
        img = prompt_image = s.add_image(image_pil())
        assert (img.grid, img.region, img.n_regions, img.n_context_tokens) == ((7, 7), (2, 2), N_REGIONS, 2)
        assert img.id == 0 and img.pos == n_before
        assert s.n_past == n_before + 49 + 2  # 1-D RoPE: one position per token
        assert s.n_regions == N_REGIONS
        assert sorted(prompt_image.region_sizes().tolist()) == [1] + [2] * 6 + [4] * 9
        with pytest.raises(RuntimeError, match="no logits"):
            s.logits()

    with model.session() as s:
        img = prompt(s)
    _, context_tokens = load_gaze(paths[0])
    assert img.embeddings.shape == (51, 128)
    np.testing.assert_array_equal(img.embeddings[49:], context_tokens.numpy())


def image_pil(seed: int = 0):
    from PIL import Image

    return Image.fromarray(image(seed))


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_top_k_of_all_regions_is_the_dense_step_bit_for_bit(model, kv_type):
    """With an f32 cache too: mask mode read f32 K/V unconverted while the dense step reads them as
    f16, so keeping every region differed from dense by ~1e-3 of the logit scale (finding 3 of
    "correct at the edges"); now both read f16."""
    with model.session(gaze=False, kv_type=kv_type) as s:
        prompt(s)
        dense = decode(s, 6)
        assert s.trace() is None
    for mode in ("gqa_mean", "per_head", "layer_mean"):
        with model.session(keep_regions=N_REGIONS, score_mode=mode, kv_type=kv_type) as s:
            prompt(s)
            steps = decode(s, 6)
            assert s.trace().k == N_REGIONS
        for a, b in zip(steps, dense, strict=True):
            assert a.tobytes() == b.tobytes(), mode


def test_gather_mode_with_all_regions_matches_dense(model):
    with model.session(gaze=False) as s:
        prompt(s)
        dense = np.stack(decode(s, 6))
    with model.session(keep_regions=N_REGIONS, gather=True) as s:
        prompt(s)
        steps = np.stack(decode(s, 6))
    # flash attention sums an F16 V cache in F16; gather reads the same F16 rows in another order, which
    # rounds differently: measured max |diff| 1.6e-3 of the logit scale on this model
    assert np.abs(steps - dense).max() <= 5e-3 * np.abs(dense).max()
    assert (steps.argmax(-1) == dense.argmax(-1)).all()


@pytest.mark.parametrize(
    "settings, n_sel, k",
    [
        ({}, "kv", math.ceil(0.25 * N_REGIONS)),  # the GGUF's keep_ratio
        ({"keep_regions": 1}, "kv", 1),
        ({"keep_ratio": 0.5}, "kv", 8),
        ({"keep_regions": 3, "score_mode": "per_head"}, "q", 3),
        ({"keep_regions": 3, "score_mode": "layer_mean"}, "kv", 3),
        ({"keep_regions": 3, "gather": True}, "kv", 3),
    ],
)
def test_a_generated_token_gazes_at_k_regions_per_layer_and_head(model, settings, n_sel, k):
    with model.session(**settings) as s:
        prompt(s)
        logits = s.append(int(s.logits().argmax()))
        tr = s.trace()
    heads = model.n_head_kv if n_sel == "kv" else model.n_head
    assert tr.selected.shape == (model.n_layer, heads, k) and tr.k == k and tr.n_regions == N_REGIONS
    assert ((tr.selected >= 0) & (tr.selected < N_REGIONS)).all()
    assert (np.diff(tr.selected, axis=-1) > 0).all()  # distinct, ascending
    if settings.get("score_mode") == "layer_mean":
        assert (tr.selected == tr.selected[:, :1]).all()
    assert 0 < tr.visual_kv_fraction() <= 1
    assert np.isfinite(logits).all()


def test_gaze_changes_generated_tokens_only(model):
    with model.session(gaze=False) as s:
        prompt(s)
        first_dense = s.logits()
        dense = decode(s, 3)
    with model.session(keep_regions=1) as s:
        prompt(s)
        assert s.logits().tobytes() == first_dense.tobytes()  # the prompt is dense
        gazed = decode(s, 3)
        s.add_text(" more")  # prompt text after generation: dense, no trace
        assert s.trace() is None
    assert not np.allclose(gazed[0], dense[0])


def test_a_sequence_without_image_is_dense(model):
    with model.session(gaze=False) as s:
        s.add_text("USER: hello\nASSISTANT:")
        dense = decode(s, 3)
    with model.session(keep_regions=1) as s:
        s.add_text("USER: hello\nASSISTANT:")
        gazed = decode(s, 3)
        assert s.trace() is None
    for a, b in zip(gazed, dense, strict=True):
        assert a.tobytes() == b.tobytes()


def test_q8_0_cache(model):
    with model.session(gaze=False, kv_type="q8_0") as s:
        prompt(s)
        dense = np.stack(decode(s, 4))
    with model.session(keep_regions=N_REGIONS, kv_type="q8_0") as s:
        prompt(s)
        steps = np.stack(decode(s, 4))
        assert s.trace().k == N_REGIONS
    assert steps.tobytes() == dense.tobytes()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep_regions": -1}, "keep_regions"),
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"score_mode": "max"}, "score_mode"),
        ({"kv_type": "q4_0"}, "kv_type"),
    ],
)
def test_invalid_settings_are_refused(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.session(**kwargs)


def test_settings_reach_the_context(model):
    with model.session(keep_regions=5, score_mode="per_head") as s:
        assert s.gaze and s.selection()[0] == 5 and s.score_mode == "per_head"
    with model.session(keep_ratio=0.5) as s:
        assert s.selection() == (0, 0.5)
    with model.session(gaze=False) as s:
        assert not s.gaze


def test_rewind_restores_the_cache_exactly(model):
    """append + rewind leaves the sequence as it was: the same token appended again gives the same
    logits bit for bit (the benchmark times steps this way)."""
    with model.session() as s:
        prompt(s)
        first = s.append(5)
        n_past, n_items = s.n_past, len(s.history)
        s.rewind(1)
        assert s.n_past == n_past - 1 and len(s.history) == n_items - 1
        with pytest.raises(RuntimeError, match="no logits"):
            s.logits()
        assert np.array_equal(s.append(5), first)
        assert s.trace() is not None


def test_rewind_cannot_cut_an_image(model):
    with model.session() as s:
        prompt(s)
        n_past = s.n_past
        n_tail = len(model.tokenize("\nDescribe the image.\nASSISTANT:"))
        with pytest.raises(ValueError, match="image"):
            s.rewind(n_tail + 1)
        with pytest.raises(ValueError):
            s.rewind(-1)
        assert s.n_past == n_past
        s.rewind(n_tail)  # the text after the image can go
        assert s.n_past == n_past - n_tail


def test_configure_switches_modes_on_one_cache(model):
    """Dense after a gaze step on the same session equals a dense session; gaze after dense equals
    a gaze session; keep_ratio clears keep_regions."""
    with model.session(gaze=False) as dense, model.session() as gazing:
        prompt(dense)
        prompt(gazing)
        want_dense, want_gaze = dense.append(7), gazing.append(7)
    with model.session() as s:
        prompt(s)
        s.append(7)
        s.rewind(1)
        s.configure(gaze=False)
        assert np.array_equal(s.append(7), want_dense) and s.trace() is None
        s.rewind(1)
        s.configure(gaze=True, keep_regions=2)
        assert s.selection()[0] == 2
        s.configure(keep_ratio=0.25)
        assert s.selection() == (0, 0.25)
        assert np.array_equal(s.append(7), want_gaze)
        with pytest.raises(ValueError, match="keep_ratio"):
            s.configure(keep_ratio=0)


def test_image_positions_without_encoding(model):
    from PIL import Image

    picture = Image.fromarray(image(1))
    with model.session() as s:
        s.add_text("USER: ")
        before = s.n_past
        s.add_image(picture)
        assert model.image_positions(picture) == s.n_past - before == 7 * 7 + GAZE.n_context_tokens
