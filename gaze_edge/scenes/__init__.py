"""GazeScenes: synthetic images of coloured shapes on a 3x3 grid, with captions and questions.

Describing an object needs looking at its cell, so a model that attends to the wrong region is
visibly wrong. Everything is generated from a seed (no files):

    scene = sample_scene(seed)          # what is where (scene.py)
    image = render(scene)               # a PIL image (render.py)
    text  = caption(scene)              # "top left: red circle. center: blue square." (text.py)
    score_captions(predicted, scenes)   # object-level accuracy (score.py)

Multi-turn conversations about one or two scenes (follow-up questions, a second image in a later
turn) are in conversation.py. Fixed, disjoint seeds for the train / val / test splits live in
splits.py.
"""

from gaze_edge.scenes.render import render
from gaze_edge.scenes.scene import COLOURS, POSITIONS, SHAPES, Scene, SceneObject, sample_scene
from gaze_edge.scenes.score import CaptionScore, score_answers, score_captions
from gaze_edge.scenes.splits import SPLITS, scene_seeds, split_scenes
from gaze_edge.scenes.text import (
    CAPTION_PROMPT,
    Example,
    caption,
    make_example,
    parse_caption,
)

__all__ = [
    "CAPTION_PROMPT",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SPLITS",
    "CaptionScore",
    "Example",
    "Scene",
    "SceneObject",
    "caption",
    "make_example",
    "parse_caption",
    "render",
    "sample_scene",
    "scene_seeds",
    "score_answers",
    "score_captions",
    "split_scenes",
]
