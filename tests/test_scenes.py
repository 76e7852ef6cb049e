"""GazeScenes: determinism, geometry, captions that match the drawn pixels, the scorer, splits."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gaze_edge.scenes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    caption,
    make_example,
    parse_caption,
    render,
    sample_scene,
    scene_seeds,
    score_answers,
    score_captions,
    split_scenes,
)
from gaze_edge.scenes.conversation import follow_up_conversation, make_conversation, sample_conversation
from gaze_edge.scenes.render import SQUARE_SCALE
from gaze_edge.scenes.scene import BACKGROUND, COLOUR_JITTER, GRID, MAX_OBJECTS, MIN_OBJECTS, cell_box
from gaze_edge.scenes.text import CAPTION_PROMPTS

SEEDS = list(range(200)) + scene_seeds("test", 50)


def test_same_seed_same_scene_and_pixels():
    for seed in (0, 7, 2_000_000_123):
        a, b = sample_scene(seed), sample_scene(seed)
        assert a == b
        assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert sample_scene(1) != sample_scene(2)


def test_pinned_scene_does_not_drift():
    # A fixed seed's words are part of the dataset's definition: the test split must not move.
    assert caption(sample_scene(scene_seeds("test", 1)[0])) == (
        "top right: purple circle. middle left: green circle. bottom middle: orange triangle. "
        "bottom right: blue triangle."
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_objects_inside_image_and_own_cell(seed):
    scene = sample_scene(seed)
    assert MIN_OBJECTS <= len(scene.objects) <= MAX_OBJECTS
    cells = [o.cell for o in scene.objects]
    assert cells == sorted(set(cells)), "one object per cell, in reading order"
    for obj in scene.objects:
        x0, y0, x1, y1 = cell_box(obj.cell, scene.image_size)
        cx, cy = obj.center
        h = obj.half_size
        assert x0 < cx - h and cx + h < x1 and y0 < cy - h and cy + h < y1
        assert 0 <= cx - h and cx + h <= scene.image_size and 0 <= cy - h and cy + h <= scene.image_size
        assert obj.colour in COLOURS and obj.shape in SHAPES
        assert all(abs(c - b) <= COLOUR_JITTER for c, b in zip(obj.rgb, COLOURS[obj.colour], strict=True))


def _nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, COLOURS[name], strict=True)))


def _looks_like(obj, pixels) -> str:
    """Classify the drawn shape from pixels alone: box corners (square), apex row (triangle)."""
    cx, cy = obj.center
    h = obj.half_size
    bg = np.array(BACKGROUND)

    def filled(x, y):
        return not np.array_equal(pixels[int(round(y)), int(round(x))], bg)

    s = h * SQUARE_SCALE * 0.9
    corners = [filled(cx + dx * s, cy + dy * s) for dx in (-1, 1) for dy in (-1, 1)]
    if all(corners):
        return "square"
    # a triangle is filled near its base corners and empty at the top corners
    if filled(cx - 0.8 * h, cy + 0.7 * h) and filled(cx + 0.8 * h, cy + 0.7 * h):
        return "triangle"
    return "circle"


@pytest.mark.parametrize("seed", SEEDS[:120])
def test_caption_matches_drawn_pixels(seed):
    scene = sample_scene(seed)
    pixels = np.asarray(render(scene)).astype(int)
    words = parse_caption(caption(scene))
    assert len(words) == len(scene.objects)
    occupied = set()
    for (position, colour, shape), obj in zip(words, scene.objects, strict=True):
        cx, cy = obj.center
        centre_rgb = pixels[int(cy), int(cx)]
        assert _nearest_colour(centre_rgb) == colour
        assert tuple(centre_rgb) == obj.rgb
        assert _looks_like(obj, pixels) == shape
        # the caption's position word is where the pixels are
        row, col = int(cy // (scene.image_size / GRID)), int(cx // (scene.image_size / GRID))
        assert POSITIONS[row * GRID + col] == position
        occupied.add(row * GRID + col)
    for cell in set(range(GRID * GRID)) - occupied:
        x0, y0, x1, y1 = (int(round(v)) for v in cell_box(cell, scene.image_size))
        assert (pixels[y0:y1, x0:x1] == BACKGROUND).all(), f"empty cell {POSITIONS[cell]} has paint"


def test_examples_answer_from_the_scene():
    rng = random.Random(0)
    kinds = set()
    for seed in range(300):
        scene = sample_scene(seed)
        ex = make_example(scene, rng, question_fraction=0.5)
        kinds.add(ex.kind)
        assert ex.answer.endswith(".")
        if ex.kind == "caption":
            assert ex.answer == caption(scene)
        elif ex.kind == "what":
            cell = POSITIONS.index(ex.prompt.removeprefix("What is in the ").removesuffix("?"))
            obj = scene.object_at(cell)
            assert ex.answer == (f"{obj.colour} {obj.shape}." if obj else "nothing.")
        elif ex.kind == "colour":
            cell = POSITIONS.index(ex.prompt.removeprefix("What colour is the shape in the ").removesuffix("?"))
            assert ex.answer == scene.object_at(cell).colour + "."
        elif ex.kind == "shape":
            cell = POSITIONS.index(ex.prompt.removeprefix("What shape is in the ").removesuffix("?"))
            assert ex.answer == scene.object_at(cell).shape + "."
    assert kinds == {"caption", "colour", "shape", "what", "count"}


def test_parse_caption_reads_back_and_marks_junk():
    scene = sample_scene(3)
    assert parse_caption(caption(scene)) == [o.words for o in scene.objects]
    assert parse_caption("top left: red circle. center: blue. nonsense.") == [
        ("top left", "red", "circle"),
        None,
        None,
    ]
    assert parse_caption("") == []


def test_score_perfect_wrong_missing_extra():
    scene = sample_scene(11)
    n = len(scene.objects)
    truth = caption(scene)
    assert score_captions([truth], [scene]).object_accuracy == 1.0
    # one wrong colour: n-1 of n
    first = scene.objects[0]
    other = next(c for c in COLOURS if c != first.colour)
    wrong = truth.replace(f"{first.position}: {first.colour}", f"{first.position}: {other}", 1)
    s = score_captions([wrong], [scene])
    assert s.object_accuracy == pytest.approx((n - 1) / n)
    assert s.scene_accuracy == 0.0 and s.colour_accuracy == pytest.approx((n - 1) / n)
    # one object missing: n-1 of n
    missing = ". ".join(truth.split(". ")[1:])
    assert score_captions([missing], [scene]).object_accuracy == pytest.approx((n - 1) / n)
    # an extra object (on an empty cell) and a repeated one are penalised: n of n+1, n of n+1
    empty = next(p for i, p in enumerate(POSITIONS) if scene.object_at(i) is None)
    assert score_captions([truth + f" {empty}: red square."], [scene]).object_accuracy == pytest.approx(n / (n + 1))
    repeated = truth + " " + truth.split(". ")[0] + "."
    assert score_captions([repeated], [scene]).object_accuracy == pytest.approx(n / (n + 1))
    # junk text counts as an extra object; an empty caption scores 0
    assert score_captions([truth + " blah"], [scene]).object_accuracy == pytest.approx(n / (n + 1))
    assert score_captions([""], [scene]).object_accuracy == 0.0
    # pooled over scenes (micro average)
    other_scene = sample_scene(12)
    pooled = score_captions([truth, ""], [scene, other_scene])
    assert pooled.object_accuracy == pytest.approx(n / (n + len(other_scene.objects)))
    with pytest.raises(ValueError):
        score_captions([truth], [scene, other_scene])


def test_score_answers():
    assert score_answers(["red.", " Blue. ", "x"], ["red.", "blue.", "y"]) == pytest.approx(2 / 3)


def test_splits_are_fixed_and_disjoint():
    train, val, test = (set(scene_seeds(s, 1000)) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert scene_seeds("test", 3) == [2_000_000_000, 2_000_000_001, 2_000_000_002]
    assert split_scenes("val", 2, start=5) == [sample_scene(1_000_000_005), sample_scene(1_000_000_006)]
    with pytest.raises(ValueError):
        scene_seeds("dev", 1)


NUMBERS = {"two": 2, "three": 3, "four": 4}


def _answer_from_scene(scene, prompt: str) -> str:
    """What a question about ``scene`` must be answered, read off the scene's objects."""
    if prompt == "How many shapes are there?":
        return {n: w for w, n in NUMBERS.items()}[len(scene.objects)] + "."
    for head, say in (("What is in the ", lambda o: f"{o.colour} {o.shape}." if o else "nothing."),
                      ("What colour is the shape in the ", lambda o: f"{o.colour}."),
                      ("What shape is in the ", lambda o: f"{o.shape}.")):  # fmt: skip
        if prompt.startswith(head):
            return say(scene.object_at(POSITIONS.index(prompt.removeprefix(head).removesuffix("?"))))
    raise AssertionError(f"not a GazeScenes question: {prompt!r}")


