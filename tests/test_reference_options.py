"""The training-free selection options of GAZE_SPEC.md in the PyTorch reference: the ``gqa_max``
score mode, dense first layers (``n_dense_layers``) and pooled context tokens.

Each is checked against a brute-force restatement of the spec (scores from the captured queries
and cached keys, logits of the unmodified model over a cache pruned by hand, pooled tokens
averaged by explicit loops), on tiny random models of both families (LLaVA-1.5 with a Llama
text model, Qwen2-VL / Qwen2.5-VL), several images and odd grids.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference_helpers import capture_queries
from transformers import DynamicCache

from gaze_edge.config import (
    CONTEXT_TOKEN_MODES,
    SCORE_MODES,
    GazeConfig,
    pooled_context_tiles,
    visual_kv_fraction,
)
from gaze_edge.gguf_names import SCORE_MODE_IDS
from gaze_edge.reference import GazeVLM, build_sequence, pooled_context_tokens, region_scores, select_regions
from gaze_edge.reference.tiny_models import QWEN2_VL_TOKENS, qwen2_vl_pixels, tiny_llava, tiny_qwen2_vl

torch.set_num_threads(1)
ANSWER = [10, 11, 12, 13]


# --- models and prompts ---------------------------------------------------------------------

def make_case(family: str, *, n_layers: int = 2, n_kv_heads: int = 2, attn: str = "eager", grids=None,
              double: bool = False):
    """(model, prompt (1, L), image kwargs). grids: LLaVA image count (7x7 grids, 98 px), or the
    Qwen2-VL patch grids (t, h, w) of each image (an h/2 x w/2 token grid)."""
    if family == "llava":
        model = tiny_llava(image_size=98, n_layers=n_layers, n_kv_heads=n_kv_heads, attn_implementation=attn)
        n_images = grids or 2
        g = torch.Generator().manual_seed(7)
        kwargs = dict(pixel_values=torch.randn(n_images, 3, 98, 98, generator=g))
        chunks = [[model.config.image_token_id] * 49] * n_images
    else:
        version = "2.5" if family == "qwen2_5_vl" else "2"
        model = tiny_qwen2_vl(version=version, n_layers=n_layers, n_kv_heads=n_kv_heads, attn_implementation=attn)
        grids = grids or [(1, 10, 14), (1, 6, 10)]  # 5x7 and 3x5 token grids
        tok = QWEN2_VL_TOKENS
        chunks = [[tok["vision_start"]] + [tok["image"]] * (h * w // 4) + [tok["vision_end"]] for _, h, w in grids]
        px, thw = qwen2_vl_pixels(grids, seed=3)
        kwargs = dict(pixel_values=px, image_grid_thw=thw)
    prompt = [1, 5, 6]
    for i, chunk in enumerate(chunks):
        prompt += chunk + [7 + i]
    prompt += [8, 9]
    if double:
        model.double()
        kwargs = {k: v.double() if v.is_floating_point() else v for k, v in kwargs.items()}
    return model, torch.tensor([prompt]), kwargs


def _ids(prompt):
    return torch.cat([prompt, torch.tensor([ANSWER])], dim=1)


def _brute_scores(q, keys, region, n_regions, mode):
    """Spec steps 1-2 by loops: q (Hq, D), keys (Hkv, N, D) -> scores [Hkv][R] (gqa_mean / gqa_max)."""
    n_heads, n_kv = q.shape[0], keys.shape[0]
    group = n_heads // n_kv
    scores = []
    for h in range(n_kv):
        row = []
        for r in range(n_regions):
            d = keys[h, region == r].mean(dim=0)
            per_head = [float((q[j] * d).sum()) for j in range(h * group, (h + 1) * group)]
            row.append(max(per_head) if mode == "gqa_max" else sum(per_head) / group)
        scores.append(row)
    return scores


def _top(scores, k):
    """The k best regions, ties to the lower index, ascending."""
    return sorted(sorted(range(len(scores)), key=lambda r: (-scores[r], r))[:k])


# --- gqa_max --------------------------------------------------------------------------------

def test_score_modes_are_registered():
    assert "gqa_max" in SCORE_MODES and SCORE_MODE_IDS["gqa_max"] == 3
    assert set(SCORE_MODE_IDS) == set(SCORE_MODES)
    assert GazeConfig(score_mode="gqa_max").score_mode == "gqa_max"


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 2), (4, 1), (4, 4), (6, 3)])
def test_gqa_max_is_the_max_over_each_groups_query_heads(n_heads, n_kv_heads):
    g = torch.Generator().manual_seed(n_heads * 10 + n_kv_heads)
    query = torch.randn(2, n_heads, 3, 8, generator=g, dtype=torch.float64)
    descriptors = torch.randn(2, n_kv_heads, 5, 8, generator=g, dtype=torch.float64)
    got = region_scores(query, descriptors, "gqa_max")
    assert got.shape == (2, n_kv_heads, 3, 5)
    group = n_heads // n_kv_heads
    want = torch.empty_like(got)
    for b in range(2):
        for h in range(n_kv_heads):
            for i in range(3):
                for r in range(5):
                    want[b, h, i, r] = max(float(query[b, j, i] @ descriptors[b, h, r])
                                           for j in range(h * group, (h + 1) * group))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    if group > 1:  # a real difference from the mean of the group
        assert (got - region_scores(query, descriptors, "gqa_mean")).abs().max() > 1e-3


def test_gqa_max_keeps_a_region_one_head_wants_and_breaks_ties_by_index():
    # two query heads in one group: head 0 looks along x, head 1 along y
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    # region 0 wanted by head 1 only, region 1 by head 0 only (a tie at 1.0), region 2 by both mildly
    descriptors = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.8]]).view(1, 1, 3, 2)
    k, n = torch.tensor([1]), torch.tensor([3])
    by_max = select_regions(region_scores(query, descriptors, "gqa_max"), k, n)
    by_mean = select_regions(region_scores(query, descriptors, "gqa_mean"), k, n)
    assert by_max[0, 0, 0].nonzero().flatten().tolist() == [0]  # tie 0 vs 1: the lower index
    assert by_mean[0, 0, 0].nonzero().flatten().tolist() == [2]  # the mean prefers the compromise
    k2 = torch.tensor([2])
    assert select_regions(region_scores(query, descriptors, "gqa_max"), k2, n)[0, 0, 0].tolist() == [
        True, True, False]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_gqa_max_step_selects_what_brute_force_selects_per_kv_head(family):
    model, prompt, kwargs = make_case(family, n_kv_heads=2, double=True)
    vlm = GazeVLM(model, GazeConfig(region_h=2, region_w=3, n_context_tokens=2, top_k=4,
                                    score_mode="gqa_max")).double()
    with torch.no_grad():
        vlm.prefill(prompt, **kwargs)
        cache = copy.deepcopy(vlm._session.cache)
        captured, handles = capture_queries(vlm.text_model)
        step = vlm.step(ANSWER[0])
        for h in handles:
            h.remove()
    region = vlm._session.state.token_region[0]
    n_regions = int(vlm._session.state.n_regions[0])
    assert step.trace.selected.shape == (2, 2, 4) and step.trace.n_dense_layers == 0
    differs = False
    for layer, cached in enumerate(cache.layers):
        q = captured[layer][0, :, 0]
        by_max = _brute_scores(q, cached.keys[0], region, n_regions, "gqa_max")
        by_mean = _brute_scores(q, cached.keys[0], region, n_regions, "gqa_mean")
        assert step.trace.selected[layer].tolist() == [_top(s, 4) for s in by_max]
        differs |= [_top(s, 4) for s in by_max] != [_top(s, 4) for s in by_mean]
    assert differs, "the case does not tell gqa_max from gqa_mean"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_gqa_max_with_every_region_is_dense_exactly(family):
    model, prompt, kwargs = make_case(family)
    vlm = GazeVLM(model, GazeConfig(region_h=2, region_w=3, n_context_tokens=2, top_k=99, score_mode="gqa_max"))
    ids, start = _ids(prompt), prompt.shape[1]
    with torch.no_grad():
        assert torch.equal(vlm(ids, **kwargs, gaze_start=start).logits, vlm(ids, **kwargs).logits)


# --- dense first layers -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_dense_first_layers_against_a_hand_pruned_cache(family):
    """n_dense_layers = 1 of 3 with gqa_max: layer 0 attends to the whole cache, layers 1-2 to
    the brute-force selection; the logits equal the unmodified model (sdpa, which takes a
    different key count per layer) decoding over a cache pruned that way."""
    model, prompt, kwargs = make_case(family, n_layers=3, n_kv_heads=1, attn="sdpa", double=True)
    reference = copy.deepcopy(model)
    config = GazeConfig(region_h=2, region_w=3, n_context_tokens=2, top_k=3, score_mode="gqa_max", n_dense_layers=1)
    vlm = GazeVLM(model, config).double()
    with torch.no_grad():
        vlm.prefill(prompt, **kwargs)
        session = vlm._session
        cache, position = copy.deepcopy(session.cache), session.next_position
        captured, handles = capture_queries(vlm.text_model)
        step = vlm.step(ANSWER[0])
        for h in handles:
            h.remove()
        region = session.state.token_region[0]
        n_regions = int(session.state.n_regions[0])
        assert step.trace.n_dense_layers == 1 and step.trace.selected.shape == (2, 1, 3)
        pruned = DynamicCache(config=reference.model.language_model.config)
        for layer, cached in enumerate(cache.layers):
            keys, values = cached.keys, cached.values
            if layer >= 1:
                best = _top(_brute_scores(captured[layer][0, :, 0], keys[0], region, n_regions, "gqa_max")[0], 3)
                assert step.trace.selected[layer - 1].tolist() == [best]
                keep = (region < 0) | torch.isin(region, torch.tensor(best))
                keys, values = keys[:, :, keep], values[:, :, keep]
            pruned.update(keys, values, layer)
        pos = torch.tensor([[position]])
        if family != "llava":
            pos = pos[None].expand(3, 1, 1)
        embeds = reference.get_input_embeddings()(torch.tensor([[ANSWER[0]]]))
        hidden = reference.model.language_model(inputs_embeds=embeds, position_ids=pos, cache=pruned,
                                                use_cache=True).last_hidden_state
        expected = reference.lm_head(hidden[0, -1])
    torch.testing.assert_close(step.logits, expected, atol=1e-10, rtol=0)
    # and the dense layer made a difference: all three layers gazing give other logits
    with torch.no_grad():
        vlm.gaze_config = config.replace(n_dense_layers=0)
        vlm.prefill(prompt, **kwargs)
        assert (vlm.step(ANSWER[0]).logits - step.logits).abs().max() > 1e-6


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("n_dense", [2, 5])
def test_every_layer_dense_gives_dense_logits_at_every_step(family, n_dense):
    model, prompt, kwargs = make_case(family, n_layers=2)
    vlm = GazeVLM(model, GazeConfig(region_h=2, region_w=2, n_context_tokens=2, top_k=1, n_dense_layers=n_dense))
    ids, start = _ids(prompt), prompt.shape[1]
    with torch.no_grad():
        forced = vlm(ids, **kwargs, gaze_start=start, return_selections=True)
        assert forced.selections == {}
        assert torch.equal(forced.logits, vlm(ids, **kwargs).logits)
        vlm.prefill(prompt, **kwargs)
        gazed = [vlm.step(t) for t in ANSWER]
        vlm.prefill(prompt, **kwargs)
        dense = [vlm.step(t, generated=False) for t in ANSWER]
    for a, b in zip(gazed, dense, strict=True):
        assert torch.equal(a.logits, b.logits)
        assert a.trace.selected.shape == (0, 2, 1) and a.trace.n_dense_layers == 2
        assert a.trace.visual_kv_fraction() == 1.0
    assert all(b.trace is None for b in dense)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_no_dense_layers_gazes_in_every_layer_and_one_changes_only_the_later_ones(family):
    model, prompt, kwargs = make_case(family, n_layers=3, double=True)
    ids, start = _ids(prompt), prompt.shape[1]
    logits, keys = {}, {}
    for n_dense in (0, 1):
        config = GazeConfig(region_h=2, region_w=3, n_context_tokens=2, keep_ratio=0.2, n_dense_layers=n_dense)
        vlm = GazeVLM(model, config).double()
        with torch.no_grad():
            full = vlm(ids, **kwargs, gaze_start=start, return_selections=True)
            steps = [vlm.prefill(prompt, **kwargs)] + [vlm.step(t) for t in ANSWER]
        keys[n_dense] = sorted(full.selections)
        logits[n_dense] = full.logits
        # teacher forcing equals decoding one token at a time, selections included
        torch.testing.assert_close(full.logits[0, start - 1:], torch.stack([s.logits for s in steps]),
                                   atol=1e-10, rtol=0)
        for i, step in enumerate(steps[1:]):
            query = int(full.sequence.source_index[0, start + i])
            assert step.trace.n_dense_layers == n_dense and step.trace.selected.shape[0] == 3 - n_dense
            for row, layer in enumerate(range(n_dense, 3)):
                _, sel = full.selections[layer].at(query)
                assert step.trace.selected[row].tolist() == [r.nonzero().flatten().tolist() for r in sel]
        dense = vlm(ids, **kwargs).logits
        assert (full.logits[0, start:] - dense[0, start:]).abs().max() > 1e-6  # gaze acts
    assert keys == {0: [0, 1, 2], 1: [1, 2]}
    assert (logits[0] - logits[1]).abs().max() > 1e-6


def test_trace_accounting_counts_dense_layers_as_reading_everything():
    model, prompt, kwargs = make_case("llava", n_layers=3, n_kv_heads=2)
    vlm = GazeVLM(model, GazeConfig(region_h=3, region_w=3, n_context_tokens=1, top_k=2, n_dense_layers=1))
    with torch.no_grad():
        vlm.prefill(prompt, **kwargs)
        trace = vlm.step(ANSWER[0]).trace
    sizes = trace.region_sizes
    assert trace.selected.shape == (2, 2, 2) and int(sizes.sum()) == 98
    read = sum(int(sizes[r]) for r in trace.selected.flatten().tolist())  # gqa_mean: no unions
    assert trace.visual_kv_fraction() == pytest.approx((98 * 2 * 1 + read) / (98 * 2 * 3))


def test_visual_kv_fraction_with_dense_layers_by_hand():
    sizes = np.array([4, 4, 2, 1])  # 11 grid tokens
    one = np.array([[[0], [3]]])  # one gazed layer, 2 KV heads, k = 1: reads 4 + 1
    assert visual_kv_fraction(one, sizes, 2, n_dense_layers=0) == 5 / 22
    assert visual_kv_fraction(one, sizes, 2, n_dense_layers=2) == (2 * 22 + 5) / (22 * 3)
    assert visual_kv_fraction(np.zeros((0, 2, 1), dtype=int), sizes, 2, n_dense_layers=3) == 1.0
    with pytest.raises(ValueError):
        visual_kv_fraction(np.zeros((0, 2, 1), dtype=int), sizes, 2, n_dense_layers=0)


def test_config_validates_the_new_fields_and_reads_old_dicts_with_defaults():
    assert GazeConfig().n_dense_layers == 0 and GazeConfig().context_tokens == "learned"
    assert CONTEXT_TOKEN_MODES == ("learned", "pooled")
    with pytest.raises(ValueError, match="n_dense_layers"):
        GazeConfig(n_dense_layers=-1)
    with pytest.raises(ValueError, match="context_tokens"):
        GazeConfig(context_tokens="mean")
    old = {"region_h": 2, "region_w": 3, "n_context_tokens": 4, "top_k": 0, "keep_ratio": 0.5,
           "score_mode": "per_head"}
    assert GazeConfig.from_dict(old) == GazeConfig(**old, n_dense_layers=0, context_tokens="learned")
    new = GazeConfig(n_dense_layers=3, context_tokens="pooled", score_mode="gqa_max")
    assert GazeConfig.from_dict(new.to_dict()) == new and new.pooled


# --- pooled context tokens ------------------------------------------------------------------

# GAZE_SPEC.md "Pooled context tokens" on a 5x7 grid, written out by hand: (rows, cols) ranges
TILES_5x7 = {
    1: [(0, 5, 0, 7)],
    2: [(0, 5, 0, 3), (0, 5, 3, 7)],  # 1 x 2: cols floor(7/2) = 3
    3: [(0, 5, 0, 2), (0, 5, 2, 4), (0, 5, 4, 7)],  # 1 x 3
    4: [(0, 2, 0, 3), (0, 2, 3, 7), (2, 5, 0, 3), (2, 5, 3, 7)],  # 2 x 2
    6: [(0, 2, 0, 2), (0, 2, 2, 4), (0, 2, 4, 7), (2, 5, 0, 2), (2, 5, 2, 4), (2, 5, 4, 7)],  # 2 x 3
}


@pytest.mark.parametrize("n_tokens", sorted(TILES_5x7))
def test_pooled_tiles_of_an_odd_grid(n_tokens):
    assert pooled_context_tiles(5, 7, n_tokens) == TILES_5x7[n_tokens]


def test_pooled_tiles_that_would_be_empty_take_the_whole_grid():
    assert pooled_context_tiles(1, 1, 4) == [(0, 1, 0, 1)] * 4
    # 7 x 1 with C = 2 (1 x 2 tiles): the first column tile is empty, the second is column 0
    assert pooled_context_tiles(7, 1, 2) == [(0, 7, 0, 1), (0, 7, 0, 1)]
    # 2 x 7 with C = 9 (3 x 3): row tile 0 is empty (rows 0..-1), then row 0, then row 1
    tiles = pooled_context_tiles(2, 7, 9)
    assert tiles[:3] == [(0, 2, 0, 7)] * 3
    assert tiles[3:6] == [(0, 1, 0, 2), (0, 1, 2, 4), (0, 1, 4, 7)]
    assert tiles[6:] == [(1, 2, 0, 2), (1, 2, 2, 4), (1, 2, 4, 7)]
    assert pooled_context_tiles(3, 3, 0) == []
    # 12 = 3 x 4 (the largest divisor <= sqrt(12) is 3), 7 = 1 x 7 (a prime)
    assert len(pooled_context_tiles(6, 8, 12)) == 12 and pooled_context_tiles(6, 8, 12)[4] == (2, 4, 0, 2)
    assert pooled_context_tiles(5, 7, 7) == [(0, 5, j, j + 1) for j in range(7)]


@pytest.mark.parametrize("n_tokens", [1, 2, 4, 6])
def test_pooled_tokens_equal_a_hand_computation_on_a_5x7_grid(n_tokens):
    features = torch.randn(35, 6, generator=torch.Generator().manual_seed(n_tokens))
    got = pooled_context_tokens(features, 5, 7, n_tokens)
    assert got.dtype == torch.float32 and got.shape == (n_tokens, 6)
    for c, (r0, r1, c0, c1) in enumerate(TILES_5x7[n_tokens]):
        rows = [features[row * 7 + col].double() for row in range(r0, r1) for col in range(c0, c1)]
        torch.testing.assert_close(got[c].double(), sum(rows) / len(rows), atol=1e-6, rtol=0)
    if n_tokens == 1:
        torch.testing.assert_close(got[0], features.mean(0))


def test_pooled_tokens_average_in_f32_for_bf16_embeddings():
    features = torch.randn(35, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    got = pooled_context_tokens(features, 5, 7, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[0], features.float().mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rope", ["1d", "mrope"])
def test_build_sequence_puts_each_images_pooled_tokens_where_learned_ones_go(rope):
    E, C = 4, 4
    layout = "tt" + "i" * 35 + "t" + "i" * 6 + "tt"  # a 5x7 and a 2x3 image
    ids = torch.tensor([[1 if ch == "i" else 0 for ch in layout]])
    embeds = torch.arange(len(layout) * E, dtype=torch.float32).view(1, -1, E)
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(35, E, generator=g), torch.randn(6, E, generator=g)]
    grids = [(5, 7), (2, 3)]
    pooled = build_sequence(embeds, ids.bool(), features, grids, None,
                            GazeConfig(n_context_tokens=C, context_tokens="pooled"), rope=rope)
    learned = build_sequence(embeds, ids.bool(), features, grids, torch.zeros(C, E),
                             GazeConfig(n_context_tokens=C), rope=rope)
    for name in ("position_ids", "token_region", "n_regions", "is_context", "source_index", "next_position"):
        assert torch.equal(getattr(pooled, name), getattr(learned, name)), name
    assert pooled.images == learned.images
    assert pooled.is_context[0].nonzero().flatten().tolist() == [37, 38, 39, 40, 48, 49, 50, 51]
    for span, f, (h, w) in zip(pooled.images[0], features, grids, strict=True):
        rows = pooled.inputs_embeds[0, span.context_start:span.context_end]
        assert torch.equal(rows, pooled_context_tokens(f, h, w, C))
    # the 2x3 grid with C = 4 (2 x 2 tiles): cols floor(3/2) = 1 -> tiles (0, 0..0), (0, 1..2), ...
    second = pooled.inputs_embeds[0, 48:52]
    torch.testing.assert_close(second[1], features[1][[1, 2]].mean(0))
    torch.testing.assert_close(second[2], features[1][3])
    not_context = ~pooled.is_context[0]
    assert torch.equal(pooled.inputs_embeds[0, not_context], learned.inputs_embeds[0, not_context])


def test_build_sequence_rejects_a_learned_tensor_for_pooled_tokens_and_none_for_learned():
    ids = torch.tensor([[0, 1, 1, 1, 1, 0]]).bool()
    embeds, features = torch.zeros(1, 6, 4), [torch.zeros(4, 4)]
    with pytest.raises(ValueError, match="pooled"):
        build_sequence(embeds, ids, features, [(2, 2)], torch.zeros(2, 4),
                       GazeConfig(n_context_tokens=2, context_tokens="pooled"))
    with pytest.raises(ValueError, match="learned"):
        build_sequence(embeds, ids, features, [(2, 2)], None, GazeConfig(n_context_tokens=2))
    # 0 rows is "no learned tensor" too
    seq = build_sequence(embeds, ids, features, [(2, 2)], torch.zeros(0, 4),
                         GazeConfig(n_context_tokens=2, context_tokens="pooled"))
    assert int(seq.is_context.sum()) == 2


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("n_tokens", [1, 4, 6])
def test_pooled_gaze_vlm_pools_each_image_and_gaze_off_is_the_model(family, n_tokens):
    model, prompt, kwargs = make_case(family)
    reference = copy.deepcopy(model)
    config = GazeConfig(region_h=2, region_w=3, n_context_tokens=n_tokens, top_k=2, context_tokens="pooled")
    vlm = GazeVLM(model, config)
    assert vlm.context_tokens.shape == (0, model.config.text_config.hidden_size)
    ids, start = _ids(prompt), prompt.shape[1]
    with torch.no_grad():
        seq = vlm.build_sequence(ids, **kwargs)
        images = vlm.image_features(**kwargs)
        assert len(seq.images[0]) == len(images.grids) == 2
        for span, f, (h, w) in zip(seq.images[0], images.features, images.grids, strict=True):
            assert (span.grid_h, span.grid_w) == (h, w)
            assert span.context_end - span.context_start == n_tokens
            # the grid tokens carry the projector's output, and the context tokens are its pooling
            assert torch.equal(seq.inputs_embeds[0, span.grid_start:span.context_start], f)
            assert torch.equal(seq.inputs_embeds[0, span.context_start:span.context_end],
                               pooled_context_tokens(f, h, w, n_tokens))
        plain = reference.model.language_model(inputs_embeds=seq.inputs_embeds,
                                               position_ids=seq.position_ids).last_hidden_state
        expected = reference.lm_head(plain)[0, seq.source_index[0]]
        vlm.enabled = False  # gaze off: exactly the unmodified model fed the same embeddings
        assert torch.equal(vlm(ids, **kwargs, gaze_start=start).logits[0], expected)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_pooled_tokens_with_every_option_decode_like_teacher_forcing(family):
    model, prompt, kwargs = make_case(family, double=True)
    config = GazeConfig(region_h=2, region_w=3, n_context_tokens=4, keep_ratio=0.25,
                        context_tokens="pooled", score_mode="gqa_max", n_dense_layers=1)
    vlm = GazeVLM(model, config).double()
    ids, start = _ids(prompt), prompt.shape[1]
    with torch.no_grad():
        full = vlm(ids, **kwargs, gaze_start=start, return_selections=True)
        steps = [vlm.prefill(prompt, **kwargs)] + [vlm.step(t) for t in ANSWER]
        dense = vlm(ids, **kwargs).logits
    torch.testing.assert_close(full.logits[0, start - 1:], torch.stack([s.logits for s in steps]),
                               atol=1e-10, rtol=0)
    assert (full.logits[0, start:] - dense[0, start:]).abs().max() > 1e-6  # gaze acts
    for i, step in enumerate(steps[1:]):
        _, sel = full.selections[1].at(int(full.sequence.source_index[0, start + i]))
        assert step.trace.selected[0].tolist() == [r.nonzero().flatten().tolist() for r in sel]


def test_pooled_gaze_vlm_rejects_learned_tokens():
    model, _, _ = make_case("llava")
    with pytest.raises(ValueError, match="pooled context tokens take no learned tensor"):
        GazeVLM(model, GazeConfig(n_context_tokens=2, context_tokens="pooled"), torch.zeros(2, 32))
    assert GazeVLM(model, GazeConfig(n_context_tokens=2, context_tokens="pooled"),
                   torch.zeros(0, 32)).context_tokens.shape == (0, 32)
