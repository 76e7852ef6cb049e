"""GazeScenes turns as model inputs: token ids, pixel values, answer labels.

The batch of training step ``s`` depends only on (seed, step, batch_size) (and the share of
conversations), so a resumed run sees exactly the data an uninterrupted one would.

A multi-turn sample supervises one answer, the last: everything before it (earlier turns, their
true answers, every image) is prompt, so it is dense, and gaze starts at the last answer's first
token, exactly what decoding that answer in a conversation does (GAZE_SPEC.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from gaze_edge.scenes import Example, Scene, make_example, render, sample_scene
from gaze_edge.scenes.conversation import Conversation, sample_conversation
from gaze_edge.scenes.splits import SPLIT_SIZE, SPLITS
from gaze_edge.train.model import IMAGE_MEAN, IMAGE_STD
from gaze_edge.train.tokenizer import IMAGE, answer_text, conversation_text, prompt_text, video_prompt_text

IGNORE = -100


@dataclass
class Batch:
    """input_ids, labels: (B, T) (labels = next token to predict at each input, IGNORE off-answer);
    attention_mask: (B, T); pixel_values: (n_images, 3, H, W), every row's images in row order;
    answer_start: (B,) index of the first answer token in input_ids (the spec's gaze_start);
    n_images: (B,) images in each row (1 for a single-turn sample)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    answer_start: torch.Tensor
    n_images: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in self.__dict__.values()))

    def split(self, n: int) -> list[Batch]:
        """The rows in ``n`` groups of similar length (shortest first), each cut to its own
        longest row: the same samples with less padding to compute (micro-batches)."""
        lengths = self.attention_mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        first_image = torch.cumsum(self.n_images, 0) - self.n_images
        parts = []
        for rows in torch.tensor_split(order, n):
            if len(rows) == 0:
                continue
            T = int(lengths[rows].max())
            images = torch.cat([torch.arange(int(first_image[r]), int(first_image[r] + self.n_images[r]))
                                for r in rows.tolist()])  # fmt: skip
            parts.append(Batch(self.input_ids[rows, :T], self.labels[rows, :T], self.attention_mask[rows, :T],
                               self.pixel_values[images], self.answer_start[rows], self.n_images[rows]))  # fmt: skip
        return parts


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

    def text_ids(self, text: str) -> list[int]:
        """Token ids of a rendered text, every image placeholder expanded to n_visual_tokens."""
        out: list[int] = []
        for i in self.tokenizer(text, add_special_tokens=False).input_ids:
            out += [i] * self.n_visual_tokens if i == self.image_id else [i]
        return out

    def conversation_prompt_ids(self, conversation: Conversation, n_turns: int, answers=None) -> list[int]:
        """The first n_turns turns up to the last one's "ASSISTANT:", with the earlier answers
        (default: the true ones; pass a model's own to continue its conversation)."""
        turns = conversation.turns[:n_turns]
        earlier = [t.answer for t in turns[:-1]] if answers is None else list(answers)[: n_turns - 1]
        return self.text_ids(conversation_text(turns, earlier))


def collate(encoder: Encoder, examples: list[Example], images) -> Batch:
    """Right-padded batch; the loss covers the answer tokens (EOS included)."""
    seqs, starts = [], []
    for ex in examples:
        p = encoder.prompt_ids(ex.prompt)
        seqs.append(p + encoder.answer_ids(ex.answer))
        starts.append(len(p))
    return collate_ids(encoder, seqs, starts, images)


