"""gaze-edge: Gaze Attention for multimodal LLMs on a patched llama.cpp.

Importing this package is cheap: torch, transformers and llama_cpp load only when the part of
the library that needs them is used.
"""

__version__ = "0.1.0"

__all__ = ["GazeModel", "__version__", "distill"]


def __getattr__(name: str):
    if name == "GazeModel":
        from gaze_edge.runtime.model import GazeModel

        return GazeModel
    if name == "distill":
        from gaze_edge.train.distill.run import distill

        return distill
    raise AttributeError(f"module 'gaze_edge' has no attribute {name!r}")
