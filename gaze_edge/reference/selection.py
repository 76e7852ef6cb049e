"""Region descriptors, scores, top-k selection and visibility (GAZE_SPEC.md, "Generated tokens").

Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` KV heads (``G = Hq // Hkv`` query heads share
one, grouped like transformers' ``repeat_kv``: query head ``i`` uses KV head ``i // G``), ``Lq``
queries, ``Lk`` cached keys, ``R`` regions (the most any batch row holds), ``D`` head dim,
``S`` selection heads (``Hkv`` for gqa_mean and gqa_max, ``Hq`` for per_head, ``1`` for
layer_mean).

``token_region`` (``(B, Lk)`` long) gives each cached token's region index in its sequence, with
all image chunks numbered together (image order, then raster order) and ``-1`` for every
non-grid token (text, special tokens, context tokens, generated tokens).

The selection is hard: callers run it on detached tensors, so no gradient flows through it.
"""

from __future__ import annotations

import torch

from gaze_edge.config import GazeConfig

NON_GRID = -1  # token_region value of every token outside an image grid


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    # The spec computes descriptors and scores in f32; a model run in f64 (tests) stays in f64.
    return torch.promote_types(dtype, torch.float32)


def region_descriptors(keys: torch.Tensor, token_region: torch.Tensor, n_regions: int) -> torch.Tensor:
    """``d[b,h,r] = mean over tokens t of region r of keys[b,h,t]`` (spec step 1).

    keys: ``(B, Hkv, Lk, D)`` as stored in the KV cache (post-RoPE). token_region: ``(B, Lk)``.
    Returns ``(B, Hkv, R, D)`` in f32 (f64 for f64 keys); regions a row does not hold are 0.
    """
    batch, _, n_keys, _ = keys.shape
    if token_region.shape != (batch, n_keys):
        raise ValueError(f"token_region {tuple(token_region.shape)} does not match keys {tuple(keys.shape)}")
    dtype = _score_dtype(keys.dtype)
    # one_hot[b, t, r] = 1 where token t lies in region r; non-grid tokens map to an extra column
    # that is dropped.
    column = torch.where(token_region >= 0, token_region, n_regions)
    one_hot = torch.nn.functional.one_hot(column, n_regions + 1)[..., :n_regions].to(dtype)
    sums = torch.einsum("bhtd,btr->bhrd", keys.to(dtype), one_hot)
    counts = one_hot.sum(dim=1).clamp(min=1)  # (B, R)
    return sums / counts[:, None, :, None]


def region_scores(query: torch.Tensor, descriptors: torch.Tensor, score_mode: str) -> torch.Tensor:
    """Region scores ``s = qbar . d`` with no 1/sqrt(D) scaling (spec step 2).

    query: ``(B, Hq, Lq, D)`` post-RoPE. descriptors: ``(B, Hkv, R, D)``.
    Returns ``(B, S, Lq, R)`` in the descriptors' dtype:
    - ``gqa_mean``: ``qbar[h]`` = mean of the queries of KV head ``h``'s group, S = Hkv;
    - ``per_head``: each query head with its own query against its KV head's descriptors, S = Hq;
    - ``layer_mean``: mean over all query heads of their per-head scores, S = 1 (by linearity the
      mean over KV heads of the gqa_mean scores);
    - ``gqa_max``: the max over KV head ``h``'s query heads of their per-head scores, S = Hkv (one
      sharp head keeps its regions).
    """
    batch, n_heads, n_queries, head_dim = query.shape
    n_kv_heads = descriptors.shape[1]
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads do not group onto {n_kv_heads} KV heads")
    group = n_heads // n_kv_heads
    q = query.to(descriptors.dtype)
    if score_mode in ("per_head", "gqa_max"):
        per_head = q @ descriptors.repeat_interleave(group, dim=1).transpose(-1, -2)  # (B, Hq, Lq, R)
        if score_mode == "per_head":
            return per_head
        return per_head.view(batch, n_kv_heads, group, n_queries, -1).amax(dim=2)
    qbar = q.view(batch, n_kv_heads, group, n_queries, head_dim).mean(dim=2)
    scores = qbar @ descriptors.transpose(-1, -2)  # (B, Hkv, Lq, R)
    if score_mode == "gqa_mean":
        return scores
    if score_mode == "layer_mean":
        return scores.mean(dim=1, keepdim=True)
    raise ValueError(f"unknown score_mode {score_mode!r}")


