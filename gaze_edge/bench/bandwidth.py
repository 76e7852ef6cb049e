"""The machine's memory read bandwidth, and the bytes a decode step must read.

A decode step of a memory-bound model cannot be faster than (bytes it must read) / (read
bandwidth). The bandwidth is measured, not assumed: ``n_threads`` threads each stream their part of
a buffer much larger than the caches through numpy's ``max`` (SIMD, releases the GIL), best of a
few passes. On the project's 2-core machine this gives the same figure as a C loop XOR-ing 64-bit
words (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import threading
import time

import numpy as np


def read_bandwidth(n_threads: int, size_mb: int = 1024, passes: int = 7) -> float:
    """Bytes per second that ``n_threads`` threads read from memory (best pass)."""
    data = np.ones(size_mb * 2**20 // 4, dtype=np.float32)  # written once: the pages are really there
    parts = np.array_split(data, n_threads)
    best = float("inf")
    for _ in range(passes):
        threads = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return data.nbytes / best


def kv_bytes_per_cell(n_layer: int, n_head_kv: int, head_dim: int, kv_type: str) -> float:
    """Bytes of K and V of one cached token over all layers."""
    per_value = {"f32": 4.0, "f16": 2.0, "q8_0": 34.0 / 32.0}[kv_type]
    return 2 * n_layer * n_head_kv * head_dim * per_value


def step_bytes(weight_bytes: int, visible_cells: float, kv_cell_bytes: float, descriptor_bytes: int = 0) -> float:
    """What one decode step must read: every weight, the K/V of the visible cells, and (gaze) the
    region descriptors it scores."""
    return weight_bytes + visible_cells * kv_cell_bytes + descriptor_bytes
