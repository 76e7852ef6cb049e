"""Gaze attention as a transformers attention function (no forked model code).

``install_gaze_attention(model)`` points the text model's ``config._attn_implementation`` at
``"gaze_eager"`` or ``"gaze_sdpa"``, two functions this module registers with
``transformers.AttentionInterface`` (and matching mask builders with ``AttentionMaskInterface``).
The vision tower keeps its own implementation. Each gaze function wraps the model's own
``eager`` (the one defined in its modeling file) or transformers' ``sdpa`` function:

- called without a ``gaze`` keyword argument (or ``gaze=None``), it IS the base function: the
  model computes exactly what it computed before (dense);
- called with ``gaze=GazeState(...)`` (the text model forwards unknown keyword arguments down to
  its attention functions), every query marked in ``state.query_gazes`` attends only to its
  visible tokens (GAZE_SPEC.md, steps 1-4) in every layer from ``config.n_dense_layers`` on (the
  layers before it run the base function unchanged: dense); the gaze visibility is folded into
  the attention mask (excluded tokens get the mask's minimum, i.e. weight exactly 0 after the
  softmax) and the base function runs with that mask. When every region is selected the mask is unchanged, so
  ``top_k >= n_regions`` is bit-for-bit dense.

The selection runs on detached queries and keys (hard top-k, no gradient); the attention over
the selected tokens is the base function's, so gradients reach the selected keys/values and
everything upstream (context tokens included).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from gaze_edge.config import GazeConfig
from gaze_edge.reference.selection import (
    NON_GRID,
    region_descriptors,
    region_scores,
    select_regions,
    selection_sizes,
    visible_tokens,
)

BASE_IMPLEMENTATIONS = ("eager", "sdpa")
GAZE_PREFIX = "gaze_"


@dataclass
class LayerSelection:
    """What one layer selected in one forward, for the ``n`` queries that gazed.

    query_index: ``(n,)`` long: the positions (within the forward's queries) that gazed in some row.
    scores: ``(B, S, n, R)`` f32; selected: bool ``(B, S, n, R)``. S as in ``region_scores``.
    """

    query_index: torch.Tensor
    scores: torch.Tensor
    selected: torch.Tensor

    def at(self, query: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores ``(S, R)``, selected ``(S, R)``) of one query position of one row."""
        where = (self.query_index == query).nonzero().flatten()
        if len(where) != 1:
            raise KeyError(f"query {query} did not gaze")
        return self.scores[row, :, int(where)], self.selected[row, :, int(where)]


@dataclass
class GazeState:
    """Everything the gaze attention needs, passed to the text model as ``gaze=state``.

    config: the gaze hyper-parameters (region size already applied in ``token_region``).
    token_region: ``(B, N)`` long: region of every token of the sequence laid out so far (``-1``
      non-grid); cached tokens beyond ``N`` (generated ones) are non-grid.
    n_regions: ``(B,)`` long.
    query_gazes: ``(B, Lq)`` bool: which queries of the current forward apply gaze (the others
      are dense). Set per forward.
    descriptors: per layer ``(B, Hkv, R, D)``; computed from the cached keys the first time a
      layer gazes and kept (the cached keys of the image never change in this reference).
    trace: when not None, each gazing layer's ``LayerSelection`` of the current forward is stored
      here (keyed by layer index; the dense first layers have none).
    """

    config: GazeConfig
    token_region: torch.Tensor
    n_regions: torch.Tensor
    query_gazes: torch.Tensor
    descriptors: dict[int, torch.Tensor] = field(default_factory=dict)
    trace: dict[int, LayerSelection] | None = None

    @property
    def k(self) -> torch.Tensor:
        """Regions selected per row, ``(B,)`` (from the current config: a runtime override of
        top_k / keep_ratio applies at the next step)."""
        return selection_sizes(self.config, self.n_regions)

    @property
    def max_regions(self) -> int:
        return int(self.n_regions.max()) if self.n_regions.numel() else 0

    def applies(self) -> bool:
        return self.max_regions > 0 and bool(self.query_gazes.any())

    def gazes_in(self, layer: int) -> bool:
        """Whether text layer ``layer`` gazes (GAZE_SPEC.md "Dense first layers": the first
        ``n_dense_layers`` layers attend densely, at every query)."""
        return layer >= self.config.n_dense_layers


def _key_regions(state: GazeState, n_keys: int) -> torch.Tensor:
    """token_region cut or padded (non-grid) to the cached key count: ``(B, Lk)``."""
    region = state.token_region
    if region.shape[1] >= n_keys:
        return region[:, :n_keys]
    pad = region.new_full((region.shape[0], n_keys - region.shape[1]), NON_GRID)
    return torch.cat([region, pad], dim=1)


def gaze_visibility(layer: int, query: torch.Tensor, key: torch.Tensor, state: GazeState) -> torch.Tensor:
    """Bool ``(B, Hq, Lq, Lk)``: the tokens each query head may see (all tokens for dense queries),
    in a layer that gazes (the hook does not call it for the dense first layers).

    query: ``(B, Hq, Lq, D)`` post-RoPE; key: ``(B, Hkv, Lk, D)`` the whole cache, post-RoPE.
    Only the query positions that gaze in some row are scored (the others are dense anyway).
    """
    batch, n_heads, n_queries, _ = query.shape
    n_keys = key.shape[2]
    # Hard selection: no gradient; f32 even under autocast (the spec scores in f32).
    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        token_region = _key_regions(state, n_keys)
        descriptors = state.descriptors.get(layer)
        if descriptors is None:
            descriptors = region_descriptors(key.detach(), token_region, state.max_regions)
            state.descriptors[layer] = descriptors
        gazes = state.query_gazes.to(query.device)  # (B, Lq)
        query_index = gazes.any(dim=0).nonzero().flatten()
        scores = region_scores(query.detach()[:, :, query_index], descriptors, state.config.score_mode)
        selected = select_regions(scores, state.k.to(scores.device), state.n_regions.to(scores.device))
        gazed = visible_tokens(selected, token_region, n_heads)  # (B, Hq, n, Lk)
        gazed = gazed | ~gazes[:, query_index][:, None, :, None]  # rows where this query is dense
        visible = torch.ones(batch, n_heads, n_queries, n_keys, dtype=torch.bool, device=query.device)
        visible[:, :, query_index] = gazed
        if state.trace is not None:
            state.trace[layer] = LayerSelection(query_index.cpu(), scores.cpu(), selected.cpu())
    return visible


def _apply_visibility(
    attention_mask: torch.Tensor | None, visible: torch.Tensor, query: torch.Tensor, base: str
) -> torch.Tensor:
    """The base mask restricted to ``visible``, in the form the base function takes."""
    if attention_mask is None:  # causal, no padding
        n_queries, n_keys = visible.shape[-2:]
        offset = n_keys - n_queries
        rows = torch.arange(n_queries, device=visible.device)[:, None] + offset
        allowed = visible & (torch.arange(n_keys, device=visible.device)[None, :] <= rows)
        if base == "sdpa":
            return allowed
        zeros = torch.zeros((), dtype=query.dtype, device=query.device)
        return torch.where(allowed, zeros, torch.finfo(query.dtype).min)
    attention_mask = attention_mask[..., : visible.shape[-1]]
    if attention_mask.dtype == torch.bool:
        return attention_mask & visible
    return torch.where(visible, attention_mask, torch.finfo(attention_mask.dtype).min)


def _base_function(module: torch.nn.Module, base: str) -> Callable:
    if base == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    # The model's own eager function, so that gaze off is bit-for-bit the model.
    return sys.modules[type(module).__module__].eager_attention_forward


def _make_gaze_attention(base: str) -> Callable:
    def gaze_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        gaze: GazeState | None = None,
        **kwargs,
    ):
        function = _base_function(module, base)
        if gaze is not None and gaze.applies() and gaze.gazes_in(module.layer_idx):
            visible = gaze_visibility(module.layer_idx, query, key, gaze)
            attention_mask = _apply_visibility(attention_mask, visible, query, base)
        return function(module, query, key, value, attention_mask, **kwargs)

    gaze_attention_forward.__name__ = f"gaze_{base}_attention_forward"
    return gaze_attention_forward


