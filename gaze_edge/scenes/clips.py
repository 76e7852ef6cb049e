"""GazeScenes clips: short videos of a scene that changes over time, and questions about them.

A clip is ``n_frames`` scenes (default 8, 8-32 allowed). Frame 1 holds 2-3 shapes; 1-3 later
frames each hold one event: a new shape appears in an empty cell, or a shape disappears. Between
events nothing moves, so each frame is exactly its scene. Every shape of a clip has its own
(colour, shape), so "the red circle" names one object. Everything comes from the clip's seed.

Questions (``clip_question``), each answerable from one or a few frames:

    frame   "What is in frame 5?"                      caption of frame 5 ("top left: red circle. ...")
    where   "What is in the center in frame 5?"        "blue square." / "nothing."
    when    "In which frame does the red circle appear?"  "frame 3." (frame 1 if it is there from the
            start; 70% of these ask about a shape that appears later, when the clip has one)
    change  "What changed between the first and the last frame?"
            "top left: red circle appeared. center: blue square disappeared." / "nothing."

Scoring (``score_clip_answers``): frame and change answers are scored like captions, per object
(correct items / max(true items, items said)); where and when answers are exact matches. The
accuracy of a set of clips is the mean of the per-question scores, overall and per kind.

The frames are shown to a model as a video: frame i at i seconds (what ``gaze_edge.video``
makes of a frame list), each after its label ("Frame 5 (4.0 s): "). Test and val clips are
fixed (``split_clips``: clip i of a split has seed ``SPLITS[split] + i``, its question drawn from
the same seed, kinds in turn), disjoint from each other and from training's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from gaze_edge.scenes.scene import COLOURS, GRID, POSITIONS, SHAPES, Scene, SceneObject, sample_scene
from gaze_edge.scenes.score import count_correct, count_matches
from gaze_edge.scenes.splits import SPLIT_SIZE, SPLITS
from gaze_edge.scenes.text import Example, caption, describe_object, parse_caption

DEFAULT_FRAMES = 8
MIN_FRAMES, MAX_FRAMES = 8, 32
KINDS = ("frame", "where", "when", "change")
FIRST_OBJECTS = (2, 3)  # shapes in frame 1
MAX_OBJECTS = 4  # at most this many in any frame
EVENTS = (1, 3)  # frames (after the first) in which something happens
CHANGE_PROMPT = "What changed between the first and the last frame?"
APPEARED, DISAPPEARED = "appeared", "disappeared"
WHEN_LATER = 0.7  # "when" questions that ask about a shape appearing after frame 1 (when there is one)


@dataclass(frozen=True)
class Event:
    """What happens at frame ``frame`` (0-based): ``obj`` appears there or is gone from it on."""

    frame: int
    kind: str  # APPEARED or DISAPPEARED
    obj: SceneObject


@dataclass(frozen=True)
class Clip:
    seed: int
    frames: tuple[Scene, ...]
    events: tuple[Event, ...]

    def __len__(self) -> int:
        return len(self.frames)

    def first_frame(self, colour: str, shape: str) -> int | None:
        """0-based index of the first frame holding a (colour, shape), None if none does."""
        for i, scene in enumerate(self.frames):
            if any((o.colour, o.shape) == (colour, shape) for o in scene.objects):
                return i
        return None

    def objects(self) -> list[SceneObject]:
        """Every object that is in some frame (first seen first)."""
        seen: dict[tuple[str, str], SceneObject] = {}
        for scene in self.frames:
            for obj in scene.objects:
                seen.setdefault((obj.colour, obj.shape), obj)
        return list(seen.values())


def _with(scene: Scene, objects) -> Scene:
    return Scene(seed=scene.seed, objects=tuple(sorted(objects, key=lambda o: o.cell)), image_size=scene.image_size)


def sample_clip(seed: int, n_frames: int = DEFAULT_FRAMES) -> Clip:
    """The clip of ``seed``: deterministic, ``n_frames`` frames, 1-3 events after frame 1."""
    if not MIN_FRAMES <= n_frames <= MAX_FRAMES:
        raise ValueError(f"clips have {MIN_FRAMES}-{MAX_FRAMES} frames, got {n_frames}")
    rng = random.Random(f"gazescenes-clip-{seed}")
    # shapes are drawn as scenes are (sizes, places, jitter): the pool is a full 3x3 scene's objects
    pool = sample_scene(rng.randrange(2**62), min_objects=GRID * GRID, max_objects=GRID * GRID)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    rng.shuffle(kinds)
    # give each pooled cell its own (colour, shape): the clip's objects are told apart by those
    by_cell = {o.cell: o for o in pool.objects}
    cells = list(by_cell)
    rng.shuffle(cells)
    objects = {}
    for cell, (colour, shape) in zip(cells, kinds, strict=False):
        o = by_cell[cell]
        rgb = tuple(min(255, max(0, c + (o.rgb[i] - COLOURS[o.colour][i]))) for i, c in enumerate(COLOURS[colour]))
        objects[cell] = SceneObject(colour, shape, cell, o.center, o.half_size, rgb)  # type: ignore[arg-type]
    free = list(cells)
    present = [objects[c] for c in free[: rng.choice(FIRST_OBJECTS)]]
    free = free[len(present) :]
    event_frames = sorted(rng.sample(range(1, n_frames), rng.randint(*EVENTS)))
    base = Scene(seed=seed, objects=())
    frames, events = [], []
    for i in range(n_frames):
        if i in event_frames:
            appear = len(present) < MAX_OBJECTS and (len(present) <= 1 or rng.random() < 0.5)
            if appear:
                obj = objects[free.pop(0)]
                present.append(obj)
                events.append(Event(i, APPEARED, obj))
            else:
                obj = present.pop(rng.randrange(len(present)))
                events.append(Event(i, DISAPPEARED, obj))
        frames.append(_with(base, present))
    return Clip(seed=seed, frames=tuple(frames), events=tuple(events))


def changes(clip: Clip) -> list[tuple[str, str, str, str]]:
    """(position, colour, shape, appeared|disappeared) of every object in the last frame but not
    the first, or in the first but not the last, in reading order."""
    first = {o.words for o in clip.frames[0].objects}
    last = {o.words for o in clip.frames[-1].objects}
    out = [(*w, APPEARED) for w in last - first] + [(*w, DISAPPEARED) for w in first - last]
    return sorted(out, key=lambda item: (POSITIONS.index(item[0]), item[3]))


def change_text(items: Sequence[tuple[str, str, str, str]]) -> str:
    if not items:
        return "nothing."
    return " ".join(f"{describe_object(p, c, s)} {verb}." for p, c, s, verb in items)


def parse_changes(text: str) -> list[tuple[str, str, str, str] | None]:
    """The items a change answer names (None for a part that is not one; "nothing." is none)."""
    out: list[tuple[str, str, str, str] | None] = []
    for part in text.split("."):
        part = part.strip()
        if not part or part == "nothing":
            continue
        position, sep, rest = part.partition(":")
        words = rest.split()
        ok = (sep and position.strip() in POSITIONS and len(words) == 3 and words[0] in COLOURS
              and words[1] in SHAPES and words[2] in (APPEARED, DISAPPEARED))  # fmt: skip
        out.append((position.strip(), words[0], words[1], words[2]) if ok else None)
    return out


def clip_question(clip: Clip, rng: random.Random, kind: str | None = None) -> Example:
    """A question about the clip (``kind`` or one drawn uniformly from KINDS) with its answer."""
    kind = kind or rng.choice(KINDS)
    n = len(clip)
    if kind == "frame":
        i = rng.randrange(n)
        return Example(f"What is in frame {i + 1}?", caption(clip.frames[i]), kind)
    if kind == "where":
        i = rng.randrange(n)
        # half the time a cell that holds a shape in that frame, else any cell
        scene = clip.frames[i]
        cell = rng.choice(scene.objects).cell if scene.objects and rng.random() < 0.5 else rng.randrange(GRID * GRID)
        obj = scene.object_at(cell)
        answer = f"{obj.colour} {obj.shape}." if obj else "nothing."
        return Example(f"What is in the {POSITIONS[cell]} in frame {i + 1}?", answer, kind)
    if kind == "when":
        # mostly a shape that appears later (most shapes are there from frame 1)
        later = [e.obj for e in clip.events if e.kind == APPEARED]
        obj = rng.choice(later if later and rng.random() < WHEN_LATER else clip.objects())
        first = clip.first_frame(obj.colour, obj.shape)
        return Example(f"In which frame does the {obj.colour} {obj.shape} appear?", f"frame {first + 1}.", kind)
    if kind == "change":
        return Example(CHANGE_PROMPT, change_text(changes(clip)), kind)
    raise ValueError(f"unknown clip question kind {kind!r}; kinds: {', '.join(KINDS)}")


def clip_seeds(split: str, n: int, start: int = 0) -> list[int]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if start < 0 or n < 0 or start + n > SPLIT_SIZE:
        raise ValueError(f"clips {start}..{start + n} are outside the split")
    return [SPLITS[split] + start + i for i in range(n)]


def split_clips(split: str, n: int, n_frames: int = DEFAULT_FRAMES, start: int = 0) -> list[tuple[Clip, Example]]:
    """Clips ``start .. start + n - 1`` of a split, each with its fixed question (kinds in turn:
    clip i asks KINDS[i % 4])."""
    out = []
    for i, seed in enumerate(clip_seeds(split, n, start)):
        clip = sample_clip(seed, n_frames)
        rng = random.Random(f"gazescenes-clip-question-{seed}")
        out.append((clip, clip_question(clip, rng, KINDS[(start + i) % len(KINDS)])))
    return out


def score_clip_answer(answer: str, example: Example, clip: Clip) -> float:
    """One answer's score in [0, 1] (see the module docstring)."""
    if example.kind == "frame":
        i = int(example.prompt.rstrip("?").rsplit(" ", 1)[1]) - 1
        said = parse_caption(answer)
        truth = clip.frames[i]
        return count_correct(said, truth) / max(1, len(truth.objects), len(said))
    if example.kind == "change":
        truth = changes(clip)
        if not truth:
            return float(answer.strip().lower() == "nothing.")
        said = parse_changes(answer)
        return count_matches(said, set(truth)) / max(len(truth), len(said))
    return float(answer.strip().lower() == example.answer.strip().lower())


def score_clip_answers(answers: Sequence[str], items: Sequence[tuple[Clip, Example]]) -> dict[str, float]:
    """Mean score overall ("all") and per kind, and "n": the number of questions."""
    if len(answers) != len(items):
        raise ValueError(f"{len(answers)} answers for {len(items)} questions")
    scores = [score_clip_answer(a, ex, clip) for a, (clip, ex) in zip(answers, items, strict=True)]
    out: dict[str, float] = {"all": sum(scores) / max(1, len(scores)), "n": len(scores)}
    for kind in KINDS:
        ks = [s for s, (_, ex) in zip(scores, items, strict=True) if ex.kind == kind]
        if ks:
            out[kind] = sum(ks) / len(ks)
    return out
