"""The language model's input sequence with context tokens (GAZE_SPEC.md, "Context tokens").

``build_sequence`` takes the token embeddings of a batch whose image placeholders are to be
filled with image features (as transformers' processors lay them out: one placeholder per
grid token), fills them, and appends the ``C`` context tokens right after the last grid token of
every image chunk: the learned ones (one shared set), or, with ``config.context_tokens ==
"pooled"``, each image's own pooled from its grid embeddings (``reference.context``); both kinds
take the same place, positions and attention. It returns everything the gaze hook needs: the
embeddings, the positions (1-D RoPE or M-RoPE), the region of every token, and where each input
token went.

Positions, per the spec:
- 1-D RoPE (``rope="1d"``): ``0, 1, 2, ...`` over the whole sequence, context tokens included
  (they take ``p, p+1, ...`` after the grid's last position and text after them continues).
- M-RoPE (``rope="mrope"``, Qwen2-VL / Qwen2.5-VL): a text token takes ``(p, p, p)`` and advances
  ``p`` by one; an image grid starting at ``p`` gives token ``(row, col)`` the position
  ``(p, p + row, p + col)`` and moves ``p`` to ``1 + the largest component it used``, i.e.
  ``p + max(grid_h, grid_w)``; context tokens then continue like text.
Tokens whose ``attention_mask`` is 0 (padding) get position 0 under M-RoPE and do not advance
``p`` (as transformers' ``get_rope_index`` does); 1-D positions ignore the mask (as
``LlamaModel`` does when given no position ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gaze_edge.config import GazeConfig
from gaze_edge.reference.context import pooled_context_tokens
from gaze_edge.reference.regions import count_regions, grid_token_regions
from gaze_edge.reference.selection import NON_GRID

ROPE_KINDS = ("1d", "mrope")


@dataclass(frozen=True)
class ImageSpan:
    """Where one image chunk sits in a built sequence (indices into the expanded row).

    grid_start: index of its first grid token; grid_h x grid_w grid tokens follow in raster order.
    context_start: index of its first context token (``grid_start + grid_h * grid_w``).
    first_region: index of its first region in the row's global region numbering.
    n_regions: how many regions its grid holds.
    context_end: one past its last context token (``context_start + C``).
    """

    grid_start: int
    grid_h: int
    grid_w: int
    context_start: int
    first_region: int
    n_regions: int
    context_end: int


@dataclass
class GazeSequence:
    """A batch ready for the text model. ``B`` rows, ``L`` input tokens, ``N`` tokens after
    context-token insertion (rows shorter than ``N`` are right-padded, with ``attention_mask`` 0).

    inputs_embeds: ``(B, N, E)``.
    position_ids: ``(B, N)`` for 1-D RoPE, ``(3, B, N)`` for M-RoPE.
    attention_mask: ``(B, N)`` long, or None when no row is padded.
    token_region: ``(B, N)`` long: global region index of every grid token, ``-1`` elsewhere.
    n_regions: ``(B,)`` long: regions in each row (all its image chunks together).
    is_context: ``(B, N)`` bool: the context tokens.
    source_index: ``(B, L)`` long: index in the expanded row of input token ``j``.
    next_position: ``(B,)`` long: the position a token appended to the row would take.
    images: per row, its image chunks in order.
    rope: "1d" or "mrope".
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    token_region: torch.Tensor
    n_regions: torch.Tensor
    is_context: torch.Tensor
    source_index: torch.Tensor
    next_position: torch.Tensor
    images: list[list[ImageSpan]]
    rope: str


def _image_runs(placeholders: torch.Tensor, sizes: list[int]) -> list[tuple[int, int]]:
    """Split a row's placeholder indices into consecutive runs of the given sizes: [(start, end)]."""
    runs, used = [], 0
    for size in sizes:
        run = placeholders[used : used + size]
        start, end = int(run[0]), int(run[-1]) + 1
        if end - start != size:
            raise ValueError(f"the {size} placeholders of an image are not consecutive in the input")
        runs.append((start, end))
        used += size
    return runs


