"""``python -m gaze_edge.train``: train, evaluate and compare GazeScenes models.

    python -m gaze_edge.train train --preset default --out runs/default
    python -m gaze_edge.train train --preset chat --init-from runs/default/model --out runs/chat
    python -m gaze_edge.train eval runs/default --keep-ratio dense --keep-ratio 0.25
    python -m gaze_edge.train compare gaze=runs/default dense=runs/dense --json table.json
    python -m gaze_edge.train chat-eval gaze_edge/models/default-hf --scenes 500
    python -m gaze_edge.train train --preset video --init-from gaze_edge/models/default-hf --out runs/video
    python -m gaze_edge.train video-eval runs/video --clips 500 --keep-ratio dense --keep-ratio 0.1
"""

from __future__ import annotations

import argparse
import json
import sys


def _ratio(text: str) -> float | None:
    return None if text == "dense" else float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gaze_edge.train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (resumes an unfinished run in --out)")
    t.add_argument("--preset", default="default", help="smoke, default, dense, chat or video")
    t.add_argument("--out", required=True, help="run folder (the model lands in OUT/model)")
    t.add_argument("--steps", type=int, help="override the preset's step count")
    t.add_argument("--seed", type=int, help="override the preset's seed")
    t.add_argument("--gaze-from-step", type=int, help="dense steps before gaze training starts")
    t.add_argument("--init-from", help="model folder to fine-tune (the chat preset needs one)")
    t.add_argument("--chat-fraction", type=float, help="share of multi-turn conversation samples")
    t.add_argument("--video-fraction", type=float, help="share of clip questions (video)")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="object accuracy of a run or model folder")
    e.add_argument("path")
    e.add_argument("--keep-ratio", action="append", type=_ratio, help="'dense' or a ratio; repeatable")
    e.add_argument("--scenes", type=int, default=500)
    e.add_argument("--split", default="test")
    e.add_argument("--device")

    c = sub.add_parser("compare", help="the dense/gaze comparison table")
    c.add_argument("models", nargs="+", help="NAME=PATH (run or model folders)")
    c.add_argument("--keep-ratio", action="append", type=_ratio)
    c.add_argument("--scenes", type=int, default=500)
    c.add_argument("--split", default="test")
    c.add_argument("--device")
    c.add_argument("--json", help="write the rows here")

    h = sub.add_parser("chat-eval", help="single-turn and multi-turn (conversation) accuracy")
    h.add_argument("path")
    h.add_argument("--keep-ratio", action="append", type=_ratio, help="'dense' or a ratio; repeatable")
    h.add_argument("--scenes", type=int, default=500)
    h.add_argument("--split", default="test")
    h.add_argument("--device")
    h.add_argument("--threads", type=int, help="torch CPU threads")
    h.add_argument("--json", help="write the rows here")

    v = sub.add_parser("video-eval", help="accuracy on GazeScenes clips (one question each, frames as a video)")
    v.add_argument("path")
    v.add_argument("--keep-ratio", action="append", type=_ratio, help="'dense' or a ratio; repeatable")
    v.add_argument("--clips", type=int, default=500)
    v.add_argument("--frames", type=int, default=8, help="frames per clip (8-32)")
    v.add_argument("--split", default="test")
    v.add_argument("--device")
    v.add_argument("--threads", type=int, help="torch CPU threads")
    v.add_argument("--json", help="write the rows here")

    args = parser.parse_args(argv)
    if args.command == "train":
        from gaze_edge.train import preset, train

        changes = {k: v for k, v in (("steps", args.steps), ("seed", args.seed),
                                      ("gaze_from_step", args.gaze_from_step), ("init_from", args.init_from),
                                      ("chat_fraction", args.chat_fraction), ("video_fraction", args.video_fraction))
                   if v is not None}  # fmt: skip
        folder = train(
            preset(args.preset, **changes), args.out, resume=not args.fresh, progress=not args.no_progress,
            device=args.device, threads=args.threads, on_log=lambda r: print(json.dumps(r), flush=True),
        )  # fmt: skip
        print(f"model saved in {folder}")
    elif args.command == "eval":
        from gaze_edge.train.compare import compare

        for row in compare({args.path: args.path}, args.keep_ratio or [None], n_scenes=args.scenes,
                           split=args.split, device=args.device):  # fmt: skip
            print(json.dumps(row), flush=True)
    elif args.command == "video-eval":
        from gaze_edge.train.evaluate_video import video_markdown, video_table

        net, tokenizer = _load_for_eval(args)
        rows = video_table(net, tokenizer, args.keep_ratio or [None, 0.25, 0.1, 0.05], split=args.split,
                           n_clips=args.clips, n_frames=args.frames, on_row=_print_row)  # fmt: skip
        _report(rows, video_markdown, args.json)
    elif args.command == "chat-eval":
        from gaze_edge.train.evaluate_chat import chat_markdown, chat_table

        net, tokenizer = _load_for_eval(args)
        rows = chat_table(net, tokenizer, args.keep_ratio or [None, 0.25, 0.1], split=args.split,
                          n_scenes=args.scenes, on_row=_print_row)  # fmt: skip
        _report(rows, chat_markdown, args.json)
    else:
        from gaze_edge.train.compare import compare, markdown_table

        models = dict(m.split("=", 1) for m in args.models)
        rows = compare(models, args.keep_ratio or [None, 0.5, 0.25, 0.1], n_scenes=args.scenes,
                       split=args.split, device=args.device, on_row=_print_row)  # fmt: skip
        _report(rows, markdown_table, args.json)
    return 0


def _load_for_eval(args):
    """(net, tokenizer) of args.path on args.device, with args.threads torch threads."""
    from gaze_edge.train.load import load_trained
    from gaze_edge.train.loop import pick_device

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return load_trained(args.path, pick_device(args.device))


def _print_row(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _report(rows: list[dict], markdown, json_path: str | None) -> None:
    """The table as markdown; the rows as JSON in json_path too, when given."""
    print(markdown(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