def select_regions(scores: torch.Tensor, k: torch.Tensor, n_regions: torch.Tensor) -> torch.Tensor:
    """The ``k[b]`` highest-scoring regions of each row (spec step 3).

    scores: ``(B, S, Lq, R)``. k, n_regions: ``(B,)`` long, ``k[b] <= n_regions[b] <= R``.
    Ties go to the lower region index; regions ``>= n_regions[b]`` are never selected.
    Returns a bool mask ``(B, S, Lq, R)`` with exactly ``k[b]`` True per ``(b, s, q)``.
    """
    n_total = scores.shape[-1]
    index = torch.arange(n_total, device=scores.device)
    held = index[None, :] < n_regions[:, None]  # (B, R)
    scores = scores.masked_fill(~held[:, None, None, :], float("-inf"))
    # A stable descending sort keeps equal scores in index order: the lower index ranks first.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, index.expand_as(order))
    return (rank < k[:, None, None, None]) & held[:, None, None, :]


def selected_region_ids(selected: torch.Tensor) -> torch.Tensor:
    """Region ids of a selection, ascending.

    selected: bool ``(..., R)`` with the same count ``k`` of True in every row.
    Returns LongTensor ``(..., k)``.
    """
    counts = selected.sum(dim=-1)
    k = int(counts.max()) if counts.numel() else 0
    if counts.numel() and int(counts.min()) != k:
        raise ValueError("rows select different numbers of regions")
    # Sorting the keys "unselected, then index" puts selected ids first, ascending.
    index = torch.arange(selected.shape[-1], device=selected.device)
    key = (~selected).long() * selected.shape[-1] + index
    return torch.sort(key, dim=-1).values[..., :k]


def visible_tokens(selected: torch.Tensor, token_region: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Which cached tokens each query head may attend to under gaze (spec step 4).

    selected: bool ``(B, S, Lq, R)``; token_region: ``(B, Lk)``; n_heads = Hq.
    Returns bool ``(B, Hq, Lq, Lk)``: True for every non-grid token and for the grid tokens of the
    regions selected for that query head (its KV head's selection in gqa_mean and gqa_max, its
    own in per_head, the layer's in layer_mean). Causality is not applied here: the caller
    intersects this with the causal / padding mask.
    """
    batch, n_sel, n_queries, n_total = selected.shape
    if n_sel == 1:
        per_head = selected.expand(batch, n_heads, n_queries, n_total)
    elif n_sel == n_heads:
        per_head = selected
    else:
        per_head = selected.repeat_interleave(n_heads // n_sel, dim=1)
    # Column n_total stands for "non-grid" and is always visible.
    with_text = torch.cat([per_head, per_head.new_ones(batch, n_heads, n_queries, 1)], dim=-1)
    column = torch.where(token_region >= 0, token_region, n_total)  # (B, Lk)
    column = column[:, None, None, :].expand(batch, n_heads, n_queries, column.shape[-1])
    return torch.gather(with_text, -1, column)


def selection_sizes(config: GazeConfig, n_regions: torch.Tensor) -> torch.Tensor:
    """``k`` of every row from its region count (``GazeConfig.n_selected``). ``(B,)`` long."""
    return torch.tensor(
        [config.n_selected(int(n)) for n in n_regions.tolist()], dtype=torch.long, device=n_regions.device
    )
