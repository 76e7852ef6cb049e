"""Scoring a model on GazeScenes clips (gaze_edge.scenes.clips): one question per clip, its frames
shown as a video, greedy answers dense or with one gaze budget over all frames.

Prompts are laid out as the runtime lays a video out (``video_prompt_text``); decoding is
``evaluate_chat.decode_prompts`` (the reference's gaze, prompts of one length in a batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gaze_edge.scenes import render
from gaze_edge.scenes.clips import DEFAULT_FRAMES, KINDS, score_clip_answers, split_clips
from gaze_edge.train.data import Encoder
from gaze_edge.train.evaluate import decode_gaze, net_image_tokens, visual_kv_fraction
from gaze_edge.train.evaluate_chat import decode_prompts
from gaze_edge.train.tokenizer import video_prompt_text

ANSWER_TOKENS = 64  # a frame's caption is the longest answer


def clip_answers(net: torch.nn.Module, tokenizer, items, gaze=None, batch_size: int = 16) -> list[str]:
    """The model's greedy answer to each (clip, question) of ``items``."""
    encoder = Encoder(tokenizer, net_image_tokens(net))
    prompts = [encoder.text_ids(video_prompt_text(ex.prompt, len(clip))) for clip, ex in items]
    images = [[render(s) for s in clip.frames] for clip, _ in items]
    return decode_prompts(net, tokenizer, prompts, images, gaze=gaze, max_new_tokens=ANSWER_TOKENS,
                          batch_size=batch_size)  # fmt: skip


def evaluate_clips(net: torch.nn.Module, tokenizer, *, split: str = "test", n_clips: int = 500,
                   n_frames: int = DEFAULT_FRAMES, gaze=None, batch_size: int = 16) -> dict[str, float]:  # fmt: skip
    """Accuracy on the first ``n_clips`` clips of ``split`` ("all", per kind, "n")."""
    items = split_clips(split, n_clips, n_frames)
    return score_clip_answers(clip_answers(net, tokenizer, items, gaze, batch_size), items)


def video_table(net: torch.nn.Module, tokenizer, keep_ratios: Sequence[float | None], *, split: str = "test",
                n_clips: int = 500, n_frames: int = DEFAULT_FRAMES, on_row=None) -> list[dict]:  # fmt: skip
    """A row per keep ratio (None = dense): accuracy overall and per kind, and the visual KV
    fraction a gaze step reads (one budget over all ``n_frames`` frames' regions)."""
    rows = []
    for r in keep_ratios:
        scores = evaluate_clips(net, tokenizer, split=split, n_clips=n_clips, n_frames=n_frames,
                                gaze=decode_gaze(net, r))  # fmt: skip
        row = {"keep_ratio": r, "visual_kv_fraction": visual_kv_fraction(net, r, n_images=n_frames),
               "n_frames": n_frames, "split": split, **scores}  # fmt: skip
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def video_markdown(rows: Sequence[dict]) -> str:
    kinds = [k for k in KINDS if any(k in r for r in rows)]
    head = "| decode | visual KV | all | " + " | ".join(kinds) + " |"
    lines = [head, "|" + "---|" * (3 + len(kinds))]
    for r in rows:
        name = "dense" if r["keep_ratio"] is None else f"gaze {r['keep_ratio']:g}"
        cells = [f"{100 * r[k]:.1f}" for k in ["all", *kinds]]
        lines.append(f"| {name} | {100 * r['visual_kv_fraction']:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)
