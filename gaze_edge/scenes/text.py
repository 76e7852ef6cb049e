"""Words for a scene: captions (objects one by one, in reading order) and short questions.

Caption grammar, which ``parse_caption`` reads back::

    caption  := object ("." " " object)* "."
    object   := position ":" " " colour " " shape        e.g. "top left: red circle"

The position comes first so that, while describing an object, the model has already said where
to look (the gaze story: the query of the token after "top left:" should select that cell).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gaze_edge.scenes.scene import COLOURS, GRID, POSITIONS, SHAPES, Scene

CAPTION_PROMPT = "Describe the image."
CAPTION_PROMPTS = (CAPTION_PROMPT, "What is in the image?", "Describe the shapes in the image.")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Example:
    """One training or evaluation turn about a scene."""

    prompt: str
    answer: str
    kind: str  # "caption", "colour", "shape", "what", "count"


def describe_object(position: str, colour: str, shape: str) -> str:
    return f"{position}: {colour} {shape}"


def caption(scene: Scene) -> str:
    """Every object of the scene, in reading order."""
    return " ".join(describe_object(*obj.words) + "." for obj in scene.objects)


def parse_caption(text: str) -> list[tuple[str, str, str] | None]:
    """The objects a caption names, as (position, colour, shape); None for a part that is not one.

    Parts are split at ".". Empty parts (e.g. after the last ".") are skipped; anything else that
    does not follow the grammar is returned as None so the scorer can count it as an extra object.
    """
    objects: list[tuple[str, str, str] | None] = []
    for part in text.split("."):
        part = part.strip()
        if not part:
            continue
        position, sep, rest = part.partition(":")
        words = rest.split()
        if (
            sep
            and position.strip() in POSITIONS
            and len(words) == 2
            and words[0] in COLOURS
            and words[1] in SHAPES
        ):
            objects.append((position.strip(), words[0], words[1]))
        else:
            objects.append(None)
    return objects


def question(scene: Scene, rng: random.Random) -> Example:
    """A short question about one cell (or the object count) with its answer."""
    kind = rng.choice(("colour", "shape", "what", "what", "count"))
    if kind == "count":
        n = len(scene.objects)
        return Example("How many shapes are there?", f"{NUMBER_WORDS[n]}.", kind)
    if kind == "what":
        cell = rng.randrange(GRID * GRID)
        obj = scene.object_at(cell)
        answer = f"{obj.colour} {obj.shape}." if obj else "nothing."
        return Example(f"What is in the {POSITIONS[cell]}?", answer, kind)
    obj = rng.choice(scene.objects)
    if kind == "colour":
        return Example(f"What colour is the shape in the {obj.position}?", f"{obj.colour}.", kind)
    return Example(f"What shape is in the {obj.position}?", f"{obj.shape}.", kind)


def make_example(scene: Scene, rng: random.Random, question_fraction: float = 0.3) -> Example:
    """A caption turn, or with probability ``question_fraction`` a question turn."""
    if rng.random() < question_fraction:
        return question(scene, rng)
    return Example(rng.choice(CAPTION_PROMPTS), caption(scene), "caption")


def corpus(n_scenes: int = 2000, seed: int = 0) -> list[Example]:
    """A caption turn and a question turn for each of n_scenes scenes (to train the tokenizer)."""
    from gaze_edge.scenes.scene import sample_scene

    rng = random.Random(seed)
    examples = []
    for i in range(n_scenes):
        scene = sample_scene(seed * 1_000_003 + i)
        examples.append(Example(CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)], caption(scene), "caption"))
        examples.append(question(scene, rng))
    return examples
