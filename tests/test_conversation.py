"""Warm conversations equal cold evaluation: the cache reuse never changes an answer.

For both families (LLaVA with 1-D RoPE, Qwen2-VL with M-RoPE), tiny random gaze checkpoints
converted at f32 (f16 KV cache, as chat uses), every edit a user can make between turns is
answered twice: by a conversation that answered the previous turn (warm) and by a fresh one
(cold). Tokens must be equal and the logits of every sampled token within TOL of the logit
scale. The only differences allowed are those of evaluating the prompt in other batch sizes:
llama.cpp's CPU kernels take other paths for larger batches (measured here: up to 1.4e-3 of the
logit scale on the random Qwen2-VL model, 0 on most cases; with every prompt batch at most 16
tokens, warm equals cold bit for bit, tested below). docs/RUNTIME.md, "Warm conversations".
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from gaze_edge.config import GazeConfig

pytestmark = pytest.mark.runtime

GAZE = GazeConfig(region_h=2, region_w=2, n_context_tokens=3, top_k=0, keep_ratio=0.25, score_mode="gqa_mean")
TOL = 3e-3  # of max |logit|
N_TOKENS = 6
FAMILIES = {"llava": dict(image_size=98), "qwen2vl": {}}
SIZES = {"llava": (98, 98), "qwen2vl": (112, 140)}


def picture(family: str, seed: int) -> Image.Image:
    h, w = SIZES[family]
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(h // 7 + 1, w // 7 + 1, 3))
    return Image.fromarray(np.kron(coarse, np.ones((7, 7, 1)))[:h, :w].astype(np.uint8))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request, tmp_path_factory):
    from gaze_edge.convert import convert
    from gaze_edge.convert.tiny import tiny_checkpoint
    from gaze_edge.runtime.model import GazeModel

    family = request.param
    root = tmp_path_factory.mktemp(f"warm-{family}")
    ckpt = tiny_checkpoint(family, root / "ckpt", gaze=GAZE, seed=3, **FAMILIES[family])
    llm, _ = convert(ckpt, root / "gguf", outtype="f32", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny checkpoint may have no chat template: the family's is used
        m = GazeModel.load(llm.parent, n_threads=2, n_ctx=1024)
    m.family = family
    yield m
    m.close()


def user(text: str, *images) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": im} for im in images]
            + [{"type": "text", "text": text}]}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def ask(conv, messages, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return conv.chat(messages, max_tokens=N_TOKENS, logits=True, trace=True, **options)


def assert_same(warm, cold) -> float:
    """Warm and cold answers agree: tokens, and logits within TOL of the scale; returns the max diff."""
    assert [s.token for s in warm.steps] == [s.token for s in cold.steps]
    assert warm.text == cold.text and warm.finish_reason == cold.finish_reason
    assert len(warm.logits) == len(cold.logits)
    worst = 0.0
    for a, b in zip(warm.logits, cold.logits, strict=True):
        scale = float(np.abs(b).max())
        worst = max(worst, float(np.abs(a - b).max()) / scale)
    assert worst <= TOL, worst
    return worst


def warm_vs_cold(model, first, second, first_options=None, second_options=None):
    """Answer ``first`` then ``second`` on one conversation; ``second`` also cold. Returns both."""
    first_options, second_options = first_options or {}, second_options or {}
    with model.conversation() as conv, model.conversation() as fresh:
        ask(conv, first, **first_options)
        warm = ask(conv, second, **second_options)
        cold = ask(fresh, second, **second_options)
    assert cold.n_cached_tokens == 0
    assert_same(warm, cold)
    return warm, cold


def test_follow_up_question_reuses_the_image_and_equals_cold(model):
    a = picture(model.family, 0)
    first = [user("Describe.", a)]
    with model.conversation() as conv:
        turn1 = ask(conv, first)
    second = first + [answer(turn1.text), user("And the colour?")]
    warm, cold = warm_vs_cold(model, first, second)
    # the prompt of turn 1 (up to the answer) came from the cache, the image with it
    n_image = model.image_footprint(a)[0]
    assert n_image < warm.n_cached_tokens < warm.n_prompt_tokens
    assert warm.visual_kv_fraction is not None and warm.visual_kv_fraction < 0.5  # it gazed


def test_an_edited_earlier_message_is_evaluated_again(model):
    a = picture(model.family, 0)
    first = [user("Describe.", a), answer("x"), user("And the colour?")]
    second = [user("Describe.", a), answer("something else"), user("And the colour?")]
    warm, _ = warm_vs_cold(model, first, second)
    assert warm.n_cached_tokens > model.image_footprint(a)[0]  # cut after the image, inside the answer


def test_an_edit_before_the_image_cuts_the_image_too(model):
    a = picture(model.family, 0)
    first = [{"role": "system", "content": "Be brief."}, user("Describe.", a)]
    second = [{"role": "system", "content": "Be long."}, user("Describe.", a)]
    warm, _ = warm_vs_cold(model, first, second)
    assert warm.n_cached_tokens < model.image_footprint(a)[0]
    assert len(warm.images) == 1


def test_an_image_added_in_turn_two(model):
    a, b = picture(model.family, 0), picture(model.family, 1)
    first = [user("Describe.", a)]
    second = first + [answer("x"), user("And this one?", b)]
    warm, _ = warm_vs_cold(model, first, second)
    assert len(warm.images) == 2
    assert warm.steps[1].trace.n_regions == 2 * warm.images[0].n_regions  # one budget over both


def test_an_image_removed(model):
    a, b = picture(model.family, 0), picture(model.family, 1)
    first = [user("Describe.", a, b)]
    second = [user("Describe.", a)]
    warm, _ = warm_vs_cold(model, first, second)
    assert len(warm.images) == 1
    assert warm.steps[1].trace.n_regions == warm.images[0].n_regions  # b left the gaze registry


def test_the_same_picture_from_another_source_is_reused(model, tmp_path):
    a = picture(model.family, 0)
    path = tmp_path / "a.png"
    a.save(path)
    first = [user("Describe.", a)]
    second = [user("Describe.", str(path))]
    warm, _ = warm_vs_cold(model, first, second)
    assert warm.n_cached_tokens == warm.n_prompt_tokens - 1  # all but the last token: its logits choose


def test_gaze_settings_changed_between_turns(model):
    a, b = picture(model.family, 0), picture(model.family, 1)
    first = [user("Describe.", a, b)]
    second = first + [answer("x"), user("More?")]
    warm, _ = warm_vs_cold(model, first, second, {"keep_ratio": 0.25}, {"keep_regions": 1})
    assert all(s.trace.k == 1 for s in warm.steps[1:])
    warm, _ = warm_vs_cold(model, first, second, {"keep_regions": 1}, {"gather": True, "keep_ratio": 0.5})


def test_dense_to_gaze_and_back(model):
    a = picture(model.family, 0)
    turns = [[user("Describe.", a)]]
    turns.append(turns[0] + [answer("x"), user("More?")])
    turns.append(turns[1] + [answer("y"), user("Again?")])
    with model.conversation() as conv:
        for messages, gaze in zip(turns, (False, True, False), strict=True):
            warm = ask(conv, messages, gaze=gaze)
            with model.conversation() as fresh:
                cold = ask(fresh, messages, gaze=gaze)
            assert_same(warm, cold)
            assert (warm.visual_kv_fraction is None) == (not gaze)


def test_sampling_changed_between_turns(model):
    a = picture(model.family, 0)
    first = [user("Describe.", a)]
    second = first + [answer("x"), user("More?")]
    warm_vs_cold(model, first, second, {}, {"temperature": 0.8, "seed": 7, "top_k": 0, "min_p": 0.0})


def test_dense_generated_tokens_are_reused_and_gazed_ones_are_not(model):
    """The cache marks what a cold evaluation would compute alike: prompt tokens and densely
    evaluated answer tokens are reusable, tokens evaluated with gaze are not."""
    a = picture(model.family, 0)
    first = [user("Describe.", a)]
    for gaze in (False, True):
        with model.conversation() as conv:
            result = ask(conv, first, gaze=gaze)
            n_plan = len(conv._cached) - (len(result.steps) - 1)  # the last token is never evaluated
            prompt, generated = conv._cached[:n_plan], conv._cached[n_plan:]
            assert len(generated) == len(result.steps) - 1 > 0
            assert [c.key[1] for c in generated] == [s.token for s in result.steps[:-1]]
            assert all(c.reusable for c in prompt)
            assert all(c.reusable == (not gaze) for c in generated)
            assert conv.match([type("E", (), {"key": c.key})() for c in conv._cached]) == (
                len(conv._cached) if not gaze else n_plan)


def test_model_chat_uses_a_bounded_pool(model):
    a, b = picture(model.family, 0), picture(model.family, 1)
    pool = model.conversations
    pool.close()
    one = [user("Describe.", a)]
    two = [user("Describe.", b)]
    r1 = ask(model, one)
    ask(model, two)
    assert len(pool.conversations) == 2
    again = ask(model, one + [answer(r1.text), user("More?")])
    assert again.n_cached_tokens > model.image_footprint(a)[0]  # found the conversation about a
    ask(model, [user("Describe.", picture(model.family, 2))])
    assert len(pool.conversations) == pool.max_conversations == 2
    assert pool.memory_bytes() == 2 * model.kv_cache_bytes(1024)


def test_the_pool_keeps_within_its_memory_limit(model):
    pool = model.conversations
    pool.close()
    per = model.kv_cache_bytes(1024)
    pool.max_bytes = int(1.5 * per)  # room for one conversation
    try:
        for i in range(3):
            ask(model, [user("Describe.", picture(model.family, i))])
            assert len(pool.conversations) == 1 and pool.memory_bytes() <= pool.max_bytes
        again = ask(model, [user("Describe.", picture(model.family, 2)), answer("x"), user("More?")])
        assert again.n_cached_tokens > 0  # the one kept is the latest
    finally:
        pool.max_bytes = None
        pool.close()


def test_context_overflow_is_one_clear_error(model):
    from gaze_edge.errors import ContextOverflowError

    images = [picture(model.family, i) for i in range(40)]
    with pytest.raises(ContextOverflowError, match=r"needs \d+ context cells .* holds 1024; use a larger"):
        ask(model, [user("Describe.", *images)])


def test_warm_equals_cold_bit_for_bit_when_batches_match(model, monkeypatch):
    """With prompt batches small enough that llama.cpp's kernels take one path, nothing but the
    cache reuse differs between warm and cold: the logits are identical."""
    import gaze_edge.conversation

    monkeypatch.setattr(gaze_edge.conversation, "PROGRESS_BATCH", 16)
    a, b = picture(model.family, 0), picture(model.family, 1)
    turns = [[user("Describe.", a)]]
    turns.append(turns[0] + [answer("x"), user("And this one?", b)])
    turns.append(turns[1] + [answer("y"), user("Again?")])
    with model.conversation() as conv:
        for messages, gaze in zip(turns, (True, False, True), strict=True):
            warm = ask(conv, messages, gaze=gaze)
            with model.conversation() as fresh:
                cold = ask(fresh, messages, gaze=gaze)
            assert [s.token for s in warm.steps] == [s.token for s in cold.steps]
            for x, y in zip(warm.logits, cold.logits, strict=True):
                assert x.tobytes() == y.tobytes()
