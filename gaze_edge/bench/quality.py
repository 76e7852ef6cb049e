"""Object accuracy on GazeScenes through the GGUF runtime, side by side with the PyTorch reference.

The runtime answers each scene the way ``gaze-edge chat`` would (the GGUF's chat template, greedy,
gaze at the given keep ratio, dense for ``None``); the reference decodes the same scenes from the
transformers checkpoint the GGUF was converted from (gaze_edge.train.evaluate, batched). Both are
scored by the same object-level scorer; ``agreement`` is the fraction of scenes where the two
captions are the same text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gaze_edge.scenes import CAPTION_PROMPT, render, score_captions, split_scenes

MAX_TOKENS = 64  # the reference's max_new_tokens


@dataclass
class QualityRow:
    keep_ratio: float | None
    runtime_accuracy: float
    runtime_visual_kv: float  # mean over generated tokens (GAZE_SPEC.md "Accounting")
    reference_accuracy: float | None = None
    agreement: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def runtime_captions(model, scenes, keep_ratio: float | None, progress=None) -> tuple[list[str], float]:
    """Greedy captions through the runtime, and the mean visual KV fraction of their steps."""
    texts, fractions = [], []
    for i, scene in enumerate(scenes):
        result = model.chat(CAPTION_PROMPT, image=render(scene), max_tokens=MAX_TOKENS, temperature=0.0,
                            gaze=keep_ratio is not None, keep_ratio=keep_ratio, trace=keep_ratio is not None)
        texts.append(result.text.strip())
        fractions.append(1.0 if result.visual_kv_fraction is None else result.visual_kv_fraction)
        if progress:
            progress(i + 1)
    return texts, sum(fractions) / len(fractions)


def load_reference(checkpoint):
    """(net, tokenizer) of the transformers checkpoint, loaded once for every keep ratio."""
    from transformers.utils import logging

    from gaze_edge.train.load import load_trained
    from gaze_edge.train.loop import pick_device

    logging.disable_progress_bar()
    return load_trained(checkpoint, pick_device(None))


def reference_captions(net, tokenizer, scenes, keep_ratio: float | None) -> list[str]:
    """Greedy captions from the PyTorch reference (generate_answers puts the net's own settings back)."""
    from gaze_edge.train.evaluate import decode_gaze, generate_answers

    return generate_answers(net, tokenizer, scenes, gaze=decode_gaze(net, keep_ratio), max_new_tokens=MAX_TOKENS)


def run(model, keep_ratios: list[float | None], *, n_scenes: int = 500, split: str = "test",
        reference=None, progress=None) -> list[QualityRow]:
    """One row per keep ratio (None = dense). reference: a transformers checkpoint folder, or None.

    progress: a callable (label, done, total) or None.
    """
    scenes = split_scenes(split, n_scenes)
    ref_net = load_reference(reference) if reference is not None else None
    rows = []
    for ratio in keep_ratios:
        label = "dense" if ratio is None else f"gaze {ratio:g}"
        texts, frac = runtime_captions(
            model, scenes, ratio, progress=progress and (lambda n, label=label: progress(label, n, len(scenes)))
        )
        row = QualityRow(ratio, score_captions(texts, scenes).object_accuracy, frac)
        if ref_net is not None:
            ref = reference_captions(*ref_net, scenes, ratio)
            row.reference_accuracy = score_captions(ref, scenes).object_accuracy
            row.agreement = sum(a == b for a, b in zip(texts, ref, strict=True)) / len(scenes)
        rows.append(row)
    return rows


def format_table(rows: list[QualityRow], n_scenes: int) -> str:
    lines = [f"object accuracy on {n_scenes} GazeScenes test scenes",
             f"{'mode':>10} {'runtime':>8} {'visual KV':>9} {'reference':>9} {'same caption':>12}"]
    for r in rows:
        mode = "dense" if r.keep_ratio is None else f"gaze {r.keep_ratio:g}"
        ref = "" if r.reference_accuracy is None else f"{100 * r.reference_accuracy:.1f}%"
        agree = "" if r.agreement is None else f"{100 * r.agreement:.1f}%"
        lines.append(f"{mode:>10} {100 * r.runtime_accuracy:>7.1f}% {100 * r.runtime_visual_kv:>8.1f}% "
                     f"{ref:>9} {agree:>12}")
    return "\n".join(lines)
