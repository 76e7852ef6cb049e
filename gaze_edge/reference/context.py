"""Pooled context tokens (GAZE_SPEC.md, "Pooled context tokens"): context tokens computed from an
image's own grid embeddings, for models that ship no learned ones.

Token ``c`` is the mean of the grid embeddings of tile ``c`` (``gaze_edge.config.pooled_context_tiles``:
the grid split into ``th x tw`` tiles, raster order; one token is the whole grid's mean). The
embeddings are the vectors the grid tokens carry in the language model's input (the projector's
output), and the mean is computed in f32 (f64 for an f64 model, as the reference's scores).
"""

from __future__ import annotations

import torch

from gaze_edge.config import pooled_context_tiles


def pooled_context_tokens(features: torch.Tensor, grid_h: int, grid_w: int, n_tokens: int) -> torch.Tensor:
    """``(n_tokens, E)``: the pooled context tokens of one image.

    features: ``(grid_h * grid_w, E)`` the image's grid embeddings in raster order.
    Returns f32 (f64 for f64 features); the caller casts to the sequence's dtype.
    """
    if features.shape[0] != grid_h * grid_w:
        raise ValueError(f"{features.shape[0]} grid embeddings for a {grid_h}x{grid_w} grid")
    dtype = torch.promote_types(features.dtype, torch.float32)
    grid = features.to(dtype).view(grid_h, grid_w, -1)
    tiles = pooled_context_tiles(grid_h, grid_w, n_tokens)
    if not tiles:
        return grid.new_zeros((0, grid.shape[-1]))
    return torch.stack([grid[r0:r1, c0:c1].mean(dim=(0, 1)) for r0, r1, c0, c1 in tiles])
