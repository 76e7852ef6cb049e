"""Scoring a model on multi-turn GazeScenes conversations, with its own earlier answers.

A conversation is answered turn by turn, as a chat would: at turn t the prompt is the chat
template's render of turns 1..t with the model's OWN answers to turns 1..t-1 (``answer.strip()``,
as ``gaze-edge chat`` passes them back), every image shown so far in place; that prompt is dense
and only the new answer's tokens gaze (GAZE_SPEC.md), i.e. what a runtime evaluating the whole
conversation again does. Prompts of equal length and image count are decoded together with
``evaluate.greedy_decode`` (the same batched decoder as the single-turn scores).

Questions are scored by exact match, captions by object accuracy (``score_captions``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from gaze_edge.config import GazeConfig
from gaze_edge.scenes import render, score_answers, score_captions, split_scenes
from gaze_edge.scenes.conversation import Conversation, Turn, follow_up_conversation
from gaze_edge.train.data import Encoder, pixel_values
from gaze_edge.train.evaluate import decoding_vlm, greedy_decode
from gaze_edge.train.tokenizer import conversation_text

CAPTION_TOKENS, ANSWER_TOKENS = 64, 12


def decode_prompts(
    net: torch.nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    images: Sequence[Sequence],
    gaze: GazeConfig | None = None,
    max_new_tokens: Sequence[int] | int = CAPTION_TOKENS,
    batch_size: int = 50,
) -> list[str]:
    """Greedy answers to token-id prompts (image placeholders expanded), each with its images
    (PIL, in order); prompts of the same length and image count are decoded in one batch."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, ids in enumerate(prompts):
        groups.setdefault((len(ids), len(images[i])), []).append(i)
    texts = [""] * len(prompts)
    with decoding_vlm(net, gaze) as vlm:
        device = vlm.context_tokens.device
        for rows in groups.values():
            for j in range(0, len(rows), batch_size):
                part = rows[j : j + batch_size]
                ids = torch.tensor([prompts[i] for i in part], device=device)
                pixels = pixel_values([im for i in part for im in images[i]]).to(device)
                out = greedy_decode(vlm, ids, pixels, max(limits[i] for i in part), tokenizer.eos_token_id)
                for i, row in zip(part, out, strict=True):
                    texts[i] = tokenizer.decode(row[: limits[i]], skip_special_tokens=True).strip()
    return texts


def converse(
    net: torch.nn.Module,
    tokenizer,
    conversations: Sequence[tuple[Sequence[Turn], Sequence]],
    gaze: GazeConfig | None = None,
    batch_size: int = 50,
) -> list[list[str]]:
    """The model's answers to every turn of each conversation, its own answers kept as history.

    conversations: (turns, images) pairs; turn ``t`` with ``new_image`` shows the next image of
    ``images`` (PIL) before its text. Returns per conversation the answer to each turn.
    """
    encoder = Encoder(tokenizer, _image_tokens(net))
    answers: list[list[str]] = [[] for _ in conversations]
    for t in range(max(len(turns) for turns, _ in conversations)):
        live = [c for c, (turns, _) in enumerate(conversations) if t < len(turns)]
        prompts, shown, limits = [], [], []
        for c in live:
            turns, images = conversations[c]
            prompts.append(encoder.text_ids(conversation_text(turns[: t + 1], answers[c])))
            shown.append(list(images[: sum(turn.new_image for turn in turns[: t + 1])]))
            limits.append(CAPTION_TOKENS if turns[t].kind == "caption" else ANSWER_TOKENS)
        for c, text in zip(
            live, decode_prompts(net, tokenizer, prompts, shown, gaze, limits, batch_size), strict=True
        ):
            answers[c].append(text)
    return answers


def _image_tokens(net) -> int:
    return int(getattr(net, "model", net).config.image_seq_length)


def evaluation_conversations(
    split: str = "test", n_scenes: int = 500, n_turns: int = 3, new_image: bool = False, seed: int = 0
) -> list[Conversation]:
    """Conversation i: turn 1 a caption or a question about scene i of the split, then questions;
    with new_image, turn 2 shows scene n_scenes + i and turns 2.. ask about it."""
    rng = random.Random(f"conversations-{split}-{seed}-{int(new_image)}")
    firsts = split_scenes(split, n_scenes)
    seconds = split_scenes(split, n_scenes, start=n_scenes) if new_image else [None] * n_scenes
    return [follow_up_conversation(a, rng, n_turns, b) for a, b in zip(firsts, seconds, strict=True)]


