"""Gaze for a model that was not converted for it (a community GGUF pair): `--gaze-region HxW`
(and `--context-tokens N` pooled context tokens) on `gaze-edge chat`, GazeModel.load(gaze_region=).
Parity with the reference is in test_runtime_parity.py (test_a_plain_gguf_pair_gazes_...)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gaze_edge.config import GazeConfig
from gaze_edge.convert import convert
from gaze_edge.convert.tiny import tiny_checkpoint

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(plain dense GGUF folder, learned-gaze GGUF folder, an image)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("plain-gaze")
    dense = tiny_checkpoint("llava", root / "dense", seed=4, image_size=98)
    convert(dense, root / "plain", outtype="f32", progress=False)
    gaze = tiny_checkpoint("llava", root / "gaze", seed=4, image_size=98,
                           gaze=GazeConfig(region_h=2, region_w=2, n_context_tokens=2))
    convert(gaze, root / "learned", outtype="f32", progress=False)
    img = root / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (98, 98, 3), dtype=np.uint8)).save(img)
    return root / "plain", root / "learned", img


def gaze_edge(*args):
    return subprocess.run([sys.executable, "-m", "gaze_edge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_chat_gazes_on_a_plain_pair_with_gaze_region(pairs):
    plain, _, img = pairs
    dense = gaze_edge("chat", "-m", plain, "--image", img, "-p", "Describe.", "-n", "4", "--json")
    assert dense.returncode == 0, dense.stderr
    assert json.loads(dense.stdout)["visual_kv_fraction"] is None  # nothing says gaze: dense
    r = gaze_edge("chat", "-m", plain, "--gaze-region", "2x2", "--context-tokens", "2", "--keep-ratio", "0.25",
                  "--image", img, "-p", "Describe.", "-n", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generated_tokens"] >= 2 and 0 < out["visual_kv_fraction"] < 0.5


def test_keep_ratio_alone_gazes_on_a_plain_pair_with_the_training_free_defaults(pairs):
    from gaze_edge.config import TRAINING_FREE
    from gaze_edge.runtime.model import GazeModel

    plain, learned, img = pairs
    r = gaze_edge("chat", "-m", plain, "--keep-ratio", "0.25", "--image", img, "-p", "Describe.", "-n", "4",
                  "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generated_tokens"] >= 2 and 0 < out["visual_kv_fraction"] < 0.5
    with GazeModel.load(plain, n_threads=2, gaze_region="auto") as m:
        d = m.gaze_defaults()
        assert (d.region_h, d.region_w) == (TRAINING_FREE.region_h, TRAINING_FREE.region_w)
        assert (d.n_context_tokens, d.context_tokens) == (TRAINING_FREE.n_context_tokens, "pooled")
        assert (d.keep_ratio, d.score_mode, d.n_dense_layers) == (
            TRAINING_FREE.keep_ratio, TRAINING_FREE.score_mode, TRAINING_FREE.n_dense_layers)
    with GazeModel.load(learned, n_threads=2, gaze_region="auto") as m:  # its own settings, untouched
        d = m.gaze_defaults()
        assert (d.region_h, d.region_w, d.n_context_tokens, d.context_tokens) == (2, 2, 2, "learned")


@pytest.mark.parametrize("args, code, says", [
    (["--context-tokens", "2"], 2, "--context-tokens goes with --gaze-region"),
    (["--gaze-region", "2"], 2, "--gaze-region"),
    (["--gaze-region", "0x2"], 2, "--gaze-region"),
    (["--gaze-region", "2x2", "--context-tokens", "65"], 2, "--context-tokens"),
])
def test_bad_gaze_region_flags_are_one_line_usage_errors(pairs, args, code, says):
    plain, _, img = pairs
    r = gaze_edge("chat", "-m", plain, *args, "--image", img, "-p", "hi", "-n", "1")
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gaze-edge: error:") and says in lines[0], r.stderr


def test_a_learned_gaze_model_keeps_its_own_settings(pairs):
    _, learned, img = pairs
    r = gaze_edge("chat", "-m", learned, "--gaze-region", "3x3", "--image", img, "-p", "hi", "-n", "1")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "learned gaze context tokens" in lines[0], r.stderr


def test_load_with_gaze_region_reports_pooled_defaults(pairs):
    from gaze_edge.config import TRAINING_FREE
    from gaze_edge.runtime.model import GazeModel

    plain, _, _ = pairs
    with GazeModel.load(plain, n_threads=2, gaze_region=(2, 3), context_tokens=0) as m:
        d = m.gaze_defaults()
        assert (d.region_h, d.region_w, d.n_context_tokens, d.context_tokens) == (2, 3, 0, None)
    with GazeModel.load(plain, n_threads=2, gaze_region=(2, 2), context_tokens=3) as m:
        d = m.gaze_defaults()
        assert (d.n_context_tokens, d.context_tokens) == (3, "pooled")
        assert (d.keep_ratio, d.score_mode) == (TRAINING_FREE.keep_ratio, TRAINING_FREE.score_mode)
