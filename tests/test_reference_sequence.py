"""Context-token insertion and positions (GAZE_SPEC.md, "Context tokens")."""

import pytest
import torch

from gaze_edge.config import GazeConfig
from gaze_edge.reference import NON_GRID, build_sequence, gazing_queries

torch.set_num_threads(1)
E = 4


def _inputs(row_layouts):
    """row_layouts: per row a list of 't' (text) / 'i' (image placeholder) characters."""
    n = len(row_layouts[0])
    ids = torch.tensor([[1 if c == "i" else 0 for c in row] for row in row_layouts])
    embeds = torch.arange(len(row_layouts) * n * E, dtype=torch.float32).view(len(row_layouts), n, E)
    return embeds, ids.bool()


def test_context_tokens_follow_each_grid_with_1d_positions():
    embeds, mask = _inputs(["tt" + "i" * 6 + "t" + "i" * 4 + "tt"])
    features = [torch.full((6, E), -1.0), torch.full((4, E), -2.0)]
    context = torch.stack([torch.full((E,), 100.0), torch.full((E,), 200.0)])
    seq = build_sequence(embeds, mask, features, [(2, 3), (2, 2)], context, GazeConfig(region_h=1, region_w=2))
    # t t [6 grid] c c t [4 grid] c c t t
    assert seq.inputs_embeds.shape == (1, 19, E)
    assert seq.is_context[0].nonzero().flatten().tolist() == [8, 9, 15, 16]
    assert torch.equal(seq.inputs_embeds[0, 8], context[0]) and torch.equal(seq.inputs_embeds[0, 16], context[1])
    assert (seq.inputs_embeds[0, 2:8] == -1).all() and (seq.inputs_embeds[0, 11:15] == -2).all()
    assert torch.equal(seq.position_ids[0], torch.arange(19))
    # regions: 2x3 grid in 1x2 regions -> 2 per row (second one holds 1 token); then 2x2 grid -> 2
    assert seq.token_region[0].tolist() == [-1, -1, 0, 0, 1, 2, 2, 3, -1, -1, -1, 4, 4, 5, 5, -1, -1, -1, -1]
    assert seq.n_regions.tolist() == [6]
    # input token j went to source_index[j]; text is copied unchanged
    assert seq.source_index[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 17, 18]
    torch.testing.assert_close(seq.inputs_embeds[0, seq.source_index[0][[0, 1, 8, 13, 14]]],
                               embeds[0, [0, 1, 8, 13, 14]])
    assert seq.attention_mask is None
    assert seq.next_position.tolist() == [19]
    span = seq.images[0][1]
    assert (span.grid_start, span.grid_h, span.grid_w, span.context_start, span.first_region, span.n_regions,
            span.context_end) == (11, 2, 2, 15, 4, 2, 17)
    # gaze_start counts input tokens: input 13 is expanded position 17
    assert gazing_queries(seq, 13)[0].nonzero().flatten().tolist() == [17, 18]
    assert not gazing_queries(seq, 15).any()
    with pytest.raises(ValueError, match="gaze_start"):
        gazing_queries(seq, 12)


def test_mrope_positions_follow_the_spec():
    embeds, mask = _inputs(["ttt" + "i" * 6 + "tt"])
    seq = build_sequence(embeds, mask, [torch.zeros(6, E)], [(2, 3)], torch.zeros(2, E),
                         GazeConfig(), rope="mrope")
    pos = seq.position_ids[:, 0]
    assert pos.shape == (3, 13)
    # text 0,1,2; grid starts at p=3: (3, 3+row, 3+col); then p = 3 + max(2, 3) = 6
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[0, 3:9].tolist() == [3] * 6
    assert pos[1, 3:9].tolist() == [3, 3, 3, 4, 4, 4]
    assert pos[2, 3:9].tolist() == [3, 4, 5, 3, 4, 5]
    # context tokens (2) continue like text from 1 + the largest grid component, then text
    assert pos[:, 9:].tolist() == [[6, 7, 8, 9]] * 3
    assert seq.next_position.tolist() == [10]


def test_rows_of_different_lengths_are_right_padded():
    embeds, mask = _inputs(["t" + "i" * 4 + "t", "tttttt"])
    seq = build_sequence(embeds, mask, [torch.zeros(4, E)], [(2, 2)], torch.ones(3, E), GazeConfig())
    assert seq.inputs_embeds.shape == (2, 9, E)
    assert seq.attention_mask.tolist() == [[1] * 9, [1] * 6 + [0] * 3]
    assert seq.n_regions.tolist() == [1, 0]
    assert (seq.token_region[1] == NON_GRID).all()


def test_mismatched_images_are_rejected():
    embeds, mask = _inputs(["t" + "i" * 4 + "t"])
    with pytest.raises(ValueError, match="placeholders"):
        build_sequence(embeds, mask, [torch.zeros(6, E)], [(2, 3)], torch.zeros(1, E), GazeConfig())
    with pytest.raises(ValueError, match="features"):
        build_sequence(embeds, mask, [torch.zeros(3, E)], [(2, 2)], torch.zeros(1, E), GazeConfig())
    embeds, mask = _inputs(["ii" + "t" + "ii"])
    with pytest.raises(ValueError, match="consecutive"):
        build_sequence(embeds, mask, [torch.zeros(4, E)], [(2, 2)], torch.zeros(1, E), GazeConfig())