def _check_conversation(conv):
    """Every turn is about the latest image shown and answers it truthfully; nothing repeats."""
    assert conv.turns[0].new_image and conv.turns[0].image == 0
    asked = set()
    for i, turn in enumerate(conv.turns):
        shown = sum(t.new_image for t in conv.turns[: i + 1])
        assert turn.image == shown - 1, "a turn is about the latest image shown"
        if turn.new_image:
            asked = set()
        scene = conv.scenes[turn.image]
        if turn.kind == "caption":
            assert turn.prompt in CAPTION_PROMPTS and turn.answer == caption(scene)
        else:
            assert turn.answer == _answer_from_scene(scene, turn.prompt)
        assert turn.prompt not in asked, "no question twice about one image"
        asked.add(turn.prompt)
    assert len(conv.scenes) == conv.turns[-1].image + 1


def test_training_conversations_are_deterministic_and_true():
    firsts, seconds = split_scenes("train", 300), split_scenes("train", 300, start=5000)
    convs = [sample_conversation(a, b, random.Random(f"c{i}")) for i, (a, b) in enumerate(zip(firsts, seconds, strict=True))]
    again = [sample_conversation(a, b, random.Random(f"c{i}")) for i, (a, b) in enumerate(zip(firsts, seconds, strict=True))]
    assert convs == again
    for conv in convs:
        _check_conversation(conv)
        assert conv.scenes[0] is not None and conv.scenes[0] in firsts
    lengths = {len(c.turns) for c in convs}
    assert lengths == {2, 3, 4}
    with_second = [c for c in convs if len(c.scenes) == 2]
    assert 0.2 < len(with_second) / len(convs) < 0.4  # NEW_IMAGE_FRACTION = 0.3
    later_kinds = {t.kind for c in convs for t in c.turns[1:]}
    assert later_kinds == {"caption", "colour", "shape", "what", "count"}
    # the second image is another scene, shown once, in turn 2 or later (at every such turn)
    for c in with_second:
        assert c.scenes[1] != c.scenes[0]
        assert sum(t.new_image for t in c.turns[1:]) == 1
    assert {[t.new_image for t in c.turns].index(True, 1) for c in with_second} == {1, 2, 3}


