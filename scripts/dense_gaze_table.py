"""Gaze for a dense-trained GazeScenes model: every training-free option and distillation, scored.

For docs/TRAINING.md "Gaze for dense checkpoints" (issue 14): takes a dense model folder (the
dense-trained twin, ``python -m gaze_edge.train train --preset dense``), makes one gaze checkpoint
per variant with ``dense_to_gaze`` (what ``gaze-edge make-gaze`` runs), distils the requested ones
with ``gaze_edge.distill`` (what ``gaze-edge distill`` runs, wall time measured around the whole
call: teacher answers, training, the held-out measurement and saving), and scores each on the
first N GazeScenes test scenes, dense and at each keep ratio, with the reference decoder
(``gaze_edge.train.compare``). Prints one JSON row per score as it comes and the markdown table
at the end.

    python scripts/dense_gaze_table.py runs/dense-0/model --work /tmp/dg0 --json dg0.json
    python scripts/dense_gaze_table.py runs/dense-0/model --work /tmp/dg0 --only distill-ctx \\
        --distill-steps 1500 --distill-scenes 2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from gaze_edge.config import GazeConfig

# name -> make-gaze settings (None: the dense folder itself, which the evaluator wraps with 2x2
# regions and no context tokens: training-free gaze as it was before issue 14)
VARIANTS: dict[str, dict | None] = {
    "no context tokens": None,
    "make-gaze (1 learned)": {},
    "first layer dense": {"n_dense_layers": 1},
    "gqa_max": {"score_mode": "gqa_max"},
    "pooled 1": {"context_tokens": "pooled", "n_context_tokens": 1},
    "pooled 1 + gqa_max": {"context_tokens": "pooled", "n_context_tokens": 1, "score_mode": "gqa_max"},
    "pooled 1 + gqa_max + first layer dense": {"context_tokens": "pooled", "n_context_tokens": 1,
                                               "score_mode": "gqa_max", "n_dense_layers": 1},
    "pooled 4": {"context_tokens": "pooled", "n_context_tokens": 4},
    "pooled 4 + gqa_max": {"context_tokens": "pooled", "n_context_tokens": 4, "score_mode": "gqa_max"},
    "pooled 4 + gqa_max + first layer dense": {"context_tokens": "pooled", "n_context_tokens": 4,
                                               "score_mode": "gqa_max", "n_dense_layers": 1},
}
# variants whose dense decode is another's (the same context tokens)
DENSE_AS = {"first layer dense": "make-gaze (1 learned)", "gqa_max": "make-gaze (1 learned)",
            "pooled 4 + gqa_max": "pooled 4", "pooled 4 + gqa_max + first layer dense": "pooled 4",
            "pooled 1 + gqa_max": "pooled 1", "pooled 1 + gqa_max + first layer dense": "pooled 1"}
DISTILLED: dict[str, dict] = {
    "distill-ctx": {"lora_rank": 0},
    "distill-lora8": {"lora_rank": 8},
    "distill-ctx gqa_max": {"lora_rank": 0, "score_mode": "gqa_max"},
    "distill-lora8 gqa_max": {"lora_rank": 8, "score_mode": "gqa_max"},
    "distill-ctx1 gqa_max": {"lora_rank": 0, "score_mode": "gqa_max", "context_tokens": 1},
    "distill-lora8 ctx1 gqa_max": {"lora_rank": 8, "score_mode": "gqa_max", "context_tokens": 1},
}


def machine() -> str:
    from gaze_edge.bench.warm import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def make_variant(dense: Path, folder: Path, settings: dict) -> Path:
    from gaze_edge.checkpoint import dense_to_gaze

    if (folder / "config.json").is_file():
        return folder
    cfg = GazeConfig(region_h=2, region_w=2, n_context_tokens=settings.get("n_context_tokens", 1),
                     keep_ratio=0.25, score_mode=settings.get("score_mode", "gqa_mean"),
                     n_dense_layers=settings.get("n_dense_layers", 0),
                     context_tokens=settings.get("context_tokens", "learned"))
    return dense_to_gaze(dense, folder, cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dense", type=Path, help="the dense model folder")
    p.add_argument("--work", type=Path, required=True, help="where the variants' checkpoints go")
    p.add_argument("--only", action="append", help="variant names to run (default: all)")
    p.add_argument("--scenes", type=int, default=500)
    p.add_argument("--keep-ratio", action="append", help="'dense' or a ratio; repeatable [dense 0.5 0.25 0.1]")
    p.add_argument("--distill-scenes", type=int, default=2000)
    p.add_argument("--distill-steps", type=int, default=1000)
    p.add_argument("--distill-batch", type=int, default=16)
    p.add_argument("--distill-keep", type=float, default=0.1)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path, help="append the rows here (JSON lines)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keeps = [None if k == "dense" else float(k) for k in (args.keep_ratio or ["dense", "0.5", "0.25", "0.1"])]
    names = args.only or [*VARIANTS, *DISTILLED]
    unknown = [n for n in names if n not in VARIANTS and n not in DISTILLED]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {[*VARIANTS, *DISTILLED]}")

    from gaze_edge import distill
    from gaze_edge.train.compare import compare, markdown_table

    where = machine()
    print(f"# machine: {where}", file=sys.stderr)
    rows = []
    for name in names:
        extra = {}
        if name in DISTILLED:
            folder = args.work / name
            t0 = time.perf_counter()
            result = distill(args.dense, folder, scenes=args.distill_scenes, keep_ratio=args.distill_keep,
                             steps=args.distill_steps, batch_size=args.distill_batch, threads=args.threads,
                             progress=False, **DISTILLED[name])
            extra = {"distill_seconds": round(time.perf_counter() - t0, 1), "kl_before": result.before["kl"],
                     "kl_after": result.after["kl"], "distill": {"scenes": args.distill_scenes,
                     "steps": args.distill_steps, "batch": args.distill_batch, "keep": args.distill_keep,
                     **DISTILLED[name]}}
            print(json.dumps({"distilled": name, **extra}), file=sys.stderr, flush=True)
        elif VARIANTS[name] is None:
            folder = args.dense
        else:
            folder = make_variant(args.dense, args.work / name, VARIANTS[name])

        def emit(row, extra=extra):
            row.update(extra, machine=where)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")

        # dense decoding only changes with the context tokens: score mode and dense layers act at gaze steps
        same_dense = name in DENSE_AS and DENSE_AS[name] in names
        compare({name: str(folder)}, [k for k in keeps if k is not None or not same_dense], n_scenes=args.scenes,
                device="cpu", on_row=emit)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
