"""Exact object-level accuracy of captions (not BLEU), and exact-match accuracy of answers.

Object accuracy over a set of scenes = sum of correct objects / sum of max(n_true, n_said), where
an object is correct when its (position, colour, shape) is exactly one of the scene's objects
(each true object counts once) and n_said counts every part of the caption, unreadable parts
included. So a missed object, a wrong attribute and an extra object all cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gaze_edge.scenes.scene import Scene
from gaze_edge.scenes.text import parse_caption


@dataclass(frozen=True)
class CaptionScore:
    object_accuracy: float  # the headline number
    scene_accuracy: float  # captions with every object right and nothing extra
    colour_accuracy: float  # true objects whose position was named with the right colour
    shape_accuracy: float  # ... with the right shape
    position_recall: float  # true objects whose position was named at all
    n_scenes: int
    n_objects: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def count_correct(said: Sequence[tuple[str, str, str] | None], scene: Scene) -> int:
    return count_matches(said, {obj.words for obj in scene.objects})


def count_matches(said: Sequence[tuple | None], truth: set[tuple]) -> int:
    """Items said that are true, each true item counted once (None: an unreadable part)."""
    remaining = set(truth)
    correct = 0
    for item in said:
        if item is not None and item in remaining:
            remaining.discard(item)
            correct += 1
    return correct


def score_captions(captions: Sequence[str], scenes: Sequence[Scene]) -> CaptionScore:
    """Score generated captions against the scenes they describe (same order)."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    correct = denominator = exact = n_objects = colour_ok = shape_ok = named = 0
    for text, scene in zip(captions, scenes, strict=True):
        said = parse_caption(text)
        c = count_correct(said, scene)
        n_true = len(scene.objects)
        correct += c
        denominator += max(n_true, len(said))
        exact += int(c == n_true == len(said))
        n_objects += n_true
        by_position = {item[0]: item for item in said if item is not None}
        for obj in scene.objects:
            item = by_position.get(obj.position)
            if item is not None:
                named += 1
                colour_ok += int(item[1] == obj.colour)
                shape_ok += int(item[2] == obj.shape)
    n = max(1, len(scenes))
    return CaptionScore(
        object_accuracy=correct / max(1, denominator),
        scene_accuracy=exact / n,
        colour_accuracy=colour_ok / max(1, n_objects),
        shape_accuracy=shape_ok / max(1, n_objects),
        position_recall=named / max(1, n_objects),
        n_scenes=len(scenes),
        n_objects=n_objects,
    )


def score_answers(answers: Sequence[str], expected: Sequence[str]) -> float:
    """Fraction of answers equal to the expected ones (whitespace and case ignored)."""
    if len(answers) != len(expected):
        raise ValueError(f"{len(answers)} answers for {len(expected)} questions")
    ok = sum(a.strip().lower() == e.strip().lower() for a, e in zip(answers, expected, strict=True))
    return ok / max(1, len(expected))
