"""Training tiny VLMs on GazeScenes, dense or with gaze, and scoring them.

    from gaze_edge.train import preset, train, evaluate
    folder = train(preset("default"), "runs/default")       # -> runs/default/model
    evaluate(folder, keep_ratio=0.25).object_accuracy         # 500 test scenes by default

Modules: tokenizer (our BPE + chat template), model (tiny LLaVA + processor), data (batches,
single-turn and conversations), forward (dense / gaze loss), loop (train, or fine-tune with
init_from), evaluate (batched greedy decode, accuracy), evaluate_chat (multi-turn conversations
with the model's own answers), compare (the dense-vs-gaze table), load (run or model folders).
``python -m gaze_edge.train`` is the CLI.
Importing this package is cheap; torch and transformers load when a function is called.
"""

from __future__ import annotations

__all__ = ["PRESETS", "TrainConfig", "compare", "evaluate", "load_trained", "preset", "train"]


def __getattr__(name: str):
    if name in ("PRESETS", "TrainConfig", "preset"):
        from gaze_edge.train import config

        return getattr(config, name)
    if name == "train":
        from gaze_edge.train.loop import train

        return train
    if name == "evaluate":
        from gaze_edge.train.evaluate import evaluate

        return evaluate
    if name == "compare":
        from gaze_edge.train.compare import compare

        return compare
    if name == "load_trained":
        from gaze_edge.train.load import load_trained

        return load_trained
    raise AttributeError(f"module 'gaze_edge.train' has no attribute {name!r}")