def test_evaluation_conversations_ask_follow_up_questions():
    rng = random.Random(1)
    scenes = split_scenes("test", 40)
    for scene, other in zip(scenes, split_scenes("test", 40, start=40), strict=True):
        same = follow_up_conversation(scene, rng, 3)
        _check_conversation(same)
        assert [t.new_image for t in same.turns] == [True, False, False]
        assert all(t.kind != "caption" for t in same.turns[1:])
        new = follow_up_conversation(scene, rng, 3, second=other)
        _check_conversation(new)
        assert [t.image for t in new.turns] == [0, 1, 1] and new.turns[1].new_image
        assert new.scenes == (scene, other)


def test_conversation_messages_put_images_in_their_turns():
    a, b = sample_scene(11), sample_scene(12)
    conv = make_conversation((a, b), random.Random(3), n_turns=3, new_image_turn=3)
    msgs = conv.messages()
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in msgs[1::2]] == [t.answer for t in conv.turns[:2]]
    images = [[i for i in m["content"] if i["type"] == "image"] for m in msgs[0::2]]
    assert [len(x) for x in images] == [1, 0, 1]
    assert msgs[4]["content"][-1] == {"type": "text", "text": conv.turns[2].prompt}
    assert conv.messages(["  mine. "], n_turns=2)[1]["content"] == "mine."
    with pytest.raises(ValueError):
        make_conversation((a,), random.Random(0), n_turns=2, new_image_turn=2)
