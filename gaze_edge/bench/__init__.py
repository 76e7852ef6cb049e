"""Benchmarks: decode speed dense vs gaze (``speed``), accuracy through the runtime vs the PyTorch
reference (``quality``), random-weight models of real shapes (``shapes``) and the memory-bandwidth
bound (``bandwidth``). ``gaze-edge bench`` and ``gaze-edge eval`` are their command lines;
docs/BENCHMARKS.md holds measured tables."""
