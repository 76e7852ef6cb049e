"""Gaze regions of one image grid (GAZE_SPEC.md, "Gaze region").

A grid of ``grid_h x grid_w`` language-model tokens (raster order) is tiled by ``region_h x
region_w`` rectangles in raster order; at the right and bottom edges a region holds only the
tokens that exist, so ``n_regions = ceil(grid_h / region_h) * ceil(grid_w / region_w)``.
"""

from __future__ import annotations

import math

import torch


def count_regions(grid_h: int, grid_w: int, region_h: int, region_w: int) -> int:
    """Number of regions tiling a ``grid_h x grid_w`` grid."""
    return math.ceil(grid_h / region_h) * math.ceil(grid_w / region_w)


def grid_token_regions(grid_h: int, grid_w: int, region_h: int, region_w: int) -> torch.Tensor:
    """Region index of every grid token.

    Returns: LongTensor ``(grid_h * grid_w,)``; entry ``t`` (raster order, ``t = row * grid_w + col``)
    is ``(row // region_h) * ceil(grid_w / region_w) + col // region_w``.
    """
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid must be at least 1x1, got {grid_h}x{grid_w}")
    if region_h < 1 or region_w < 1:
        raise ValueError(f"region size must be >= 1, got {region_h}x{region_w}")
    regions_per_row = math.ceil(grid_w / region_w)
    row_band = torch.arange(grid_h) // region_h
    col_band = torch.arange(grid_w) // region_w
    return (row_band[:, None] * regions_per_row + col_band[None, :]).reshape(-1)


def region_token_counts(grid_h: int, grid_w: int, region_h: int, region_w: int) -> torch.Tensor:
    """Tokens in each region: LongTensor ``(n_regions,)`` (edge regions may be smaller)."""
    regions = grid_token_regions(grid_h, grid_w, region_h, region_w)
    return torch.bincount(regions, minlength=count_regions(grid_h, grid_w, region_h, region_w))
