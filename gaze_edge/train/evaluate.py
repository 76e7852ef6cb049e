"""Scoring a model on GazeScenes: batched greedy captions, dense or with gaze, -> object accuracy.

Decoding follows GAZE_SPEC.md: the prompt (image, context tokens, text) is evaluated densely into
a KV cache and chooses the first token; every generated token is then evaluated with gaze (when
gaze is on). The gaze attention is the reference's (gaze_edge.reference, hooked into the
transformers model); this module only drives it for a batch of same-length prompts at once,
which is what makes 500-scene evaluations affordable. tests/test_train.py checks it against the
reference's own one-sequence ``GazeVLM.generate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from gaze_edge.config import GazeConfig
from gaze_edge.scenes import CAPTION_PROMPT, CaptionScore, Scene, score_captions, split_scenes
from gaze_edge.train.data import Encoder, prompt_batch

DEFAULT_REGION = (2, 2)


def inference_vlm(net: torch.nn.Module, gaze: GazeConfig | None):
    """A GazeVLM that decodes ``net`` the way asked.

    net: a GazeVLM (gaze-trained: its own regions and context tokens) or a plain LLaVA
      (dense-trained: wrapped with no context tokens and 2x2 regions, i.e. training-free gaze).
    gaze: None = dense decoding (gaze off, context tokens kept); else its top_k / keep_ratio /
      score_mode override the model's (region size and context tokens are the model's own).
    """
    from gaze_edge.reference import GazeVLM

    if isinstance(net, GazeVLM):
        vlm = net
        base = net.gaze_config
    else:
        base = GazeConfig(region_h=DEFAULT_REGION[0], region_w=DEFAULT_REGION[1], n_context_tokens=0)
        vlm = GazeVLM(net, base)
        vlm.to(next(net.parameters()).device)
    if gaze is not None:
        vlm.gaze_config = base.replace(top_k=gaze.top_k, keep_ratio=gaze.keep_ratio, score_mode=gaze.score_mode)
    vlm.enabled = gaze is not None
    return vlm, base


@torch.no_grad()
def greedy_decode(vlm, input_ids: torch.Tensor, pixel_values: torch.Tensor, max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy tokens for a batch of prompts of equal length (no padding), with a KV cache.

    input_ids: (B, L) with one image placeholder per grid token; pixel_values: (B, 3, H, W).
    Returns per row the generated ids up to and including EOS (or max_new_tokens of them).
    """
    from transformers import DynamicCache

    from gaze_edge.reference import GazeState

    text_model = vlm.text_model
    sequence = vlm.build_sequence(input_ids, pixel_values)
    batch = input_ids.shape[0]
    cache = DynamicCache(config=text_model.config)
    hidden = text_model(
        inputs_embeds=sequence.inputs_embeds,
        position_ids=sequence.position_ids,
        cache=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]
    state = GazeState(
        vlm.gaze_config,
        sequence.token_region,
        sequence.n_regions,
        torch.ones(batch, 1, dtype=torch.bool, device=input_ids.device),
    )
    gaze = vlm.enabled and state.applies()
    position = sequence.next_position.clone()
    tokens = torch.empty(batch, 0, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    embed = vlm.model.get_input_embeddings()
    for _ in range(max_new_tokens):
        token = vlm.model.lm_head(hidden).argmax(-1)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        done |= token == eos_id
        if bool(done.all()) or tokens.shape[1] == max_new_tokens:
            break
        hidden = text_model(
            inputs_embeds=embed(token[:, None]),
            position_ids=position[:, None],
            cache=cache,
            use_cache=True,
            gaze=state if gaze else None,
        ).last_hidden_state[:, -1]
        position += 1
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return out


def generate_answers(
    net: torch.nn.Module,
    tokenizer,
    scenes: Sequence[Scene],
    prompt: str = CAPTION_PROMPT,
    gaze: GazeConfig | None = None,
    batch_size: int = 50,
    max_new_tokens: int = 64,
) -> list[str]:
    """The model's greedy answer to ``prompt`` about each scene (special tokens removed)."""
    texts = []
    with decoding_vlm(net, gaze) as vlm:
        device = vlm.context_tokens.device
        encoder = Encoder(tokenizer, vlm.model.config.image_seq_length)
        for i in range(0, len(scenes), batch_size):
            ids, pixels = prompt_batch(encoder, list(scenes[i : i + batch_size]), prompt)
            rows = greedy_decode(vlm, ids.to(device), pixels.to(device), max_new_tokens, tokenizer.eos_token_id)
            texts += [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
    return texts


@contextlib.contextmanager
def decoding_vlm(net: torch.nn.Module, gaze: GazeConfig | None):
    """``net`` as a GazeVLM in eval mode decoding with ``gaze`` (``inference_vlm``); a GazeVLM
    passed in gets its own gaze settings and training mode back afterwards."""
    saved = (getattr(net, "gaze_config", None), getattr(net, "enabled", None), net.training)
    vlm, _ = inference_vlm(net, gaze)
    vlm.eval()
    try:
        yield vlm
    finally:
        if vlm is net:
            net.gaze_config, net.enabled = saved[0], saved[1]
        net.train(saved[2])


def evaluate_net(
    net: torch.nn.Module,
    tokenizer,
    *,
    split: str = "test",
    n_scenes: int = 500,
    gaze: GazeConfig | None = None,
    batch_size: int = 50,
) -> CaptionScore:
    """Object accuracy of ``net``'s captions of the first ``n_scenes`` scenes of ``split``."""
    scenes = split_scenes(split, n_scenes)
    texts = generate_answers(net, tokenizer, scenes, gaze=gaze, batch_size=batch_size)
    return score_captions(texts, scenes)


def evaluate(
    path_or_net,
    *,
    keep_ratio: float | None = None,
    top_k: int = 0,
    score_mode: str | None = None,
    split: str = "test",
    n_scenes: int = 500,
    tokenizer=None,
    device: str | None = None,
    batch_size: int = 50,
) -> CaptionScore:
    """Object accuracy of a trained model on GazeScenes.

    path_or_net: a run folder, a model folder, or a loaded net (then pass its tokenizer).
    keep_ratio / top_k: gaze at decode with that k rule (region size and context tokens are the
      model's; a dense-trained model gets 2x2 regions and no context tokens); both None / 0 means
      dense decoding.
    score_mode: the gaze score mode; None keeps the model's own (a gaze checkpoint's, else
      gqa_mean).
    """
    from gaze_edge.train.load import load_trained
    from gaze_edge.train.loop import pick_device

    dev = pick_device(device)
    if isinstance(path_or_net, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("pass the tokenizer with a loaded net")
        net = path_or_net.to(dev)
    else:
        net, tokenizer = load_trained(path_or_net, dev)
    gaze = decode_gaze(net, keep_ratio, top_k, score_mode)
    return evaluate_net(net, tokenizer, split=split, n_scenes=n_scenes, gaze=gaze, batch_size=batch_size)


def decode_gaze(net, keep_ratio: float | None, top_k: int = 0, score_mode: str | None = None) -> GazeConfig | None:
    """The ``gaze`` argument of the decoders for a keep ratio / top_k (None for dense decoding:
    both None / 0): the k rule asked for, with ``score_mode`` or else the model's own (a gaze
    checkpoint's, else gqa_mean), which a bare ``GazeConfig(keep_ratio=r)`` would replace by
    gqa_mean."""
    if keep_ratio is None and not top_k:
        return None
    own = getattr(net, "gaze_config", None)
    mode = score_mode or (own.score_mode if own is not None else GazeConfig.score_mode)
    return GazeConfig(top_k=top_k, keep_ratio=keep_ratio if keep_ratio is not None else 1.0, score_mode=mode)


def visual_kv_fraction(net, keep_ratio: float | None, n_images: int = 1) -> float:
    """Fraction of the grid's KV entries a gaze step reads (GAZE_SPEC.md "Accounting"), for
    ``n_images`` default 196-token grids under one budget (a clip's frames): selected regions'
    tokens / grid tokens (1.0 for dense), averaged over the text layers: the first
    ``n_dense_layers`` of a gaze checkpoint read the whole grid."""
    from gaze_edge.reference import GazeVLM, region_token_counts

    if keep_ratio is None:
        return 1.0
    region = net.gaze_config if isinstance(net, GazeVLM) else GazeConfig(*DEFAULT_REGION)
    side = int(round(net_image_tokens(net) ** 0.5))
    counts = region_token_counts(side, side, region.region_h, region.region_w).repeat(n_images)
    k = GazeConfig(region.region_h, region.region_w, keep_ratio=keep_ratio).n_selected(len(counts))
    # a selection holds k regions; edge regions may be smaller, so this is an upper bound per step
    gazed = float(counts.sort(descending=True).values[:k].sum()) / float(counts.sum())
    n_layers = int(getattr(net, "model", net).config.text_config.num_hidden_layers)
    dense = min(region.n_dense_layers, n_layers) if isinstance(net, GazeVLM) else 0
    return (dense + (n_layers - dense) * gazed) / n_layers


def net_image_tokens(net) -> int:
    model = getattr(net, "model", net)
    return int(model.config.image_seq_length)


def evaluate_questions(
    net: torch.nn.Module,
    tokenizer,
    *,
    split: str = "test",
    n_scenes: int = 500,
    gaze: GazeConfig | None = None,
    seed: int = 0,
    batch_size: int = 50,
) -> dict[str, float]:
    """Exact-match accuracy of short answers: one seeded question per scene (GazeScenes' question
    kinds), per kind and overall. Scenes asking the same question are decoded together."""
    import random

    from gaze_edge.scenes import score_answers
    from gaze_edge.scenes.text import question

    rng = random.Random(f"questions-{split}-{seed}")
    scenes = split_scenes(split, n_scenes)
    examples = [question(scene, rng) for scene in scenes]
    by_prompt: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_prompt.setdefault(ex.prompt, []).append(i)
    answers = [""] * len(scenes)
    for prompt, rows in by_prompt.items():
        texts = generate_answers(net, tokenizer, [scenes[i] for i in rows], prompt=prompt, gaze=gaze,
                                 batch_size=batch_size, max_new_tokens=8)  # fmt: skip
        for i, text in zip(rows, texts, strict=True):
            answers[i] = text
    result = {"all": score_answers(answers, [ex.answer for ex in examples])}
    for kind in sorted({ex.kind for ex in examples}):
        idx = [i for i, ex in enumerate(examples) if ex.kind == kind]
        result[kind] = score_answers([answers[i] for i in idx], [examples[i].answer for i in idx])
    return result