class _Row:
    """One row of the expanded sequence, built piece by piece (text, grid, context)."""

    def __init__(self, embeds: torch.Tensor, valid: torch.Tensor, rope: str) -> None:
        self.input_embeds, self.valid, self.rope = embeds, valid, rope
        self.embeds: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.regions: list[torch.Tensor] = []
        self.context: list[torch.Tensor] = []
        self.source: list[torch.Tensor] = []  # expanded index of each input token
        self.images: list[ImageSpan] = []
        self.length = 0  # tokens so far
        self.mrope_next = 0  # M-RoPE: the position the next text token takes
        self.n_regions = 0

    @property
    def next_position(self) -> int:
        return self.length if self.rope == "1d" else self.mrope_next

    def _append(self, embeds: torch.Tensor, positions: torch.Tensor, regions: torch.Tensor, context: bool) -> None:
        n = embeds.shape[0]
        self.embeds.append(embeds)
        self.positions.append(positions)
        self.regions.append(regions)
        self.context.append(torch.full((n,), context))
        self.length += n

    def _text_positions(self, n: int, valid: torch.Tensor) -> torch.Tensor:
        if self.rope == "1d":
            return torch.arange(self.length, self.length + n)
        keep = valid.long()
        positions = (self.mrope_next + torch.cumsum(keep, 0) - 1) * keep
        self.mrope_next += int(keep.sum())
        return positions.expand(3, n)

    def add_text(self, start: int, end: int) -> None:
        """Input tokens ``start:end`` (not image placeholders)."""
        n = end - start
        if n:
            self.source.append(torch.arange(self.length, self.length + n))
            positions = self._text_positions(n, self.valid[start:end])
            self._append(self.input_embeds[start:end], positions, torch.full((n,), NON_GRID), False)

    def add_grid(self, start: int, end: int, grid: tuple[int, int], config: GazeConfig, n_context: int) -> None:
        """The filled placeholders ``start:end`` of one image with an ``(h, w)`` grid, which
        ``n_context`` context tokens will follow."""
        grid_h, grid_w = grid
        n = end - start
        self.source.append(torch.arange(self.length, self.length + n))
        if self.rope == "1d":
            positions = torch.arange(self.length, self.length + n)
        else:
            p = self.mrope_next
            rows = torch.arange(grid_h).repeat_interleave(grid_w)
            cols = torch.arange(grid_w).repeat(grid_h)
            positions = torch.stack([torch.full((n,), p), p + rows, p + cols])
            self.mrope_next = p + max(grid_h, grid_w)  # 1 + the largest component used
        n_image_regions = count_regions(grid_h, grid_w, config.region_h, config.region_w)
        context_end = self.length + n + n_context
        self.images.append(
            ImageSpan(self.length, grid_h, grid_w, self.length + n, self.n_regions, n_image_regions, context_end)
        )
        regions = grid_token_regions(grid_h, grid_w, config.region_h, config.region_w) + self.n_regions
        self.n_regions += n_image_regions
        self._append(self.input_embeds[start:end], positions, regions, False)

    def add_context(self, context: torch.Tensor) -> None:
        """The ``C`` context tokens, right after a grid; positioned like text."""
        n = context.shape[0]
        if n:
            positions = self._text_positions(n, torch.ones(n, dtype=torch.bool))
            self._append(context, positions, torch.full((n,), NON_GRID), True)


def _image_context_tokens(
    image_features: list[torch.Tensor],
    grids: list[tuple[int, int]],
    context_tokens: torch.Tensor | None,
    config: GazeConfig,
    embeds: torch.Tensor,
) -> list[torch.Tensor]:
    """The context tokens that follow each image, in ``embeds``' dtype: the shared learned set,
    or each image's pooled ones."""
    if not config.pooled:
        if context_tokens is None:
            raise ValueError("learned context tokens are needed (context_tokens is None)")
        return [context_tokens.to(embeds.dtype)] * len(grids)
    if context_tokens is not None and context_tokens.shape[0]:
        raise ValueError(f"pooled context tokens take no learned tensor, got {context_tokens.shape[0]} rows")
    return [
        pooled_context_tokens(f.to(embeds.dtype), h, w, config.n_context_tokens).to(embeds.dtype)
        for f, (h, w) in zip(image_features, grids, strict=True)
    ]


