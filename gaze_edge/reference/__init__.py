"""The Gaze Attention reference in PyTorch (GAZE_SPEC.md, implemented line by line).

Pure functions (no model needed):
- regions: ``count_regions``, ``grid_token_regions``, ``region_token_counts``
- selection: ``region_descriptors``, ``region_scores``, ``select_regions``, ``selection_sizes``,
  ``selected_region_ids``, ``visible_tokens``
- sequence: ``build_sequence`` -> ``GazeSequence`` (context-token insertion, 1-D / M-RoPE positions),
  ``gazing_queries`` (the gaze_start rule of full-sequence forwards)
- context: ``pooled_context_tokens`` (context tokens pooled from an image's grid embeddings)

Hooked into transformers (no fork):
- attention: ``install_gaze_attention``, ``GazeState``, ``gaze_visibility``
- vlm: ``GazeVLM`` (``forward`` with ``gaze_start``, ``prefill`` / ``step`` / ``generate`` with traces)
"""

from gaze_edge.reference.attention import (
    GazeState,
    LayerSelection,
    gaze_visibility,
    install_gaze_attention,
    uninstall_gaze_attention,
)
from gaze_edge.reference.context import pooled_context_tokens
from gaze_edge.reference.families import FAMILIES, ImageFeatures, family_of
from gaze_edge.reference.regions import count_regions, grid_token_regions, region_token_counts
from gaze_edge.reference.selection import (
    NON_GRID,
    region_descriptors,
    region_scores,
    select_regions,
    selected_region_ids,
    selection_sizes,
    visible_tokens,
)
from gaze_edge.reference.sequence import GazeSequence, ImageSpan, build_sequence, gazing_queries
from gaze_edge.reference.vlm import GazeOutput, GazeTrace, GazeVLM, StepOutput, trace_from_selections

__all__ = [
    "FAMILIES",
    "NON_GRID",
    "GazeOutput",
    "GazeSequence",
    "GazeState",
    "GazeTrace",
    "GazeVLM",
    "ImageFeatures",
    "ImageSpan",
    "LayerSelection",
    "StepOutput",
    "build_sequence",
    "count_regions",
    "family_of",
    "gaze_visibility",
    "gazing_queries",
    "grid_token_regions",
    "install_gaze_attention",
    "pooled_context_tokens",
    "region_descriptors",
    "region_scores",
    "region_token_counts",
    "select_regions",
    "selected_region_ids",
    "selection_sizes",
    "trace_from_selections",
    "uninstall_gaze_attention",
    "visible_tokens",
]
