"""GazeScenes turns as model inputs: token ids, pixel values, answer labels.

The batch of training step ``s`` depends only on (seed, step, batch_size), so a resumed run sees
exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from gaze_edge.scenes import Example, Scene, make_example, render, sample_scene
from gaze_edge.scenes.splits import SPLIT_SIZE, SPLITS
from gaze_edge.train.model import IMAGE_MEAN, IMAGE_STD
from gaze_edge.train.tokenizer import IMAGE, answer_text, prompt_text

IGNORE = -100


@dataclass
class Batch:
    """input_ids, labels: (B, T) (labels = next token to predict at each input, IGNORE off-answer);
    attention_mask: (B, T); pixel_values: (B, 3, H, W);
    answer_start: (B,) index of the first answer token in input_ids (the spec's gaze_start)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    answer_start: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in self.__dict__.values()))


def pixel_values(images) -> torch.Tensor:
    """(B, 3, H, W) float32: the processor's CLIP normalisation for images already at model size."""
    u8 = np.stack([np.asarray(im.convert("RGB")) for im in images]).transpose(0, 3, 1, 2)
    x = u8.astype(np.float32, order="C") / np.float32(255.0)
    x -= np.asarray(IMAGE_MEAN, np.float32).reshape(1, 3, 1, 1)
    x /= np.asarray(IMAGE_STD, np.float32).reshape(1, 3, 1, 1)
    return torch.from_numpy(x)


class Encoder:
    """Token ids of prompts (image placeholder expanded) and answers, with a cache for prompts."""

    def __init__(self, tokenizer, n_visual_tokens: int):
        self.tokenizer = tokenizer
        self.n_visual_tokens = n_visual_tokens
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self._prompts: dict[str, list[int]] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt up to "ASSISTANT:", with n_visual_tokens image tokens (as the processor does)."""
        if prompt not in self._prompts:
            ids = self.tokenizer(prompt_text(prompt), add_special_tokens=False).input_ids
            i = ids.index(self.image_id)
            self._prompts[prompt] = ids[:i] + [self.image_id] * self.n_visual_tokens + ids[i + 1 :]
        return self._prompts[prompt]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer_text(answer), add_special_tokens=False).input_ids


def collate(encoder: Encoder, examples: list[Example], images) -> Batch:
    """Right-padded batch; the loss covers the answer tokens (EOS included)."""
    seqs, starts = [], []
    for ex in examples:
        p = encoder.prompt_ids(ex.prompt)
        seqs.append(p + encoder.answer_ids(ex.answer))
        starts.append(len(p))
    T = max(map(len, seqs))
    pad = encoder.tokenizer.pad_token_id
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        n = len(seq)
        ids[b, :n] = torch.tensor(seq)
        mask[b, :n] = 1
        # input t predicts token t+1: the last prompt token predicts the first answer token
        labels[b, start - 1 : n - 1] = torch.tensor(seq[start:])
    return Batch(ids, labels, mask, pixel_values(images), torch.tensor(starts))


def train_batch(encoder: Encoder, step: int, batch_size: int, seed: int, question_fraction: float) -> Batch:
    """The training batch of ``step`` (fresh train-split scenes every step)."""
    first = (seed * 100_000_000 + step * batch_size) % SPLIT_SIZE
    rng = random.Random(f"gazescenes-train-{seed}-{step}")
    scenes = [sample_scene(SPLITS["train"] + (first + i) % SPLIT_SIZE) for i in range(batch_size)]
    examples = [make_example(s, rng, question_fraction) for s in scenes]
    return collate(encoder, examples, [render(s) for s in scenes])


def prompt_batch(encoder: Encoder, scenes: list[Scene], prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, T), pixel_values) for the same prompt about each scene (no padding needed)."""
    ids = torch.tensor([encoder.prompt_ids(prompt)] * len(scenes))
    return ids, pixel_values([render(s) for s in scenes])