def build_sequence(
    token_embeds: torch.Tensor,
    image_token_mask: torch.Tensor,
    image_features: list[torch.Tensor],
    grids: list[tuple[int, int]],
    context_tokens: torch.Tensor | None,
    config: GazeConfig,
    rope: str = "1d",
    attention_mask: torch.Tensor | None = None,
) -> GazeSequence:
    """Fill image placeholders, insert context tokens, number regions, compute positions.

    token_embeds: ``(B, L, E)`` input embeddings of the token ids (placeholders included).
    image_token_mask: ``(B, L)`` bool, True at image placeholders; the images fill them in order
      (row 0 first, like transformers' ``masked_scatter``), image ``i`` taking
      ``grid_h * grid_w`` consecutive placeholders.
    image_features: per image ``(grid_h * grid_w, E)`` in raster order. grids: per image
      ``(grid_h, grid_w)``.
    context_tokens: ``(C, E)`` learned context tokens; ``C`` may be 0 (then the sequence is the
      model's own). With ``config.context_tokens == "pooled"`` there are none (None or 0 rows):
      every image gets ``config.n_context_tokens`` tokens pooled from its grid embeddings as the
      grid tokens carry them (after the cast to ``token_embeds``' dtype).
    config: region size (``region_h``, ``region_w``), context-token mode. rope: "1d" or "mrope".
    attention_mask: ``(B, L)`` or None.
    """
    if rope not in ROPE_KINDS:
        raise ValueError(f"rope must be one of {ROPE_KINDS}, got {rope!r}")
    batch, n_inputs, _ = token_embeds.shape
    if len(image_features) != len(grids):
        raise ValueError(f"{len(image_features)} image features for {len(grids)} grids")
    for features, (grid_h, grid_w) in zip(image_features, grids, strict=True):
        if features.shape[0] != grid_h * grid_w:
            raise ValueError(f"an image has {features.shape[0]} features for a {grid_h}x{grid_w} grid")
    n_placeholders = int(image_token_mask.sum())
    n_grid_tokens = sum(h * w for h, w in grids)
    if n_placeholders != n_grid_tokens:
        raise ValueError(f"{n_placeholders} image placeholders for {n_grid_tokens} image features")

    embeds = token_embeds
    if image_features:
        features = torch.cat(image_features).to(token_embeds.dtype)
        embeds = token_embeds.masked_scatter(image_token_mask[..., None], features)
    contexts = _image_context_tokens(image_features, grids, context_tokens, config, embeds)

    rows: list[_Row] = []
    image_index = 0
    for b in range(batch):
        placeholders = torch.nonzero(image_token_mask[b]).flatten()
        sizes, row_grids = [], []
        first_image = image_index
        while sum(sizes) < len(placeholders):
            row_grids.append(grids[image_index])
            sizes.append(grids[image_index][0] * grids[image_index][1])
            image_index += 1
        valid = (
            attention_mask[b].bool().cpu() if attention_mask is not None else torch.ones(n_inputs, dtype=torch.bool)
        )
        row = _Row(embeds[b], valid, rope)
        cursor = 0
        runs = _image_runs(placeholders, sizes)
        row_contexts = contexts[first_image:image_index]
        for (start, end), grid, context in zip(runs, row_grids, row_contexts, strict=True):
            row.add_text(cursor, start)
            row.add_grid(start, end, grid, config, context.shape[0])
            row.add_context(context)
            cursor = end
        row.add_text(cursor, n_inputs)
        rows.append(row)
    if image_index != len(grids):
        raise ValueError(f"{len(grids) - image_index} images left over after filling the placeholders")

    lengths = [row.length for row in rows]
    n_total = max(lengths)
    padded = attention_mask is not None or len(set(lengths)) > 1
    out_mask = torch.zeros(batch, n_total, dtype=torch.long) if padded else None
    device = token_embeds.device
    pos_shape = (batch, n_total) if rope == "1d" else (3, batch, n_total)
    position_ids = torch.zeros(pos_shape, dtype=torch.long)
    token_region = torch.full((batch, n_total), NON_GRID, dtype=torch.long)
    is_context = torch.zeros(batch, n_total, dtype=torch.bool)
    rows_embeds = []
    for b, row in enumerate(rows):
        n = row.length
        rows_embeds.append(torch.cat([*row.embeds, embeds.new_zeros(n_total - n, embeds.shape[-1])]))
        position_ids[..., b, :n] = torch.cat(row.positions, dim=-1)
        token_region[b, :n] = torch.cat(row.regions)
        is_context[b, :n] = torch.cat(row.context)
        if out_mask is not None:
            out_mask[b, :n] = 1
            if attention_mask is not None:
                out_mask[b, torch.cat(row.source)] = attention_mask[b].long().cpu()
    inputs_embeds = torch.stack(rows_embeds)
    return GazeSequence(
        inputs_embeds=inputs_embeds,
        position_ids=position_ids.to(device),
        attention_mask=None if out_mask is None else out_mask.to(device),
        token_region=token_region.to(device),
        n_regions=torch.tensor([row.n_regions for row in rows], dtype=torch.long, device=device),
        is_context=is_context.to(device),
        source_index=torch.stack([torch.cat(row.source) for row in rows]).to(device),
        next_position=torch.tensor([row.next_position for row in rows], dtype=torch.long, device=device),
        images=[row.images for row in rows],
        rope=rope,
    )


def gazing_queries(sequence: GazeSequence, gaze_start: int | torch.Tensor) -> torch.Tensor:
    """The full-sequence (teacher-forced) gaze rule: bool ``(B, N)``, True for the expanded
    positions at or after the first answer token.

    gaze_start: input-token index (int, or ``(B,)``) of the first answer token; ``>= L`` means
    the row has no answer (all dense). Every image chunk (grid and context tokens) must lie before
    it, since a gazing query selects among all regions of the sequence.
    """
    batch, n_total = sequence.token_region.shape
    n_inputs = sequence.source_index.shape[1]
    starts = torch.as_tensor(gaze_start, dtype=torch.long).expand(batch).tolist()
    first = []
    for b, start in enumerate(starts):
        expanded = int(sequence.source_index[b, start]) if start < n_inputs else n_total
        image_end = max((span.context_end for span in sequence.images[b]), default=0)
        if image_end > expanded:
            raise ValueError(f"row {b}: gaze_start {start} lies inside or before an image chunk")
        first.append(expanded)
    first = torch.tensor(first, device=sequence.token_region.device)
    return torch.arange(n_total, device=first.device)[None, :] >= first[:, None]
