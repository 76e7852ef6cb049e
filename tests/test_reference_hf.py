"""The gaze reference hooked into transformers models, against the unmodified models.

Tiny random models (gaze_edge.reference.tiny_models). Tolerances: "exact" means torch.equal;
f64 comparisons use 1e-10 where both sides do the same
floating-point operations.
"""

import copy
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_helpers import capture_queries
from transformers import DynamicCache

from gaze_edge.config import GazeConfig
from gaze_edge.reference import GazeState, GazeVLM, gaze_visibility
from gaze_edge.reference.tiny_models import QWEN2_VL_TOKENS, qwen2_vl_pixels, tiny_llava, tiny_qwen2_vl

torch.set_num_threads(1)
ANSWER = [10, 11, 12, 13, 14]


@dataclass
class Case:
    """A model and a prompt holding one or more 6x6-grid images."""

    model: torch.nn.Module
    prompt: torch.Tensor  # (1, L)
    image_kwargs: dict
    family: str
    hf_extra: dict = field(default_factory=dict)

    def ids(self, answer=ANSWER):
        return torch.cat([self.prompt, torch.tensor([answer])], dim=1)

    def hf_kwargs(self, ids):
        kwargs = dict(self.image_kwargs)
        if self.family != "llava":
            kwargs["mm_token_type_ids"] = (ids == QWEN2_VL_TOKENS["image"]).int()
        return kwargs


