"""The reference's pure gaze functions against brute-force restatements of GAZE_SPEC.md."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gaze_edge.config import GazeConfig
from gaze_edge.reference import (
    NON_GRID,
    count_regions,
    grid_token_regions,
    region_descriptors,
    region_scores,
    region_token_counts,
    select_regions,
    selected_region_ids,
    selection_sizes,
    visible_tokens,
)

torch.set_num_threads(1)
FAST = settings(max_examples=40, deadline=None)


def test_odd_grid_7x9_with_2x4_regions_covers_every_token_once():
    regions = grid_token_regions(7, 9, 2, 4).view(7, 9)
    assert count_regions(7, 9, 2, 4) == 4 * 3
    # Region 0 is rows 0-1, cols 0-3; the last region (bottom-right) is row 6, col 8 only.
    assert (regions[:2, :4] == 0).all()
    assert (regions[:2, 4:8] == 1).all()
    assert (regions[:2, 8] == 2).all()
    assert regions[6, 8] == 11
    counts = region_token_counts(7, 9, 2, 4)
    assert counts.tolist() == [8, 8, 2] * 3 + [4, 4, 1]
    assert int(counts.sum()) == 63


@FAST
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 5), st.integers(1, 5))
def test_regions_tile_the_grid_in_raster_order(grid_h, grid_w, region_h, region_w):
    regions = grid_token_regions(grid_h, grid_w, region_h, region_w).view(grid_h, grid_w)
    per_row = math.ceil(grid_w / region_w)
    n = count_regions(grid_h, grid_w, region_h, region_w)
    assert n == math.ceil(grid_h / region_h) * per_row
    for row in range(grid_h):
        for col in range(grid_w):
            assert regions[row, col] == (row // region_h) * per_row + col // region_w
    # every region exists and holds the rectangle's tokens that exist
    counts = region_token_counts(grid_h, grid_w, region_h, region_w)
    for r in range(n):
        band_h = min(region_h, grid_h - (r // per_row) * region_h)
        band_w = min(region_w, grid_w - (r % per_row) * region_w)
        assert counts[r] == band_h * band_w


def _brute_descriptors(keys, token_region, n_regions):
    batch, heads, _, dim = keys.shape
    out = torch.zeros(batch, heads, n_regions, dim, dtype=torch.float64)
    for b in range(batch):
        for r in range(n_regions):
            idx = (token_region[b] == r).nonzero().flatten()
            if len(idx):
                out[b, :, r] = keys[b][:, idx].double().mean(dim=1)
    return out


@FAST
@given(st.integers(0, 10_000))
def test_descriptors_are_region_means_of_the_keys(seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, 20, 8, generator=g)
    token_region = torch.randint(-1, 5, (2, 20), generator=g)
    d = region_descriptors(keys, token_region, 5)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d.double(), _brute_descriptors(keys, token_region, 5), atol=1e-6, rtol=1e-6)


def test_descriptors_are_f32_for_half_keys():
    keys = torch.randn(1, 2, 6, 4).to(torch.bfloat16)
    d = region_descriptors(keys, torch.tensor([[0, 0, 1, 1, -1, -1]]), 2)
    assert d.dtype == torch.float32


def test_score_modes_follow_the_spec_without_scaling():
    g = torch.Generator().manual_seed(1)
    query = torch.randn(2, 6, 3, 8, generator=g, dtype=torch.float64)  # 6 query heads, 3 per KV head
    desc = torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64)
    per_head = region_scores(query, desc, "per_head")
    for h in range(6):
        torch.testing.assert_close(per_head[:, h], query[:, h] @ desc[:, h // 3].transpose(-1, -2))
    gqa = region_scores(query, desc, "gqa_mean")
    assert gqa.shape == (2, 2, 3, 5)
    for kv in range(2):
        qbar = query[:, 3 * kv : 3 * kv + 3].mean(dim=1)
        torch.testing.assert_close(gqa[:, kv], qbar @ desc[:, kv].transpose(-1, -2))
        # by linearity: the group mean of the per-head scores
        torch.testing.assert_close(gqa[:, kv], per_head[:, 3 * kv : 3 * kv + 3].mean(dim=1))
    layer = region_scores(query, desc, "layer_mean")
    assert layer.shape == (2, 1, 3, 5)
    torch.testing.assert_close(layer[:, 0], per_head.mean(dim=1))


def _brute_select(scores, k, n_regions):
    out = torch.zeros_like(scores, dtype=torch.bool)
    batch, sel, nq, _ = scores.shape
    for b in range(batch):
        for s in range(sel):
            for q in range(nq):
                order = sorted(range(int(n_regions[b])), key=lambda r: (-float(scores[b, s, q, r]), r))
                out[b, s, q, order[: int(k[b])]] = True
    return out


@FAST
@given(st.integers(0, 10_000), st.booleans())
def test_selection_is_top_k_with_lower_index_winning_ties(seed, coarse):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 2, 4, 7, generator=g)
    if coarse:  # many exact ties
        scores = scores.round()
    n_regions = torch.tensor([7, 5, 1])
    k = torch.randint(1, 8, (3,), generator=g).minimum(n_regions)
    selected = select_regions(scores, k, n_regions)
    assert torch.equal(selected, _brute_select(scores, k, n_regions))
    assert torch.equal(selected.sum(-1), k[:, None, None].expand(3, 2, 4))
    assert not selected[1, ..., 5:].any() and not selected[2, ..., 1:].any()


def test_all_ties_select_the_first_regions():
    selected = select_regions(torch.zeros(1, 1, 1, 6), torch.tensor([3]), torch.tensor([6]))
    assert selected[0, 0, 0].tolist() == [True, True, True, False, False, False]
    assert selected_region_ids(selected[0, 0]).tolist() == [[0, 1, 2]]


def test_selection_sizes_follow_gaze_config():
    n = torch.tensor([0, 1, 10, 49, 200])
    for config in (GazeConfig(top_k=4), GazeConfig(keep_ratio=0.1), GazeConfig(keep_ratio=1.0), GazeConfig(top_k=500)):
        assert selection_sizes(config, n).tolist() == [config.n_selected(int(x)) for x in n]
    assert selection_sizes(GazeConfig(keep_ratio=0.1), torch.tensor([49])).tolist() == [5]  # ceil(4.9)


@FAST
@given(st.integers(0, 10_000), st.sampled_from([1, 2, 4]))
def test_visible_tokens(seed, n_sel):
    g = torch.Generator().manual_seed(seed)
    n_heads, n_regions = 4, 5
    selected = torch.rand(2, n_sel, 3, n_regions, generator=g) < 0.4
    token_region = torch.randint(-1, n_regions, (2, 16), generator=g)
    visible = visible_tokens(selected, token_region, n_heads)
    assert visible.shape == (2, n_heads, 3, 16)
    for b in range(2):
        for h in range(n_heads):
            s = 0 if n_sel == 1 else h // (n_heads // n_sel)
            for q in range(3):
                for t in range(16):
                    r = int(token_region[b, t])
                    expected = True if r == NON_GRID else bool(selected[b, s, q, r])
                    assert bool(visible[b, h, q, t]) == expected


def test_selected_region_ids_rejects_ragged_rows():
    with pytest.raises(ValueError):
        selected_region_ids(torch.tensor([[True, False], [True, True]]))
