"""Gaze pictures: region boxes, selection frequency, and the drawn panels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gaze_edge.gazemap import PANEL, RegionGrid, render, selection_frequency


def test_region_boxes_tile_the_picture_with_smaller_edge_regions():
    grid = RegionGrid(grid_h=7, grid_w=9, region_h=2, region_w=4)
    assert grid.n_regions == 4 * 3
    covered = np.zeros((70, 90), dtype=int)
    for r in range(grid.n_regions):
        x0, y0, x1, y1 = grid.box(r, 90, 70)
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()
    assert grid.box(grid.n_regions - 1, 90, 70) == (80, 60, 90, 70)  # 1x1-token corner region


def test_selection_frequency_counts_each_layer_head_once():
    sel = np.array([[[0, 1], [0, 2]], [[0, 0], [3, -1]]])  # (layers=2, heads=2, k=2)
    f = selection_frequency(sel, 4)
    assert f.tolist() == [0.75, 0.25, 0.25, 0.25]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_render_highlights_the_selected_region(tmp_path, suffix):
    image = Image.new("RGB", (196, 196), (90, 90, 90))
    grid = RegionGrid(14, 14, 2, 2)  # 7x7 regions
    sel = np.zeros((3, 2, 1), dtype=int)  # every layer/head picks region 0 (top left)
    out = render(image, grid, [("red", sel), ("circle", sel + 48)], tmp_path / f"m{suffix}")
    assert out.exists() and not list(tmp_path.glob(".*.tmp"))
    opened = Image.open(out)
    n_frames = getattr(opened, "n_frames", 1)
    pic = opened.convert("RGB")
    if suffix == ".png":
        assert pic.size == (2 * PANEL, PANEL + 18)
        a = np.asarray(pic, dtype=float)
        picked, other, last = a[5, 5], a[100, 100], a[PANEL - 5, 2 * PANEL - 5]
        assert picked[0] > other[0] + 40  # bright and outlined where it looked
        assert last[0] > other[0] + 40  # second panel: region 48 (bottom right)
    else:
        assert n_frames == 2


def test_render_without_steps_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="nothing to draw"):
        render(Image.new("RGB", (8, 8)), RegionGrid(2, 2, 1, 1), [], tmp_path / "m.png")
