"""The paper's comparison on GazeScenes: each model decoded densely and with gaze at several keep
ratios (dense-trained + dense, dense-trained + training-free gaze, gaze-trained + gaze)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from gaze_edge.train.evaluate import evaluate, visual_kv_fraction
from gaze_edge.train.load import load_trained
from gaze_edge.train.loop import pick_device

KEEP_RATIOS: tuple[float | None, ...] = (None, 0.5, 0.25, 0.1)  # None = dense decoding


def compare(
    models: dict[str, str],
    keep_ratios: Sequence[float | None] = KEEP_RATIOS,
    *,
    n_scenes: int = 500,
    split: str = "test",
    device: str | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per (model, keep ratio): object accuracy and friends on ``n_scenes`` scenes."""
    dev = pick_device(device)
    rows = []
    for name, path in models.items():
        net, tokenizer = load_trained(path, dev)
        for ratio in keep_ratios:
            t0 = time.perf_counter()
            score = evaluate(net, keep_ratio=ratio, tokenizer=tokenizer, split=split, n_scenes=n_scenes)
            row = {
                "model": name,
                "decode": "dense" if ratio is None else f"gaze {ratio:g}",
                "keep_ratio": ratio,
                "visual_kv": visual_kv_fraction(net, ratio),
                **score.as_dict(),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Models as rows, decode settings as columns, object accuracy (%) in the cells; a cell whose
    visual KV differs from its column's (dense first layers read more) says its own."""
    decodes = list(dict.fromkeys(r["decode"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cell = {(r["model"], r["decode"]): r for r in rows}
    kv = {}
    for r in rows:  # the column's visual KV: the most common among its rows
        kv.setdefault(r["decode"], []).append(round(100 * r["visual_kv"]))
    kv = {d: max(set(v), key=v.count) for d, v in kv.items()}

    def text(v, d):
        if v is None:
            return "-"
        own = round(100 * v["visual_kv"])
        return f"{100 * v['object_accuracy']:.1f}" + ("" if own == kv[d] else f" ({own}%)")

    head = "| model | " + " | ".join(f"{d} ({kv[d]}% visual KV)" for d in decodes) + " |"
    lines = [head, "|---|" + "---|" * len(decodes)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(text(cell.get((m, d)), d) for d in decodes) + " |")
    return "\n".join(lines)
