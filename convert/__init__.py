"""HF checkpoints (dense or gaze) to GGUF: installed as ``gaze_edge.convert``."""