def score_turn(
    conversations: Sequence[Conversation], answers: Sequence[Sequence[str]], t: int
) -> dict[str, float]:
    """Scores of turn t (0-based): "questions" (exact match), "captions" (object accuracy), and
    per question kind; a key is absent when no conversation has that kind at turn t."""
    out: dict[str, float] = {}
    caps = [(c, a) for c, a in zip(conversations, answers, strict=True) if c.turns[t].kind == "caption"]
    if caps:
        out["captions"] = score_captions(
            [a[t] for _, a in caps], [c.scenes[c.turns[t].image] for c, _ in caps]
        ).object_accuracy
    qs = [
        (c.turns[t], a[t])
        for c, a in zip(conversations, answers, strict=True)
        if c.turns[t].kind != "caption"
    ]
    if qs:
        out["questions"] = score_answers([a for _, a in qs], [turn.answer for turn, _ in qs])
        for kind in sorted({turn.kind for turn, _ in qs}):
            pairs = [(turn, a) for turn, a in qs if turn.kind == kind]
            out[kind] = score_answers([a for _, a in pairs], [turn.answer for turn, _ in pairs])
    out["n"] = len(conversations)
    return out


def evaluate_conversations(
    net: torch.nn.Module,
    tokenizer,
    *,
    split: str = "test",
    n_scenes: int = 500,
    n_turns: int = 3,
    new_image: bool = False,
    gaze: GazeConfig | None = None,
    seed: int = 0,
    batch_size: int = 50,
) -> dict[str, dict[str, float]]:
    """Per turn ("turn1", "turn2", ...) the scores of ``score_turn`` on ``evaluation_conversations``."""
    conversations = evaluation_conversations(split, n_scenes, n_turns, new_image, seed)
    pairs = [(c.turns, [render(s) for s in c.scenes]) for c in conversations]
    answers = converse(net, tokenizer, pairs, gaze, batch_size)
    return {f"turn{t + 1}": score_turn(conversations, answers, t) for t in range(n_turns)}


def chat_table(
    net: torch.nn.Module,
    tokenizer,
    keep_ratios: Sequence[float | None] = (None, 0.25, 0.1),
    *,
    split: str = "test",
    n_scenes: int = 500,
    on_row=None,
) -> list[dict]:
    """One row per decode setting: single-turn captions (object accuracy) and questions (exact
    match), then 3-turn conversations on one image (turn 1 a caption or a question, turns 2-3
    questions) and with a second image shown in turn 2 (turns 2-3 questions about it)."""
    import time

    from gaze_edge.train.evaluate import decode_gaze, evaluate_net, evaluate_questions

    rows = []
    for ratio in keep_ratios:
        t0 = time.perf_counter()
        gaze = decode_gaze(net, ratio)
        same = evaluate_conversations(net, tokenizer, split=split, n_scenes=n_scenes, gaze=gaze)
        new = evaluate_conversations(net, tokenizer, split=split, n_scenes=n_scenes, gaze=gaze, new_image=True)
        row = {
            "decode": "dense" if ratio is None else f"gaze {ratio:g}",
            "keep_ratio": ratio,
            "single_caption": evaluate_net(net, tokenizer, split=split, n_scenes=n_scenes, gaze=gaze).object_accuracy,
            "single_question": evaluate_questions(net, tokenizer, split=split, n_scenes=n_scenes, gaze=gaze)["all"],
            "same_image": same,
            "new_image": new,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def chat_markdown(rows: list[dict]) -> str:
    """The conversation table of docs/TRAINING.md (accuracy %)."""

    def pct(x) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    head = (
        "| decode | single-turn caption | single-turn question | turn 1 caption | turn 1 question "
        "| turn 2 | turn 3 | new image: turn 2 | new image: turn 3 |"
    )
    lines = [head, "|---|" + "---|" * 8]
    for r in rows:
        s, n = r["same_image"], r["new_image"]
        cells = [r["single_caption"], r["single_question"], s["turn1"].get("captions"), s["turn1"].get("questions"),
                 s["turn2"]["questions"], s["turn3"]["questions"], n["turn2"]["questions"], n["turn3"]["questions"]]  # fmt: skip
        lines.append(f"| {r['decode']} | " + " | ".join(pct(c) for c in cells) + " |")
    return "\n".join(lines)
