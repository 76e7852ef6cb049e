"""How many regions keep_ratio keeps: one exact rule in the spec, the reference and the runtime.

GAZE_SPEC.md, Selection: k = ceil(ppm * n / 10^6) in integers, ppm = keep_ratio (as a float32)
in parts per million. v1 computed ceil(ratio * n - 1e-6) in double while the runtime holds the
ratio as a float32: 0.6 over 45 regions (three 14 x 14 grids in 3 x 5 regions) selected 28
regions per head in the runtime and 27 in the reference. The sweep below failed on the v1 runtime
and passes on the ppm rule.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from gaze_edge.config import GazeConfig, keep_ratio_ppm, n_selected


def exact_k(ratio_text: str, n: int) -> int:
    return max(1, min(n, math.ceil(Fraction(ratio_text) * n)))


@pytest.mark.parametrize("decimals", [2, 3])
def test_a_ratio_with_few_decimals_keeps_exactly_ceil_ratio_times_n(decimals):
    scale = 10**decimals
    for j in range(1, scale + 1):
        text = f"{j / scale:.{decimals}f}"
        for n in (1, 7, 15, 45, 49, 90, 340, 341, 680, 681, 1000, 4096, 16384):
            assert n_selected(0, float(text), n) == exact_k(text, n), (text, n)


def test_the_reported_cases():
    assert n_selected(0, 0.6, 45) == 27
    assert n_selected(0, 0.3, 90) == 27
    assert n_selected(0, 0.1, 680) == 68
    assert n_selected(0, 0.2, 340) == 68
    assert GazeConfig(2, 2, keep_ratio=0.6).n_selected(45) == 27


def test_ppm_reads_the_ratio_as_float32():
    assert keep_ratio_ppm(0.6) == 600000  # float32(0.6) = 0.60000002384...
    assert keep_ratio_ppm(1e-7) == 0 and n_selected(0, 1e-7, 100) == 1  # clamped to one region
    assert n_selected(5, 0.6, 45) == 5 and n_selected(100, 0.6, 45) == 45 and n_selected(0, 0.6, 0) == 0


@pytest.mark.runtime
def test_runtime_selects_the_spec_k_over_a_sweep(tmp_path):
    """Three-by-five regions on 14 x 14 grids: 15 regions per image, 1 to 6 images (n = 15 ... 90),
    keep_ratio 0.01 ... 1.00: the runtime's k (from its trace) equals the spec's every time."""
    from PIL import Image

    from gaze_edge.convert import convert
    from gaze_edge.convert.tiny import tiny_checkpoint
    from gaze_edge.runtime.model import GazeModel

    gaze = GazeConfig(region_h=3, region_w=5, n_context_tokens=1, top_k=0, keep_ratio=0.25)
    ckpt = tiny_checkpoint("llava", tmp_path / "ckpt", gaze=gaze, seed=2, image_size=196)
    llm, _ = convert(ckpt, tmp_path / "gguf", outtype="f32", progress=False)
    picture = Image.new("RGB", (196, 196), (90, 140, 200))
    mismatches = []
    with GazeModel.load(llm.parent, n_threads=2) as model, model.session(n_ctx=2048) as s:
        s.add_text("USER: ")
        for n_images in range(1, 7):
            s.add_image(picture)
            s.add_text("\nQ")
            n = s.n_regions
            assert n == 15 * n_images
            token = int(s.logits().argmax())
            for j in range(1, 101):
                ratio = j / 100
                s.configure(keep_ratio=ratio)
                s.append(token)
                got = s.trace().k
                s.rewind(1)
                if got != n_selected(0, ratio, n):
                    mismatches.append((ratio, n, got, n_selected(0, ratio, n)))
    assert not mismatches, mismatches[:10]


def test_visual_kv_fraction_counts_kv_heads():
    """GAZE_SPEC.md "Accounting": per_head selections of one KV head's query heads count once per
    region they read (the union), not once per query head."""
    import numpy as np

    from gaze_edge.config import visual_kv_fraction

    sizes = np.array([4, 4, 2, 1])  # 11 grid tokens
    # one layer, 2 KV heads x 2 query heads each, k = 1
    same = np.array([[[0], [0], [3], [3]]])  # each group agrees: KV head 0 reads region 0, KV head 1 region 3
    assert visual_kv_fraction(same, sizes, n_kv_heads=2) == (4 + 1) / (11 * 2)
    apart = np.array([[[0], [1], [2], [3]]])  # the query heads of each group disagree: unions {0, 1}, {2, 3}
    assert visual_kv_fraction(apart, sizes, n_kv_heads=2) == (4 + 4 + 2 + 1) / (11 * 2)
    # counted per query head (the old rule) the second case would read 11 / 44
    assert visual_kv_fraction(apart, sizes, n_kv_heads=None) == 11 / 44
    # a selection per KV head (gqa_mean): S == KV heads, nothing to group
    assert visual_kv_fraction(np.array([[[0, 1], [2, 3]]]), sizes, n_kv_heads=2) == (8 + 3) / 22
    with np.testing.assert_raises(ValueError):
        visual_kv_fraction(np.zeros((1, 3, 1), dtype=int), sizes, n_kv_heads=2)
    # dense first layers (n_dense_layers): each reads every grid token of every KV head, and
    # `selected` holds the gazed layers only; 0 is the rule above
    assert visual_kv_fraction(apart, sizes, n_kv_heads=2, n_dense_layers=0) == (4 + 4 + 2 + 1) / (11 * 2)
    assert visual_kv_fraction(apart, sizes, n_kv_heads=2, n_dense_layers=1) == (11 * 2 + 11) / (11 * 2 * 2)
    assert visual_kv_fraction(same, sizes, n_kv_heads=2, n_dense_layers=3) == (11 * 2 * 3 + 5) / (11 * 2 * 4)
    # every layer dense: no gazed rows, everything read
    assert visual_kv_fraction(np.zeros((0, 4, 1), dtype=int), sizes, n_kv_heads=2, n_dense_layers=2) == 1.0