def collate_ids(
    encoder: Encoder, seqs: list[list[int]], starts: list[int], images, first_tokens: list[list[int]] | None = None
) -> Batch:
    """Right-padded batch of token sequences whose answer starts at ``starts[b]``; ``images`` are
    every row's images in order (row 0's first), as the reference fills the placeholders.
    first_tokens: per row, positions of further tokens to predict (earlier answers' first tokens)."""
    n_images = torch.tensor([seq.count(encoder.image_id) // encoder.n_visual_tokens for seq in seqs])
    if int(n_images.sum()) != len(images):
        raise ValueError(f"{len(images)} images for {int(n_images.sum())} image placeholders")
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
        for p in (first_tokens or [[]] * len(seqs))[b]:
            labels[b, p - 1] = seq[p]
    return Batch(ids, labels, mask, pixel_values(images), torch.tensor(starts), n_images)


def train_batch(encoder: Encoder, step: int, batch_size: int, seed: int, question_fraction: float) -> Batch:
    """The training batch of ``step`` (fresh train-split scenes every step)."""
    first = (seed * 100_000_000 + step * batch_size) % SPLIT_SIZE
    rng = random.Random(f"gazescenes-train-{seed}-{step}")
    scenes = [sample_scene(SPLITS["train"] + (first + i) % SPLIT_SIZE) for i in range(batch_size)]
    examples = [make_example(s, rng, question_fraction) for s in scenes]
    return collate(encoder, examples, [render(s) for s in scenes])


def conversation_sample(encoder: Encoder, conversation: Conversation) -> tuple[list[int], int]:
    """(token ids, answer start) of a conversation whose last answer is supervised."""
    prompt = encoder.conversation_prompt_ids(conversation, len(conversation.turns))
    return prompt + encoder.answer_ids(conversation.turns[-1].answer), len(prompt)


def earlier_answer_starts(encoder: Encoder, conversation: Conversation, ids: list[int]) -> list[int]:
    """Positions in ``ids`` (``conversation_sample``'s) of the first token of every earlier answer.

    Supervising these is exact: at inference an answer's first token is predicted from the dense
    prompt (GAZE_SPEC.md), and in the training forward everything before the last answer is dense.
    Their later tokens are not: they were generated with gaze but sit in the prompt here (dense).
    """
    starts = []
    for t in range(1, len(conversation.turns)):
        prefix = encoder.conversation_prompt_ids(conversation, t)
        if ids[: len(prefix)] != prefix:
            raise ValueError("a conversation prefix does not tokenize as a prefix of the whole")
        starts.append(len(prefix))
    return starts


def chat_batch(
    encoder: Encoder,
    step: int,
    batch_size: int,
    seed: int,
    question_fraction: float,
    chat_fraction: float,
    earlier_first_tokens: bool = False,
) -> Batch:
    """The training batch of ``step`` with about ``chat_fraction`` multi-turn conversations (the
    rest single-turn, as ``train_batch``). Row i's first scene is the step's fresh train scene i;
    a second image comes from another part of the train split (scene index + 5 x 10^8).
    earlier_first_tokens: also supervise the first token of each earlier answer (exact, see
    ``earlier_answer_starts``)."""
    first = (seed * 100_000_000 + step * batch_size) % SPLIT_SIZE
    rng = random.Random(f"gazescenes-chat-{seed}-{step}")
    rows = [_chat_row(encoder, first + i, rng, question_fraction, chat_fraction, earlier_first_tokens)
            for i in range(batch_size)]  # fmt: skip
    return _collate_rows(encoder, rows)


Row = tuple[list[int], int, tuple, list[int]]  # token ids, answer start, scenes shown, earlier first tokens


def _chat_row(encoder: Encoder, index: int, rng: random.Random, question_fraction: float, chat_fraction: float,
              earlier_first_tokens: bool) -> Row:  # fmt: skip
    """Train scene ``index``'s row of a chat batch: a conversation (probability ``chat_fraction``;
    its second image from train scene index + 5 x 10^8) or a single turn."""
    scene = sample_scene(SPLITS["train"] + index % SPLIT_SIZE)
    if rng.random() < chat_fraction:
        other = sample_scene(SPLITS["train"] + (index + SPLIT_SIZE // 2) % SPLIT_SIZE)
        conversation = sample_conversation(scene, other, rng, question_fraction)
        ids, start = conversation_sample(encoder, conversation)
        firsts = earlier_answer_starts(encoder, conversation, ids) if earlier_first_tokens else []
        return ids, start, conversation.scenes, firsts
    ex = make_example(scene, rng, question_fraction)
    prompt = encoder.prompt_ids(ex.prompt)
    return prompt + encoder.answer_ids(ex.answer), len(prompt), (scene,), []


def _collate_rows(encoder: Encoder, rows: list[Row]) -> Batch:
    images = [render(s) for _, _, scenes, _ in rows for s in scenes]
    return collate_ids(encoder, [r[0] for r in rows], [r[1] for r in rows], images, [r[3] for r in rows])


def clip_sample(encoder: Encoder, clip, example: Example) -> tuple[list[int], int]:
    """(token ids, answer start) of a question about a clip, its frames laid out as a video."""
    prompt = encoder.text_ids(video_prompt_text(example.prompt, len(clip.frames)))
    return prompt + encoder.answer_ids(example.answer), len(prompt)


def video_batch(encoder: Encoder, step: int, batch_size: int, seed: int, question_fraction: float,
                chat_fraction: float, video_fraction: float, n_frames: int,
                earlier_first_tokens: bool = False) -> Batch:  # fmt: skip
    """The training batch of ``step`` with about ``video_fraction`` clip questions
    (gaze_edge.scenes.clips: a fresh train clip per row, kinds uniform); the other rows are
    ``chat_batch``'s (conversations with probability ``chat_fraction``, else single-turn)."""
    from gaze_edge.scenes.clips import clip_question, sample_clip

    first = (seed * 100_000_000 + step * batch_size) % SPLIT_SIZE
    rng = random.Random(f"gazescenes-video-{seed}-{step}")
    rows = []
    for i in range(batch_size):
        if rng.random() < video_fraction:
            clip = sample_clip(SPLITS["train"] + (first + i) % SPLIT_SIZE, n_frames)
            rows.append((*clip_sample(encoder, clip, clip_question(clip, rng)), clip.frames, []))
        else:
            rows.append(_chat_row(encoder, first + i, rng, question_fraction, chat_fraction, earlier_first_tokens))
    return _collate_rows(encoder, rows)


def step_batch(encoder: Encoder, config, step: int) -> Batch:
    """The batch of a training step under a TrainConfig (single-turn only when chat_fraction =
    video_fraction = 0, exactly the batches the shipped single-turn recipe was trained on)."""
    if config.video_fraction > 0:
        return video_batch(encoder, step, config.batch_size, config.seed, config.question_fraction,
                           config.chat_fraction, config.video_fraction, config.video_frames,
                           config.earlier_first_tokens)  # fmt: skip
    if config.chat_fraction > 0:
        return chat_batch(encoder, step, config.batch_size, config.seed, config.question_fraction,
                          config.chat_fraction, config.earlier_first_tokens)  # fmt: skip
    return train_batch(encoder, step, config.batch_size, config.seed, config.question_fraction)


def prompt_batch(encoder: Encoder, scenes: list[Scene], prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, T), pixel_values) for the same prompt about each scene (no padding needed)."""
    ids = torch.tensor([encoder.prompt_ids(prompt)] * len(scenes))
    return ids, pixel_values([render(s) for s in scenes])
