"""What a GazeScenes image holds: 2-4 coloured shapes, each in its own cell of a 3x3 grid.

A scene is sampled from a seed alone (``random.Random(seed)``), so the same seed gives the same
scene on every machine and Python version.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

IMAGE_SIZE = 196  # pixels; 14 x 14 patches of 14 px for the default vision tower
GRID = 3  # 3 x 3 cells

# Well separated hues; each drawn colour is jittered by up to COLOUR_JITTER per channel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 185),
    "orange": (240, 135, 25),
}
COLOUR_JITTER = 12
BACKGROUND = (236, 236, 236)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Cell names in reading order (row-major): POSITIONS[row * GRID + col].
POSITIONS: tuple[str, ...] = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # fmt: skip

MIN_OBJECTS, MAX_OBJECTS = 2, 4
MIN_HALF_SIZE, MAX_HALF_SIZE = 15, 24  # pixels, half the extent of a shape's bounding box
CELL_MARGIN = 3  # pixels kept free between a shape's box and its cell's border


@dataclass(frozen=True)
class SceneObject:
    """One shape: its words (colour, shape, cell) and how it is drawn (centre, half_size, rgb)."""

    colour: str
    shape: str
    cell: int  # 0..8, row-major
    center: tuple[float, float]  # (x, y) in pixels
    half_size: float  # the shape fits in the box center +- half_size
    rgb: tuple[int, int, int]

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def words(self) -> tuple[str, str, str]:
        """(position, colour, shape): what the scorer compares."""
        return (self.position, self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """Objects sorted by cell (reading order: rows top to bottom, left to right in a row)."""

    seed: int
    objects: tuple[SceneObject, ...]
    image_size: int = IMAGE_SIZE

    def object_at(self, cell: int) -> SceneObject | None:
        for obj in self.objects:
            if obj.cell == cell:
                return obj
        return None


def cell_box(cell: int, image_size: int = IMAGE_SIZE) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a grid cell in pixels."""
    size = image_size / GRID
    row, col = divmod(cell, GRID)
    return (col * size, row * size, (col + 1) * size, (row + 1) * size)


def sample_scene(
    seed: int,
    image_size: int = IMAGE_SIZE,
    min_objects: int = MIN_OBJECTS,
    max_objects: int = MAX_OBJECTS,
) -> Scene:
    """The scene of ``seed``: ``min_objects..max_objects`` shapes in distinct cells.

    Each shape's box (centre +- half_size) lies inside its cell with CELL_MARGIN to spare, so
    every object is inside the image and no two objects touch.
    """
    rng = random.Random(seed)
    n = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(range(GRID * GRID), n))
    cell_size = image_size / GRID
    scale = image_size / IMAGE_SIZE
    objects = []
    for cell in cells:
        colour = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        half = rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE) * scale
        x0, y0, x1, y1 = cell_box(cell, image_size)
        slack = max(0.0, cell_size / 2 - half - CELL_MARGIN * scale)
        cx = (x0 + x1) / 2 + rng.uniform(-slack, slack)
        cy = (y0 + y1) / 2 + rng.uniform(-slack, slack)
        base = COLOURS[colour]
        rgb = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in base)
        objects.append(SceneObject(colour, shape, cell, (cx, cy), half, rgb))  # type: ignore[arg-type]
    return Scene(seed=seed, objects=tuple(objects), image_size=image_size)
