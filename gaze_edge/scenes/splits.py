"""Fixed, disjoint seed ranges for the train, val and test splits.

Scene i of a split has seed ``SPLITS[split] + i``. Training draws as many train scenes as it
needs (up to 10^9); val and test are read from the start of their ranges, so "the first 500 test
scenes" are the same everywhere.
"""

from __future__ import annotations

from gaze_edge.scenes.scene import Scene, sample_scene

SPLIT_SIZE = 1_000_000_000
SPLITS = {"train": 0, "val": SPLIT_SIZE, "test": 2 * SPLIT_SIZE}


def scene_seeds(split: str, n: int, start: int = 0) -> list[int]:
    """Seeds of scenes ``start .. start + n - 1`` of a split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if start < 0 or n < 0 or start + n > SPLIT_SIZE:
        raise ValueError(f"scenes {start}..{start + n} are outside the split")
    base = SPLITS[split]
    return [base + start + i for i in range(n)]


def split_scenes(split: str, n: int, start: int = 0) -> list[Scene]:
    return [sample_scene(seed) for seed in scene_seeds(split, n, start)]
