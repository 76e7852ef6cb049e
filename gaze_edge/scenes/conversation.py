"""Multi-turn GazeScenes conversations: a first turn about an image, follow-up questions about
the same image, and sometimes a second image shown in a later turn.

Convention ("the image" is the latest image): every turn is about the most recent image shown,
i.e. the image of the latest user turn that held one. A turn that shows a new image (placed
before its text, as ``gaze_edge.chat.normalize_messages`` places images) and every turn after it
are about that new image; earlier turns stay about the earlier one.

Turn 1 is what a single-turn example is (``make_example``: a caption, or a question with
probability ``question_fraction``). Later turns are mostly questions (``question``: colour,
shape, what is at, how many) and sometimes a caption; a turn with a new image is a caption or a
question about it, half and half. No question is asked twice about the same image.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from gaze_edge.scenes.scene import Scene
from gaze_edge.scenes.text import CAPTION_PROMPTS, Example, caption, make_example, question

FOLLOW_UP_CAPTION_FRACTION = 0.15  # later turns on the same image that ask for a caption
NEW_IMAGE_CAPTION_FRACTION = 0.5  # turns showing a new image that ask for a caption


@dataclass(frozen=True)
class Turn:
    """One user turn and its (true) answer.

    image: index into ``Conversation.scenes`` of the image this turn is about.
    new_image: the user turn shows that image (before its text); True for turn 1.
    """

    prompt: str
    answer: str
    kind: str  # "caption", "colour", "shape", "what", "count"
    image: int
    new_image: bool


@dataclass(frozen=True)
class Conversation:
    """The scenes shown, in order, and the turns about them."""

    scenes: tuple[Scene, ...]
    turns: tuple[Turn, ...]

    def messages(self, answers: Sequence[str] | None = None, n_turns: int | None = None) -> list[dict]:
        """HF chat messages for the first ``n_turns`` turns (default all), each user turn followed
        by its answer, except the last one (the turn to answer next).

        answers: the assistant's earlier answers (default: the true ones), e.g. a model's own.
        Image items are ``{"type": "image"}`` (the caller attaches the picture).
        """
        n = len(self.turns) if n_turns is None else n_turns
        answers = [t.answer for t in self.turns] if answers is None else list(answers)
        out: list[dict] = []
        for i, turn in enumerate(self.turns[:n]):
            items = [{"type": "image"}] if turn.new_image else []
            out.append({"role": "user", "content": [*items, {"type": "text", "text": turn.prompt}]})
            if i < n - 1:
                out.append({"role": "assistant", "content": answers[i].strip()})
        return out


def _turn(example: Example, image: int, new_image: bool) -> Turn:
    return Turn(example.prompt, example.answer, example.kind, image, new_image)


def _fresh(draw, asked: set[str], tries: int = 8) -> Example:
    """A draw whose prompt was not asked yet about this image (the last draw after ``tries``)."""
    for _ in range(tries):
        example = draw()
        if example.prompt not in asked:
            break
    asked.add(example.prompt)
    return example


def _later_turn(scene: Scene, rng: random.Random, asked: set[str], caption_fraction: float) -> Example:
    def draw() -> Example:
        if rng.random() < caption_fraction:
            return Example(rng.choice(CAPTION_PROMPTS), caption(scene), "caption")
        return question(scene, rng)

    return _fresh(draw, asked)


def make_conversation(
    scenes: Sequence[Scene],
    rng: random.Random,
    n_turns: int,
    new_image_turn: int | None = None,
    question_fraction: float = 0.3,
) -> Conversation:
    """A conversation of ``n_turns`` turns about ``scenes[0]``; with ``new_image_turn = t``
    (1-based, >= 2) turn ``t`` shows ``scenes[1]`` and turns ``t..n_turns`` are about it."""
    if n_turns < 1:
        raise ValueError("a conversation needs at least one turn")
    if new_image_turn is not None and not (2 <= new_image_turn <= n_turns and len(scenes) >= 2):
        raise ValueError(f"new_image_turn must be in 2..{n_turns} and come with a second scene")
    asked: set[str] = set()
    turns = [_turn(_fresh(lambda: make_example(scenes[0], rng, question_fraction), asked), 0, True)]
    image = 0
    for t in range(2, n_turns + 1):
        if t == new_image_turn:
            image, asked = 1, set()
            turns.append(_turn(_later_turn(scenes[1], rng, asked, NEW_IMAGE_CAPTION_FRACTION), 1, True))
        else:
            turns.append(
                _turn(_later_turn(scenes[image], rng, asked, FOLLOW_UP_CAPTION_FRACTION), image, False)
            )
    return Conversation(tuple(scenes[: image + 1]), tuple(turns))


TURN_COUNTS = (2, 3, 4)
TURN_WEIGHTS = (0.5, 0.35, 0.15)
NEW_IMAGE_FRACTION = 0.3  # conversations in which a later turn shows a second image


def sample_conversation(
    first: Scene, second: Scene, rng: random.Random, question_fraction: float = 0.3
) -> Conversation:
    """A training conversation: 2-4 turns (weights TURN_WEIGHTS); with probability
    NEW_IMAGE_FRACTION one later turn (uniform among turns 2..n) shows ``second``."""
    n_turns = rng.choices(TURN_COUNTS, TURN_WEIGHTS)[0]
    new_image_turn = rng.randint(2, n_turns) if rng.random() < NEW_IMAGE_FRACTION else None
    return make_conversation((first, second), rng, n_turns, new_image_turn, question_fraction)


def follow_up_conversation(
    first: Scene, rng: random.Random, n_turns: int = 3, second: Scene | None = None
) -> Conversation:
    """An evaluation conversation: turn 1 a caption or a question (half and half), then questions
    only; with ``second``, turn 2 shows it and turns 2.. are questions about it."""
    asked: set[str] = set()
    if rng.random() < 0.5:
        first_turn = Example(rng.choice(CAPTION_PROMPTS), caption(first), "caption")
    else:
        first_turn = question(first, rng)
    asked.add(first_turn.prompt)
    turns = [_turn(first_turn, 0, True)]
    scenes = (first,) if second is None else (first, second)
    if second is not None:
        asked = set()
    for t in range(2, n_turns + 1):
        image = 0 if second is None else 1
        turns.append(
            _turn(
                _fresh(lambda s=scenes[image]: question(s, rng), asked), image, t == 2 and second is not None
            )
        )
    return Conversation(scenes, tuple(turns))
