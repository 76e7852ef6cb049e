"""``GazeVLM``: a transformers VLM with gaze, for training (teacher forcing) and decoding.

    vlm = GazeVLM(model, GazeConfig(region_h=2, region_w=2, n_context_tokens=4, top_k=8))
    out = vlm(input_ids, pixel_values, gaze_start=answer_start)     # out.logits (B, L, V)
    first = vlm.prefill(prompt_ids, pixel_values)                   # dense prompt
    nxt = vlm.step(token_id)                                        # gaze; nxt.trace.selected

``input_ids`` are what the model's processor makes (one image placeholder per grid token); the
context tokens are inserted inside, so ``logits`` are returned at the input tokens' positions
(``(B, L, V)``, aligned with ``input_ids``) and ``gaze_start`` counts input tokens.
``vlm.model`` stays a normal transformers model: only its text model's attention implementation
is routed through the gaze hook (``attention.install_gaze_attention``), which is transparent
whenever no gaze state is passed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from gaze_edge.config import GazeConfig, visual_kv_fraction
from gaze_edge.reference.attention import GazeState, LayerSelection, install_gaze_attention, text_model_of
from gaze_edge.reference.families import ImageFeatures, family_of
from gaze_edge.reference.selection import selected_region_ids
from gaze_edge.reference.sequence import GazeSequence, build_sequence, gazing_queries


@dataclass
class GazeTrace:
    """The regions one gaze step selected, per gazing layer.

    selected: LongTensor ``(n_layers - n_dense_layers, S, k)`` region ids ascending; row ``i`` is
      text layer ``n_dense_layers + i`` (the dense first layers select nothing and have no row).
      ``S`` = KV heads for gqa_mean, gqa_max and layer_mean (the layer's one selection repeated
      for every KV head), query heads for per_head. Region ids number all image chunks together
      (image order, then raster order).
    scores: ``(n_layers - n_dense_layers, S_scored, R)`` f32 (f64 for an f64 model),
      ``S_scored`` = KV heads, query heads, or 1 (layer_mean).
    k: regions selected per head; n_regions: regions in the sequence.
    region_sizes: ``(R,)`` grid tokens per region (edge regions may be smaller), or None.
    n_kv_heads: KV heads (groups per_head's query-head rows for the accounting).
    n_dense_layers: the layers that attended densely at this step (the config's
      ``n_dense_layers``, at most the layer count), so ``n_layers = n_dense_layers +
      selected.shape[0]``.
    """

    selected: torch.Tensor
    scores: torch.Tensor
    k: int
    n_regions: int
    region_sizes: torch.Tensor | None = None
    n_kv_heads: int | None = None
    n_dense_layers: int = 0

    def visual_kv_fraction(self) -> float:
        """GAZE_SPEC.md "Accounting": grid tokens read, summed over layers and KV heads, / (grid
        tokens x layers x KV heads); a KV head reads the union of its query heads' regions, a
        dense layer reads every grid token."""
        if self.region_sizes is None:
            raise ValueError("this trace carries no region sizes")
        selected, sizes = self.selected.cpu().numpy(), self.region_sizes.cpu().numpy()
        return visual_kv_fraction(selected, sizes, self.n_kv_heads, self.n_dense_layers)

    def margins(self) -> torch.Tensor:
        """``(n_layers, S_scored)``: the k-th highest score minus the (k+1)-th (inf when every
        region is selected). Parity tests compare selections only where this is clearly > 0."""
        top = torch.topk(self.scores, min(self.k + 1, self.scores.shape[-1]), dim=-1).values
        if self.k >= self.scores.shape[-1]:
            return torch.full(top.shape[:-1], float("inf"))
        return top[..., self.k - 1] - top[..., self.k]


@dataclass
class GazeOutput:
    """logits: ``(B, L, V)`` at the input tokens; sequence: the built sequence; selections: per
    layer ``LayerSelection`` (query positions index the expanded sequence) when asked for, else
    None. ``trace_from_selections(out.selections, n_kv_heads, query)`` gives one query's trace."""

    logits: torch.Tensor
    sequence: GazeSequence
    selections: dict[int, LayerSelection] | None = None


@dataclass
class StepOutput:
    """logits: ``(V,)`` predicting the next token; trace: the step's selections (None when dense)."""

    logits: torch.Tensor
    trace: GazeTrace | None


@dataclass
class _Session:
    cache: DynamicCache
    state: GazeState
    next_position: int


def trace_from_selections(
    selections: dict[int, LayerSelection],
    n_kv_heads: int,
    query: int = 0,
    region_sizes: torch.Tensor | None = None,
) -> GazeTrace:
    """A GazeTrace for one query position (row 0) from per-layer selections (a decode step has
    one query, position 0). The selections are those of the gazing layers, ``n_dense_layers ..
    n_layers - 1`` (the trace's ``n_dense_layers`` is the first of them)."""
    layers = sorted(selections)
    if not layers:
        raise ValueError("no layer gazed: no selections to trace")
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise ValueError(f"the gazing layers {layers} are not the last layers in a row")
    ids, scores = [], []
    for layer in layers:
        layer_scores, sel = selections[layer].at(query)  # (S, R) each
        if sel.shape[0] == 1:
            sel = sel.expand(n_kv_heads, -1)
        ids.append(selected_region_ids(sel))
        scores.append(layer_scores)
    selected = torch.stack(ids)
    return GazeTrace(selected, torch.stack(scores), selected.shape[-1], scores[0].shape[-1], region_sizes,
                     n_kv_heads, layers[0])


class GazeVLM(nn.Module):
    """A supported transformers VLM plus gaze settings and learned context tokens.

    model: ``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration`` or
      ``Qwen2_5_VLForConditionalGeneration`` (text attention "eager" or "sdpa"; gaze is hooked in,
      nothing is copied).
    gaze_config: region size, ``n_context_tokens``, context-token mode, k rule, score mode, dense
      first layers.
    context_tokens: ``(n_context_tokens, hidden)``; None draws them from N(0, s^2), ``s`` = the std
      of the input embedding matrix, with ``torch.Generator().manual_seed(seed)``. Pooled context
      tokens (``gaze_config.context_tokens == "pooled"``) have no learned tensor: None (or 0 rows),
      and ``self.context_tokens`` is an empty ``(0, hidden)`` parameter.
    enabled: False makes every forward dense (context tokens still inserted): "gaze off".
    """

    def __init__(
        self,
        model: nn.Module,
        gaze_config: GazeConfig,
        context_tokens: torch.Tensor | None = None,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.family = family_of(model)
        self.gaze_config = gaze_config
        self.enabled = True
        hidden = self.text_model.config.hidden_size
        n_learned = 0 if gaze_config.pooled else gaze_config.n_context_tokens
        if context_tokens is None:
            embedding = self.model.get_input_embeddings().weight
            generator = torch.Generator().manual_seed(seed)
            std = float(embedding.detach().float().std())
            context_tokens = torch.randn(n_learned, hidden, generator=generator) * std
        if tuple(context_tokens.shape) != (n_learned, hidden):
            what = "pooled context tokens take no learned tensor: " if gaze_config.pooled else ""
            raise ValueError(
                f"{what}context_tokens {tuple(context_tokens.shape)} != (learned context tokens, hidden) = "
                f"({n_learned}, {hidden})"
            )
        self.context_tokens = nn.Parameter(context_tokens.detach().clone())
        install_gaze_attention(model)
        self._session: _Session | None = None

    @property
    def text_model(self) -> nn.Module:
        return text_model_of(self.model)

    @property
    def n_kv_heads(self) -> int:
        return self.text_model.config.num_key_value_heads

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> ImageFeatures:
        """Run the model's own vision tower and projector: per-image features and grids."""
        return self.family.encode_images(self.model, pixel_values, image_grid_thw=image_grid_thw)

    def build_sequence(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
    ) -> GazeSequence:
        """The text model's input (embeddings, positions, regions) with context tokens inserted.

        input_ids: ``(B, L)`` with the model's image placeholder token once per grid token.
        image_features: images already embedded (e.g. another runtime's projector output), used
          instead of running the vision tower on pixel_values.
        """
        token_embeds = self.model.get_input_embeddings()(input_ids)
        if image_features is not None:
            images = image_features
        elif pixel_values is not None:
            images = self.image_features(pixel_values, image_grid_thw)
        else:
            images = ImageFeatures([], [])
        return build_sequence(
            token_embeds,
            input_ids == self.model.config.image_token_id,
            images.features,
            images.grids,
            self.context_tokens,
            self.gaze_config,
            rope=self.family.rope,
            attention_mask=attention_mask,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        gaze_start: int | torch.Tensor | None = None,
        return_selections: bool = False,
        image_features: ImageFeatures | None = None,
    ) -> GazeOutput:
        """Full-sequence (teacher-forced) forward.

        Queries at input index ``>= gaze_start`` (int or ``(B,)``; the first answer token) gaze,
        each with its own selection; earlier ones are dense. ``gaze_start=None`` or
        ``enabled=False``: dense everywhere. Every image chunk must come before gaze_start.
        Returns logits ``(B, L, V)`` at the input tokens.
        """
        sequence = self.build_sequence(
            input_ids,
            pixel_values,
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
            image_features=image_features,
        )
        state = None
        if self.enabled and gaze_start is not None:
            state = GazeState(
                self.gaze_config,
                sequence.token_region,
                sequence.n_regions,
                gazing_queries(sequence, gaze_start),
                trace={} if return_selections else None,
            )
        hidden = self.text_model(
            inputs_embeds=sequence.inputs_embeds,
            position_ids=sequence.position_ids,
            attention_mask=sequence.attention_mask,
            use_cache=False,
            gaze=state,
        ).last_hidden_state
        index = sequence.source_index[..., None].expand(-1, -1, hidden.shape[-1])
        logits = self.model.lm_head(torch.gather(hidden, 1, index))
        return GazeOutput(logits, sequence, state.trace if state is not None else None)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        image_grid_thw: torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
    ) -> StepOutput:
        """Start decoding: evaluate the prompt (one row) densely into a fresh KV cache.

        Returns the logits of the last prompt token (they choose the first generated token).
        """
        if input_ids.shape[0] != 1:
            raise ValueError("prefill takes one sequence (batch size 1)")
        sequence = self.build_sequence(
            input_ids, pixel_values, image_grid_thw=image_grid_thw, image_features=image_features
        )
        cache = DynamicCache(config=self.text_model.config)
        hidden = self.text_model(
            inputs_embeds=sequence.inputs_embeds,
            position_ids=sequence.position_ids,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        state = GazeState(
            self.gaze_config,
            sequence.token_region,
            sequence.n_regions,
            torch.ones(1, 1, dtype=torch.bool, device=input_ids.device),
        )
        self._session = _Session(cache, state, int(sequence.next_position[0]))
        return StepOutput(self.model.lm_head(hidden[0, -1]), None)

    @torch.no_grad()
    def step(self, token_id: int, *, generated: bool = True) -> StepOutput:
        """Append one token to the cache and return the logits predicting the next one.

        generated=True (a token the model generated) applies gaze when enabled and the sequence
        holds regions; generated=False evaluates a prompt token densely.
        """
        session = self._session
        if session is None:
            raise RuntimeError("call prefill() before step()")
        device = self.context_tokens.device
        embeds = self.model.get_input_embeddings()(torch.tensor([[token_id]], device=device))
        position = torch.tensor([[session.next_position]], device=device)
        if self.family.rope == "mrope":
            position = position[None].expand(3, 1, 1)
        state = session.state
        gaze = generated and self.enabled and state.applies()
        if gaze:
            state.config = self.gaze_config  # a runtime override of k / score mode applies here
            state.trace = {}
        hidden = self.text_model(
            inputs_embeds=embeds,
            position_ids=position,
            cache=session.cache,
            use_cache=True,
            gaze=state if gaze else None,
        ).last_hidden_state
        session.next_position += 1
        trace = None
        if gaze:
            region = state.token_region[0].cpu()
            sizes = torch.bincount(region[region >= 0], minlength=state.max_regions)
            if state.trace:
                trace = trace_from_selections(state.trace, self.n_kv_heads, region_sizes=sizes)
            else:  # n_dense_layers >= the layer count: every layer was dense
                trace = self._all_dense_trace(state, sizes)
        return StepOutput(self.model.lm_head(hidden[0, -1]), trace)

    def _all_dense_trace(self, state: GazeState, region_sizes: torch.Tensor) -> GazeTrace:
        """The trace of a gaze step in which no layer gazed: no rows, every layer dense."""
        config = self.text_model.config
        n_heads, mode = config.num_attention_heads, state.config.score_mode
        n_sel = n_heads if mode == "per_head" else self.n_kv_heads
        n_scored = {"per_head": n_heads, "layer_mean": 1}.get(mode, self.n_kv_heads)
        k = int(state.k[0])
        selected = torch.empty(0, n_sel, k, dtype=torch.long)
        scores = torch.empty(0, n_scored, state.max_regions)
        return GazeTrace(selected, scores, k, state.max_regions, region_sizes, self.n_kv_heads,
                         config.num_hidden_layers)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        image_grid_thw: torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
    ) -> tuple[list[int], list[GazeTrace | None]]:
        """Greedy decoding of one prompt: the generated token ids and each step's trace
        (None for the first token, which the dense prompt chooses)."""
        out = self.prefill(input_ids, pixel_values, image_grid_thw=image_grid_thw, image_features=image_features)
        tokens, traces = [], []
        trace = None
        for _ in range(max_new_tokens):
            token = int(out.logits.argmax())
            tokens.append(token)
            traces.append(trace)
            if token == eos_token_id or len(tokens) == max_new_tokens:
                break
            out = self.step(token)
            trace = out.trace
        return tokens, traces
