"""The network being trained and its teacher-forced answer loss.

Dense training trains the plain transformers LLaVA. Gaze training trains the reference's
``GazeVLM`` around it (gaze_edge.reference, GAZE_SPEC.md "Training"): the same LLaVA plus learned
context tokens, with gaze on every query at or after ``gaze_start`` = the first answer token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gaze_edge.train.config import TrainConfig
from gaze_edge.train.data import IGNORE, Batch


def trainee(model, config: TrainConfig) -> torch.nn.Module:
    """What the optimiser trains: the LLaVA itself (dense) or a GazeVLM holding it (gaze)."""
    if config.gaze is None:
        return model
    from gaze_edge.reference import GazeVLM

    return GazeVLM(model, config.gaze, seed=config.seed + 1)


def logits(net: torch.nn.Module, batch: Batch, gaze_on: bool) -> torch.Tensor:
    """(B, T, V) logits at each input token (context tokens, if any, are not among the T)."""
    from gaze_edge.reference import GazeVLM

    if isinstance(net, GazeVLM):
        out = net(
            batch.input_ids,
            batch.pixel_values,
            attention_mask=batch.attention_mask,
            gaze_start=batch.answer_start if gaze_on else None,
        )
        return out.logits
    out = net(
        input_ids=batch.input_ids,
        pixel_values=batch.pixel_values,
        attention_mask=batch.attention_mask,
        use_cache=False,
    )
    return out.logits


def answer_loss(net: torch.nn.Module, batch: Batch, gaze_on: bool, reduction: str = "mean") -> torch.Tensor:
    """Mean (or with reduction="sum", summed) cross-entropy of the answer tokens (EOS included),
    in float32."""
    out = logits(net, batch, gaze_on)
    return F.cross_entropy(out.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE,
                           reduction=reduction)  # fmt: skip


def backward_answer_loss(net: torch.nn.Module, batch: Batch, gaze_on: bool, micro_batches: int, autocast) -> torch.Tensor:
    """Backpropagate the batch's mean answer loss in ``micro_batches`` length-sorted parts (the
    same loss and gradient as one forward, up to rounding, with less padding); returns the loss."""
    if micro_batches <= 1:
        with autocast:
            loss = answer_loss(net, batch, gaze_on)
        loss.backward()
        return loss.detach()
    n_tokens = int((batch.labels != IGNORE).sum())
    total = torch.zeros((), device=batch.labels.device)
    for part in batch.split(micro_batches):
        with autocast:
            loss = answer_loss(net, part, gaze_on, reduction="sum") / n_tokens
        loss.backward()
        total += loss.detach()
    return total
