"""Distillation: a checkpoint learns to gaze at a budget, with its dense self as the teacher.

    from gaze_edge import distill
    result = distill("llava-1.5-7b-hf", "llava-gaze", images="photos/", keep_ratio=0.1)
    result.before["kl"], result.after["kl"]      # held-out divergence, nats per answer token

The dense model answers prompts about the given images greedily (teacher.py, cached); the
student is the same model decoding those answers with gaze at the budget, and only its context
tokens (optionally a LoRA adapter on the text attention projections, merged when saved) are
trained to minimise KL(teacher || student) over the answer tokens (divergence.py). No labels.
Modules: samples (what is learnt from), encode (prompts as the runtime gives them), teacher,
divergence, lora, source (loading SRC, writing the output checkpoint), run (``distill``).
Importing this package is cheap; torch and transformers load when ``distill`` is called.
"""

from __future__ import annotations

__all__ = ["DEFAULT_PROMPTS", "DistillResult", "DistillSettings", "distill"]


def __getattr__(name: str):
    if name in ("distill", "DistillResult", "DistillSettings"):
        from gaze_edge.train.distill import run

        return getattr(run, name)
    if name == "DEFAULT_PROMPTS":
        from gaze_edge.train.distill.samples import DEFAULT_PROMPTS

        return DEFAULT_PROMPTS
    raise AttributeError(f"module 'gaze_edge.train.distill' has no attribute {name!r}")
