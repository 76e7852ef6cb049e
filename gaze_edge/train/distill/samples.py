"""What distillation learns from: (image, prompt) pairs, a held-out slice, and the batch of a step.

No labels: the dense model answers each prompt itself (teacher.py). A sample names its image, not
its pixels, so the cache stays small and a resumed run reads the same images again:
- a file: its path (a user's photo, loaded with ``gaze_edge.images.load_image``);
- a GazeScenes scene: ``scene:<seed>`` (drawn again from its seed, no files).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

from gaze_edge.errors import GazeEdgeError

# Asked of every image when no --prompts file is given: descriptions first (where a model looks
# over the whole picture), then questions that need one part of it.
DEFAULT_PROMPTS = (
    "Describe the image.",
    "Describe this image in detail.",
    "What is in the image?",
    "What is the main subject of this image?",
    "What colours stand out in this image?",
    "What is in the top left of the image?",
    "What is in the bottom right of the image?",
    "Is there any text in the image? If so, what does it say?",
)

SCENE_PREFIX = "scene:"
HELDOUT_FRACTION = 0.1
MAX_HELDOUT = 64


@dataclass(frozen=True)
class Sample:
    """One prompt about one image: ``image`` is a file path or ``scene:<seed>``."""

    image: str
    prompt: str

    def load_image(self):
        """The RGB PIL image this sample names."""
        if self.image.startswith(SCENE_PREFIX):
            from gaze_edge.scenes import render, sample_scene

            return render(sample_scene(int(self.image[len(SCENE_PREFIX):])))
        from gaze_edge.images import load_image

        return load_image(Path(self.image))


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-blank line (surrounding spaces dropped), in order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GazeEdgeError(f"{path} is not UTF-8 text (one prompt per line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise GazeEdgeError(f"no prompts in {path} (one prompt per line)")
    return prompts


def image_samples(images_dir: str | Path, prompts: list[str] | None = None) -> list[Sample]:
    """Every image of a folder (sorted, sub-folders not searched) with every prompt."""
    from gaze_edge.caption import find_images

    folder = Path(images_dir)
    if not folder.is_dir():
        raise GazeEdgeError(f"--images must be a folder of images: {folder}")
    paths = find_images([folder])  # GazeEdgeError "no images found in ..." for an empty folder
    prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    return [Sample(str(p.resolve()), prompt) for p in paths for prompt in prompts]


def scene_samples(n_scenes: int) -> list[Sample]:
    """The first ``n_scenes`` GazeScenes train scenes, each with one prompt as training draws them
    (a caption request, or a question with probability 0.3), fixed by the scene's index."""
    from gaze_edge.scenes import SPLITS, make_example, sample_scene

    samples = []
    for i in range(n_scenes):
        seed = SPLITS["train"] + i
        prompt = make_example(sample_scene(seed), random.Random(f"gaze-edge-distill-scene-{i}")).prompt
        samples.append(Sample(f"{SCENE_PREFIX}{seed}", prompt))
    return samples


def limit(samples: list[Sample], max_samples: int | None) -> list[Sample]:
    """At most ``max_samples`` of them: a fixed random subset, in the original order."""
    if max_samples is None or len(samples) <= max_samples:
        return samples
    keep = sorted(random.Random("gaze-edge-distill-subset").sample(range(len(samples)), max_samples))
    return [samples[i] for i in keep]


def split_heldout(n: int, fraction: float = HELDOUT_FRACTION) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of n samples: a fixed random ~10% (1..64) held out, the
    same for every seed, so runs with different seeds are measured on the same samples."""
    if n < 2:
        raise GazeEdgeError(f"distillation needs at least 2 (image, prompt) samples, got {n}")
    n_held = min(MAX_HELDOUT, max(1, round(fraction * n)), n - 1)
    held = sorted(random.Random("gaze-edge-distill-heldout").sample(range(n), n_held))
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], held


def step_rows(n_train: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Positions (into the training samples) of step ``step``'s batch: the samples in a seeded
    random order, a new order each epoch. Depends only on (n_train, batch_size, seed, step), so a
    resumed run sees the batches an uninterrupted one would."""
    rows = []
    start = step * batch_size
    for j in range(start, start + batch_size):
        epoch, offset = divmod(j, n_train)
        rows.append(_epoch_order(n_train, seed, epoch)[offset])
    return rows


@functools.lru_cache(maxsize=4)
def _epoch_order(n_train: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_train))
    random.Random(f"gaze-edge-distill-{seed}-{epoch}").shuffle(order)
    return tuple(order)