for _base, _mask in (("eager", eager_mask), ("sdpa", sdpa_mask)):
    AttentionInterface.register(GAZE_PREFIX + _base, _make_gaze_attention(_base))
    AttentionMaskInterface.register(GAZE_PREFIX + _base, _mask)


def text_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The language model inside a supported VLM (``model.model.language_model``)."""
    try:
        return model.model.language_model
    except AttributeError as err:
        raise TypeError(f"{type(model).__name__} has no model.language_model: not a supported VLM") from err


def install_gaze_attention(model: torch.nn.Module) -> str:
    """Route the text model's attention through the gaze hook; returns the new implementation name.

    The base is the text model's current implementation (``eager`` or ``sdpa``); installing twice
    is a no-op. Without a ``gaze=`` argument the model computes exactly what it did before.
    """
    text_model = text_model_of(model)
    current = text_model.config._attn_implementation
    if current.startswith(GAZE_PREFIX):
        return current
    if current not in BASE_IMPLEMENTATIONS:
        raise ValueError(f"gaze wraps {BASE_IMPLEMENTATIONS} attention, the text model uses {current!r}")
    name = GAZE_PREFIX + current
    configs = {id(m.config): m.config for m in text_model.modules() if hasattr(m, "config")}
    configs[id(text_model.config)] = text_model.config
    for config in configs.values():
        config._attn_implementation = name
    return name


def uninstall_gaze_attention(model: torch.nn.Module) -> None:
    """Give the text model back its base attention implementation."""
    text_model = text_model_of(model)
    for m in [text_model, *text_model.modules()]:
        config = getattr(m, "config", None)
        if config is not None and config._attn_implementation.startswith(GAZE_PREFIX):
            config._attn_implementation = config._attn_implementation.removeprefix(GAZE_PREFIX)
