"""Gaze hyper-parameters stored with a model (GAZE_SPEC.md, "Hyper-parameters stored with a model").

One dataclass shared by the reference, the checkpoint format, the converter and the runtime.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where it is used: the CLI reads this module at start-up
    import numpy as np

SCORE_MODES = ("gqa_mean", "per_head", "layer_mean", "gqa_max")
CONTEXT_TOKEN_MODES = ("learned", "pooled")


@dataclass(frozen=True)
class GazeConfig:
    """How a model gazes.

    region_h, region_w: region size in grid tokens (edge regions may be smaller).
    n_context_tokens: learned context tokens appended after every image chunk's grid.
    top_k: regions kept per decode step (> 0 takes precedence over keep_ratio).
    keep_ratio: fraction of all regions kept when top_k == 0.
    score_mode: one of SCORE_MODES.
    n_dense_layers: the first n_dense_layers layers of the text model attend densely at gaze steps
      (every layer when it is >= the layer count); the others gaze.
    context_tokens: "learned" (a tensor shipped with the model) or "pooled" (computed at run time
      from each image's own grid embeddings, GAZE_SPEC.md "Pooled context tokens"; no tensor).
    """

    region_h: int = 2
    region_w: int = 2
    n_context_tokens: int = 1
    top_k: int = 0
    keep_ratio: float = 0.25
    score_mode: str = "gqa_mean"
    n_dense_layers: int = 0
    context_tokens: str = "learned"

    def __post_init__(self) -> None:
        if self.region_h < 1 or self.region_w < 1:
            raise ValueError(f"region size must be >= 1, got {self.region_h}x{self.region_w}")
        if self.n_context_tokens < 0:
            raise ValueError(f"n_context_tokens must be >= 0, got {self.n_context_tokens}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.keep_ratio <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}")
        if self.n_dense_layers < 0:
            raise ValueError(f"n_dense_layers must be >= 0, got {self.n_dense_layers}")
        if self.context_tokens not in CONTEXT_TOKEN_MODES:
            raise ValueError(
                f"context_tokens must be one of {CONTEXT_TOKEN_MODES}, got {self.context_tokens!r}"
            )

    def n_selected(self, n_regions_total: int) -> int:
        """k for a sequence holding n_regions_total regions (GAZE_SPEC.md, Selection)."""
        if n_regions_total <= 0:
            return 0
        return n_selected(self.top_k, self.keep_ratio, n_regions_total)

    @property
    def pooled(self) -> bool:
        """True when the context tokens are pooled from each image (no learned tensor)."""
        return self.context_tokens == "pooled"

    def replace(self, **changes) -> GazeConfig:
        return GazeConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GazeConfig:
        """The inverse of to_dict; fields a dict lacks (checkpoints older than them) take their
        defaults, unknown fields are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown gaze settings: {sorted(unknown)}")
        return cls(**d)


# Training-free gaze (docs/TRAINING.md, "Gaze for dense checkpoints", measured on the dense-trained
# GazeScenes twins): what `gaze-edge make-gaze` writes by default, and what a GGUF pair that was not
# converted for gaze gazes with when asked to (`--keep-ratio` on a plain pair; its context tokens
# are pooled, it has no tensor).
TRAINING_FREE = GazeConfig(region_h=2, region_w=2, n_context_tokens=1, keep_ratio=0.25, score_mode="gqa_max",
                           n_dense_layers=0, context_tokens="pooled")


def keep_ratio_ppm(keep_ratio: float) -> int:
    """keep_ratio in parts per million, as every implementation reads it (GAZE_SPEC.md,
    Selection): the float32 the GGUF and the C API hold, times 10^6, rounded half away from zero
    (C's lround; exact in double for ratios in (0, 1])."""
    y = struct.unpack("f", struct.pack("f", keep_ratio))[0] * 1e6
    return int(math.floor(y + 0.5))


def n_selected(top_k: int, keep_ratio: float, n_regions_total: int) -> int:
    """k, the regions kept among n_regions_total (GAZE_SPEC.md, Selection): top_k when > 0, else
    ceil(ppm * n / 10^6) in integers, clamped to [1, n]; 0 without regions."""
    if n_regions_total <= 0:
        return 0
    k = top_k if top_k > 0 else -(-keep_ratio_ppm(keep_ratio) * n_regions_total // 1_000_000)
    return max(1, min(k, n_regions_total))


def visual_kv_fraction(
    selected: np.ndarray, region_sizes: np.ndarray, n_kv_heads: int | None = None, n_dense_layers: int = 0
) -> float:
    """GAZE_SPEC.md "Accounting": the visual KV entries a step reads, as a fraction of all of them.

    selected: (n_gazed_layers, S, k) region ids of the layers that gazed, S = KV heads, or query
    heads for per_head (then n_kv_heads groups them: query head g + n_gqa * kv_head, as in the
    query). A KV head reads the union of the regions its query heads selected. n_dense_layers:
    layers that attended densely at this step (``n_dense_layers`` of the config, at most the layer
    count); each reads every visual entry. The result is grid tokens read, summed over layers and
    KV heads, / (grid tokens x (n_dense_layers + n_gazed_layers) x KV heads).
    """
    import numpy as np

    selected = np.asarray(selected)
    region_sizes = np.asarray(region_sizes)
    n_layers, n_sel_heads, _ = selected.shape
    n_kv = n_kv_heads or n_sel_heads
    if n_sel_heads % n_kv:
        raise ValueError(f"{n_sel_heads} selections per layer do not group into {n_kv} KV heads")
    if n_dense_layers < 0 or n_layers + n_dense_layers == 0:
        raise ValueError(f"no layers to account for ({n_layers} gazed, {n_dense_layers} dense)")
    read = np.zeros((n_layers, n_kv, region_sizes.shape[0]), dtype=bool)
    groups = np.arange(n_sel_heads) // (n_sel_heads // n_kv)
    for h in range(n_sel_heads):
        read[np.arange(n_layers)[:, None], groups[h], selected[:, h, :]] = True
    grid = int(region_sizes.sum())
    used = int((read * region_sizes).sum()) + grid * n_kv * n_dense_layers
    return float(used) / float(grid * (n_layers + n_dense_layers) * n_kv)


def pooled_context_tiles(grid_h: int, grid_w: int, n_tokens: int) -> list[tuple[int, int, int, int]]:
    """GAZE_SPEC.md "Pooled context tokens": the grid block each pooled context token averages.

    The grid is split into th x tw tiles, th = the largest divisor of n_tokens with th <= sqrt(n_tokens),
    tw = n_tokens / th; tile (i, j) covers rows floor(i*H/th) .. floor((i+1)*H/th) - 1 and cols
    floor(j*W/tw) .. floor((j+1)*W/tw) - 1. Returns one ``(row_start, row_end, col_start, col_end)``
    (ends exclusive) per token, tiles in raster order; a tile that would be empty (more tiles than
    the grid has rows or columns) is the whole grid ``(0, H, 0, W)``.
    """
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid must be at least 1x1, got {grid_h}x{grid_w}")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if n_tokens == 0:
        return []
    th = max(d for d in range(1, math.isqrt(n_tokens) + 1) if n_tokens % d == 0)
    tw = n_tokens // th
    tiles = []
    for i in range(th):
        r0, r1 = i * grid_h // th, (i + 1) * grid_h // th
        for j in range(tw):
            c0, c1 = j * grid_w // tw, (j + 1) * grid_w // tw
            tiles.append((r0, r1, c0, c1) if r1 > r0 and c1 > c0 else (0, grid_h, 0, grid_w))
    return tiles