def make_case(family="llava", *, text="llama", attn="eager", n_kv_heads=2, n_images=1, seed=0, qwen_grids=None):
    """qwen_grids: Qwen2-VL patch grids (t, h, w) per image (default 12x12 patches = 6x6 tokens)."""
    g = torch.Generator().manual_seed(seed + 100)
    if family == "llava":
        model = tiny_llava(text=text, attn_implementation=attn, n_kv_heads=n_kv_heads, seed=seed)
        img = model.config.image_token_id
        chunk = [img] * 36
        kwargs = dict(pixel_values=torch.randn(n_images, 3, 84, 84, generator=g))
    else:
        version = "2.5" if family == "qwen2_5_vl" else "2"
        model = tiny_qwen2_vl(version=version, attn_implementation=attn, n_kv_heads=n_kv_heads, seed=seed)
        tok = QWEN2_VL_TOKENS
        grids = qwen_grids or [(1, 12, 12)] * n_images
        n_images = len(grids)
        chunks = [[tok["vision_start"]] + [tok["image"]] * (h * w // 4) + [tok["vision_end"]] for _, h, w in grids]
        px, thw = qwen2_vl_pixels(grids, seed=seed)
        kwargs = dict(pixel_values=px, image_grid_thw=thw)
    prompt = [1, 5, 6]
    for i in range(n_images):
        prompt += (chunk if family == "llava" else chunks[i]) + [7 + i]
    prompt += [8, 9]
    return Case(model, torch.tensor([prompt]), kwargs, family)


FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize(
    "family,text,attn",
    [("llava", "llama", "eager"), ("llava", "qwen2", "eager"), ("llava", "llama", "sdpa"),
     ("qwen2_vl", None, "eager"), ("qwen2_vl", None, "sdpa"), ("qwen2_5_vl", None, "eager")],
)
def test_gaze_off_equals_the_unmodified_model_exactly(family, text, attn):
    case = make_case(family, text=text or "llama", attn=attn)
    reference = copy.deepcopy(case.model)
    ids = case.ids()
    with torch.no_grad():
        expected = reference(input_ids=ids, **case.hf_kwargs(ids)).logits
        vlm = GazeVLM(case.model, GazeConfig(n_context_tokens=0, top_k=2))
        assert torch.equal(vlm(ids, **case.image_kwargs).logits, expected)
        vlm.enabled = False  # gaze off, even with a gaze_start
        assert torch.equal(vlm(ids, **case.image_kwargs, gaze_start=case.prompt.shape[1]).logits, expected)
        # the wrapped model itself is unchanged when called the transformers way
        assert torch.equal(case.model(input_ids=ids, **case.hf_kwargs(ids)).logits, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_gaze_off_with_context_tokens_equals_the_model_fed_the_same_embeddings(family):
    case = make_case(family)
    reference = copy.deepcopy(case.model)
    vlm = GazeVLM(case.model, GazeConfig(n_context_tokens=3, top_k=2))
    ids = case.ids()
    with torch.no_grad():
        seq = vlm.build_sequence(ids, **case.image_kwargs)
        hidden = reference.model.language_model(
            inputs_embeds=seq.inputs_embeds, position_ids=seq.position_ids
        ).last_hidden_state
        expected = reference.lm_head(hidden)[0, seq.source_index[0]]
        vlm.enabled = False
        assert torch.equal(vlm(ids, **case.image_kwargs, gaze_start=case.prompt.shape[1]).logits[0], expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_mrope_and_1d_positions_match_transformers_with_context_tokens_as_text(family):
    """Context tokens take positions like text: with them replaced by a text token, the model's
    own position computation must give the same positions."""
    case = make_case(family, n_images=2)
    vlm = GazeVLM(case.model, GazeConfig(n_context_tokens=3))
    seq = vlm.build_sequence(case.prompt, **case.image_kwargs)
    if family == "llava":
        assert torch.equal(seq.position_ids[0], torch.arange(seq.inputs_embeds.shape[1]))
        return
    as_text = torch.full(seq.token_region.shape, 3)
    as_text[0, seq.source_index[0]] = case.prompt[0]
    mm = (as_text == QWEN2_VL_TOKENS["image"]).int()
    expected, _ = case.model.model.get_rope_index(as_text, mm, case.image_kwargs["image_grid_thw"])
    assert torch.equal(seq.position_ids, expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["gqa_mean", "per_head", "layer_mean"])
def test_top_k_at_least_n_regions_equals_dense_exactly(family, mode):
    case = make_case(family, n_images=2)
    vlm = GazeVLM(case.model, GazeConfig(region_h=2, region_w=3, n_context_tokens=2, top_k=12, score_mode=mode))
    ids, start = case.ids(), case.prompt.shape[1]
    with torch.no_grad():
        gazed = vlm(ids, **case.image_kwargs, gaze_start=start, return_selections=True)
        assert gazed.selections[0].query_index.tolist() == list(range(start + 4, ids.shape[1] + 4))
        assert gazed.selections[0].selected.all()
        dense = vlm(ids, **case.image_kwargs).logits
        assert torch.equal(gazed.logits, dense)
        vlm.prefill(case.prompt, **case.image_kwargs)
        gaze_steps = [vlm.step(t).logits for t in ANSWER]
        vlm.prefill(case.prompt, **case.image_kwargs)
        dense_steps = [vlm.step(t, generated=False).logits for t in ANSWER]
    assert all(torch.equal(a, b) for a, b in zip(gaze_steps, dense_steps, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["gqa_mean", "per_head", "layer_mean"])
def test_full_sequence_with_gaze_start_equals_incremental_decoding(family, mode):
    case = make_case(family, n_images=2)
    case.model.double()
    config = GazeConfig(region_h=2, region_w=2, n_context_tokens=2, keep_ratio=0.2, score_mode=mode)
    vlm = GazeVLM(case.model, config).double()
    ids, start = case.ids(), case.prompt.shape[1]
    image_kwargs = {k: v.double() if v.is_floating_point() else v for k, v in case.image_kwargs.items()}
    with torch.no_grad():
        full = vlm(ids, **image_kwargs, gaze_start=start, return_selections=True)
        steps = [vlm.prefill(case.prompt, **image_kwargs)]
        steps += [vlm.step(t) for t in ANSWER]
    assert steps[0].trace is None
    incremental = torch.stack([s.logits for s in steps])
    torch.testing.assert_close(full.logits[0, start - 1 :], incremental, atol=1e-10, rtol=0)
    with torch.no_grad():  # and gaze did change them (the comparison is not dense vs dense)
        dense = vlm(ids, **image_kwargs).logits
    assert (full.logits[0, start:] - dense[0, start:]).abs().max() > 1e-6
    torch.testing.assert_close(full.logits[0, :start], dense[0, :start], atol=0, rtol=0)
    # the same regions, query by query (f64: no near-ties to excuse)
    n_layers = len(full.selections)
    for i, step in enumerate(steps[1:]):
        query = int(full.sequence.source_index[0, start + i])
        for layer in range(n_layers):
            _, sel = full.selections[layer].at(query)
            ids_full = [row.nonzero().flatten().tolist() for row in sel]
            if mode == "layer_mean":
                ids_full = ids_full * vlm.n_kv_heads
            assert step.trace.selected[layer].tolist() == ids_full
    assert step.trace.n_regions == 18 and step.trace.k == 4  # ceil(0.2 * 18)


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from(FAMILIES),
    st.sampled_from(["gqa_mean", "per_head", "layer_mean"]),
    st.integers(0, 20),
    st.sampled_from([0.05, 0.3, 1.0]),
    st.integers(1, 4),
    st.integers(1, 4),
)
def test_selection_never_exceeds_k_regions(family, mode, top_k, keep_ratio, region_h, region_w):
    case = _cached_case(family)
    config = GazeConfig(region_h=region_h, region_w=region_w, n_context_tokens=1, top_k=top_k,
                        keep_ratio=keep_ratio, score_mode=mode)
    vlm = GazeVLM(case.model, config)
    n_regions = 2 * (-(-6 // region_h)) * (-(-6 // region_w))
    k = config.n_selected(n_regions)
    n_heads = case.model.config.text_config.num_attention_heads
    with torch.no_grad():
        vlm.prefill(case.prompt, **case.image_kwargs)
        trace = vlm.step(ANSWER[0]).trace
    expected_heads = n_heads if mode == "per_head" else vlm.n_kv_heads
    assert trace.selected.shape == (case.model.config.text_config.num_hidden_layers, expected_heads, k)
    assert trace.n_regions == n_regions
    for row in trace.selected.flatten(0, 1):
        assert len(set(row.tolist())) == k and all(0 <= r < n_regions for r in row.tolist())


_CASES = {}


def _cached_case(family):
    if family not in _CASES:
        _CASES[family] = make_case(family, n_images=2)
    return _CASES[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_and_context_tokens_are_always_visible(family):
    case = make_case(family)
    vlm = GazeVLM(case.model, GazeConfig(region_h=3, region_w=3, n_context_tokens=2, top_k=1))
    ids = case.ids()
    seq = vlm.build_sequence(ids, **case.image_kwargs)
    n = seq.token_region.shape[1]
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 4, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
    state = GazeState(vlm.gaze_config, seq.token_region, seq.n_regions, torch.ones(1, n, dtype=torch.bool))
    visible = gaze_visibility(0, query, key, state)
    non_grid = seq.token_region[0] < 0
    assert visible[..., non_grid].all()
    assert seq.is_context[0].sum() == 2 and non_grid[seq.is_context[0]].all()
    # each head sees exactly one 3x3 region = 9 grid tokens
    assert (visible[..., ~non_grid].sum(-1) == 9).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,n_kv_heads", [("layer_mean", 2), ("gqa_mean", 1)])
def test_a_gaze_step_equals_dense_attention_over_the_selected_cache(family, mode, n_kv_heads):
    """Independent check of steps 1-4: the selection recomputed by brute force from the cached keys
    and the queries, and the logits equal to the unmodified model decoding over a KV cache from
    which the unselected regions' tokens were removed."""
    case = make_case(family, n_kv_heads=n_kv_heads, n_images=2)
    case.model.double()
    reference = copy.deepcopy(case.model)
    config = GazeConfig(region_h=2, region_w=3, n_context_tokens=2, top_k=3, score_mode=mode)
    vlm = GazeVLM(case.model, config).double()
    image_kwargs = {k: v.double() if v.is_floating_point() else v for k, v in case.image_kwargs.items()}
    text_model = vlm.text_model
    with torch.no_grad():
        vlm.prefill(case.prompt, **image_kwargs)
        session = vlm._session
        prefill_cache = copy.deepcopy(session.cache)
        position = session.next_position
        captured, handles = capture_queries(text_model)
        step = vlm.step(ANSWER[0])
        for h in handles:
            h.remove()
        region = session.state.token_region[0]
        n_regions = int(session.state.n_regions[0])
        pruned = DynamicCache(config=reference.model.language_model.config)
        for layer, cached in enumerate(prefill_cache.layers):
            keys, values = cached.keys, cached.values
            # brute-force steps 1-3
            q = captured[layer][0, :, 0].double()  # (Hq, D)
            scores = []
            for r in range(n_regions):
                d = keys[0, :, region == r].double().mean(dim=1)  # (Hkv, D)
                group = q.shape[0] // d.shape[0]
                per_head = (q * d.repeat_interleave(group, dim=0)).sum(-1)
                scores.append(float(per_head.mean()))
            best = sorted(range(n_regions), key=lambda r: (-scores[r], r))[: config.top_k]
            assert step.trace.selected[layer].tolist() == [sorted(best)] * keys.shape[1]
            keep = (region < 0) | torch.isin(region, torch.tensor(best))
            pruned.update(keys[:, :, keep], values[:, :, keep], layer)
        embeds = reference.get_input_embeddings()(torch.tensor([[ANSWER[0]]]))
        pos = torch.tensor([[position]])
        if family != "llava":
            pos = pos[None].expand(3, 1, 1)
        hidden = reference.model.language_model(
            inputs_embeds=embeds, position_ids=pos, cache=pruned, use_cache=True
        ).last_hidden_state
        expected = reference.lm_head(hidden[0, -1])
    # transformers' eager softmax runs in f32 even for an f64 model, and the two softmaxes sum
    # different numbers of (exactly zero) terms: agreement to f32 rounding, not f64.
    torch.testing.assert_close(step.logits, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_gradients_reach_context_tokens_and_the_vision_tower(family):
    case = make_case(family)
    vlm = GazeVLM(case.model, GazeConfig(region_h=2, region_w=2, n_context_tokens=2, top_k=2))
    vlm.train()
    ids, start = case.ids(), case.prompt.shape[1]
    out = vlm(ids, **case.image_kwargs, gaze_start=start)
    loss = torch.nn.functional.cross_entropy(out.logits[0, start - 1 : -1], ids[0, start:])
    loss.backward()
    assert vlm.context_tokens.grad is not None and vlm.context_tokens.grad.abs().sum() > 0
    vision = case.model.model.vision_tower if family == "llava" else case.model.model.visual
    grads = [p.grad for p in vision.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_gaze_start_inside_an_image_is_rejected():
    case = make_case("llava")
    vlm = GazeVLM(case.model, GazeConfig(n_context_tokens=1))
    with pytest.raises(ValueError, match="gaze_start"):
        vlm(case.ids(), **case.image_kwargs, gaze_start=10)


def test_wrong_context_token_shape_is_rejected():
    case = make_case("llava")
    with pytest.raises(ValueError, match="context_tokens"):
        GazeVLM(case.model, GazeConfig(n_context_tokens=2), torch.zeros(3, 32))


def test_batched_rows_with_different_gaze_starts():
    case = make_case("llava")
    vlm = GazeVLM(case.model, GazeConfig(n_context_tokens=2, top_k=2))
    ids = case.ids().repeat(2, 1)
    start = case.prompt.shape[1]
    pixels = case.image_kwargs["pixel_values"].repeat(2, 1, 1, 1)
    with torch.no_grad():
        both = vlm(ids, pixel_values=pixels, gaze_start=torch.tensor([start, start + 2])).logits
        first = vlm(ids[:1], pixel_values=pixels[:1], gaze_start=start).logits
        second = vlm(ids[:1], pixel_values=pixels[:1], gaze_start=start + 2).logits
    torch.testing.assert_close(both[0], first[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], second[0], atol=1e-5, rtol=0)


def test_bf16_autocast_training_scores_in_f32():
    case = make_case("llava")
    vlm = GazeVLM(case.model, GazeConfig(n_context_tokens=2, top_k=2))
    ids, start = case.ids(), case.prompt.shape[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vlm(ids, **case.image_kwargs, gaze_start=start, return_selections=True)
        loss = out.logits[0, start:].float().logsumexp(-1).mean()
    loss.backward()
    assert out.selections[0].scores.dtype == torch.float32
    assert vlm.context_tokens.grad is not None


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_right_padded_batch_matches_each_row_alone(family):
    case = make_case(family)
    vlm = GazeVLM(case.model, GazeConfig(n_context_tokens=2, top_k=2))
    start = case.prompt.shape[1]
    long_ids, short_ids = case.ids(), case.ids(ANSWER[:2])
    pad = long_ids.shape[1] - short_ids.shape[1]
    ids = torch.cat([long_ids, torch.cat([short_ids, torch.zeros(1, pad, dtype=torch.long)], 1)])
    mask = torch.ones_like(ids)
    mask[1, -pad:] = 0
    kwargs = dict(case.image_kwargs)
    if family == "llava":
        kwargs["pixel_values"] = kwargs["pixel_values"].repeat(2, 1, 1, 1)
    else:
        kwargs = {k: torch.cat([v, v]) for k, v in kwargs.items()}
    with torch.no_grad():
        both = vlm(ids, **kwargs, attention_mask=mask, gaze_start=start).logits
        alone = [vlm(x, **case.image_kwargs, gaze_start=start).logits[0] for x in (long_ids, short_ids)]
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1, : short_ids.shape[1]], alone[1], atol=1e-5, rtol=0)


def test_dynamic_qwen2_vl_grids_with_odd_regions():
    """Two images of different, non-square grids (4x6 and 7x3 tokens) with 2x4 regions: positions
    match transformers, full-sequence equals incremental decoding, regions number globally."""
    case = make_case("qwen2_vl", qwen_grids=[(1, 8, 12), (1, 14, 6)])
    case.model.double()
    config = GazeConfig(region_h=2, region_w=4, n_context_tokens=2, top_k=3)
    vlm = GazeVLM(case.model, config).double()
    kwargs = {k: v.double() if v.is_floating_point() else v for k, v in case.image_kwargs.items()}
    seq = vlm.build_sequence(case.prompt, **kwargs)
    assert [(s.grid_h, s.grid_w, s.first_region, s.n_regions) for s in seq.images[0]] == [(4, 6, 0, 4), (7, 3, 4, 4)]
    as_text = torch.full(seq.token_region.shape, 3)
    as_text[0, seq.source_index[0]] = case.prompt[0]
    mm = (as_text == QWEN2_VL_TOKENS["image"]).int()
    expected, _ = case.model.model.get_rope_index(as_text, mm, kwargs["image_grid_thw"])
    assert torch.equal(seq.position_ids, expected)
    ids, start = case.ids(), case.prompt.shape[1]
    with torch.no_grad():
        full = vlm(ids, **kwargs, gaze_start=start).logits
        steps = [vlm.prefill(case.prompt, **kwargs)] + [vlm.step(t) for t in ANSWER]
    torch.testing.assert_close(full[0, start - 1 :], torch.stack([s.logits for s in steps]), atol=1e-10, rtol=0)
    assert steps[-1].trace.n_regions == 8 and steps[-1].trace.selected.shape == (2, 2, 3)


def test_a_sequence_without_images_is_dense():
    case = make_case("llava")
    vlm = GazeVLM(case.model, GazeConfig(n_context_tokens=2, top_k=1))
    ids = torch.tensor([[1, 5, 6, 7, 8, 10, 11]])
    with torch.no_grad():
        assert torch.equal(vlm(ids, gaze_start=4).logits, case.model(input_ids=ids).logits)
        vlm.prefill(ids[:, :4])
        assert vlm.step(8).trace is None


def test_generate_returns_tokens_and_traces():
    case = make_case("llava")
    vlm = GazeVLM(case.model, GazeConfig(n_context_tokens=2, top_k=2))
    tokens, traces = vlm.generate(case.prompt, **case.image_kwargs, max_new_tokens=4)
    assert len(tokens) == len(traces) == 4
    assert traces[0] is None and all(t.selected.shape == (2, 2, 2) for t in traces[1:])
    with torch.no_grad():  # greedy: each token is the argmax of the teacher-forced gaze logits
        ids = torch.cat([case.prompt, torch.tensor([tokens])], dim=1)
        logits = vlm(ids, **case.image_kwargs, gaze_start=case.prompt.shape[1]).logits
    assert logits[0, case.prompt.shape[1] - 1 : -1].argmax(-1).tolist() == tokens


def test_precomputed_image_features_and_trace_margins():
    case = make_case("llava")
    vlm = GazeVLM(case.model, GazeConfig(n_context_tokens=2, top_k=2))
    with torch.no_grad():
        images = vlm.image_features(**case.image_kwargs)
        a = vlm(case.ids(), **case.image_kwargs, gaze_start=case.prompt.shape[1]).logits
        b = vlm(case.ids(), image_features=images, gaze_start=case.prompt.shape[1]).logits
        vlm.prefill(case.prompt, image_features=images)
        trace = vlm.step(ANSWER[0]).trace
    assert torch.equal(a, b)
    margins = trace.margins()
    assert margins.shape == (2, 2) and (margins >= 0).all()
    top = trace.scores.sort(dim=-1, descending=True).values
    torch.testing.assert_close(margins, top[..., 1] - top[..., 2])


def test_trace_accounts_visual_kv_entries():
    """7x7 grid (98 px CLIP), 3x3 regions: sizes 9,9,3 / 9,9,3 / 3,3,1; the fraction is the
    selected regions' tokens over all grid tokens, averaged over layers and KV heads."""
    model = tiny_llava(image_size=98)
    vlm = GazeVLM(model, GazeConfig(region_h=3, region_w=3, n_context_tokens=1, top_k=2))
    prompt = torch.tensor([[1, 5] + [99] * 49 + [6]])
    pixels = torch.randn(1, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    vlm.prefill(prompt, pixels)
    trace = vlm.step(10).trace
    assert trace.region_sizes.tolist() == [9, 9, 3, 9, 9, 3, 3, 3, 1]
    expected = sum(trace.region_sizes[r] for r in trace.selected.flatten().tolist()) / (49 * 2 * 2)
    assert trace.visual_kv_fraction() == pytest.approx(float(expected))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sdpa_base_gazes_like_eager_base(family):
    eager, sdpa = make_case(family, attn="eager"), make_case(family, attn="sdpa")
    config = GazeConfig(region_h=2, region_w=2, n_context_tokens=2, top_k=3)
    ids, start = eager.ids(), eager.prompt.shape[1]
    with torch.no_grad():
        outs = [GazeVLM(c.model, config)(ids, **c.image_kwargs, gaze_start=start, return_selections=True)
                for c in (eager, sdpa)]
        dense = GazeVLM(eager.model, config)(ids, **eager.image_kwargs).logits
    assert (outs[0].logits - dense).abs().max() > 1e-6
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=0)
    for layer in outs[0].selections:
        assert torch.equal(outs[0].selections[layer].selected, outs[1].selections[layer].selected)
