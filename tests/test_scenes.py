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
from gaze_edge.scenes.render import SQUARE_SCALE
from gaze_edge.scenes.scene import BACKGROUND, COLOUR_JITTER, GRID, MAX_OBJECTS, MIN_OBJECTS, cell_box

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
