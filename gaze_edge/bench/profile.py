"""Where a decode step spends its time: per graph node, through ggml's eval callback.

With an eval callback that wants every node, ggml's scheduler computes the graph one node at a
time and calls back after each; the time between two calls is that node's compute time plus a
fixed cost of computing a one-node graph (waking the threads, the barrier, the callback). That
fixed cost is measured on the nodes that compute nothing (views, reshapes, permutes) and taken off
every node; the step's wall time minus the corrected node times is reported as overhead.
Nodes are put into groups by the names llama.cpp gives them (``kqv_out-3``, ``gaze_scores-3``):
an unnamed node belongs to the next named node, the one it is computed for.

Groups: ``attention`` (the flash-attention nodes, gaze or dense, and their K/V views),
``gaze select`` (descriptors, scores, top-k: nodes named ``gaze_*`` other than the next group and
``gaze_fattn``), ``gaze mask/gather`` (the region mask over the cells, or the gathered K/V rows and
their mask: ``gaze_kq_mask``, ``gaze_k``, ``gaze_v``), ``weights`` (everything else: the
projections, FFN, norms, output).
Profiling slows a step (one split per node), so its totals are not the benchmark's timings.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections import defaultdict

GROUPS = ("attention", "gaze select", "gaze mask/gather", "weights")
# the nodes that turn a selection into what attention reads: the mask over the cells (mask mode),
# the gathered K/V rows and their mask (gather mode); the rest of gaze_* is scoring and top-k
MASK_GATHER = ("gaze_kq_mask", "gaze_k", "gaze_v")
NO_OPS = ("NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE")


def _ggml_base():
    from gaze_edge.runtime import bindings

    folder = os.path.dirname(bindings.library_path())
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            lib = ctypes.CDLL(path)
            lib.ggml_get_name.restype = ctypes.c_char_p
            lib.ggml_get_name.argtypes = [ctypes.c_void_p]
            lib.ggml_op_desc.restype = ctypes.c_char_p
            lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
            return lib
    raise RuntimeError(f"no ggml-base library next to {bindings.library_path()}")


def group_of(name: str, op: str) -> str | None:
    """The group of a named node; None for an unnamed one."""
    if op == "FLASH_ATTN_EXT":
        return "attention"
    base = name.split("-")[0].strip()
    if not base or base.startswith("node_") or "(view)" in name or "(permuted)" in name or "(reshaped)" in name:
        return None
    if base in ("gaze_fattn", "kqv_out", "kq", "kqv", "kq_soft_max"):
        return "attention"
    if base in MASK_GATHER:
        return "gaze mask/gather"
    if base.startswith("gaze_"):
        return "gaze select"
    return "weights"


class NodeProfiler:
    """An eval callback (pass ``.callback`` as the context's cb_eval) that times every node."""

    def __init__(self) -> None:
        from gaze_edge.runtime.bindings import _llama_cpp

        self._ggml = _ggml_base()
        self.nodes: list[tuple[str, str, float]] = []
        self._t = 0.0
        self.callback = _llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, tensor, ask, _user_data) -> bool:
        now = time.perf_counter()
        if ask:
            self._t = now
            return True
        name = (self._ggml.ggml_get_name(tensor) or b"").decode(errors="replace")
        op = (self._ggml.ggml_op_desc(tensor) or b"").decode(errors="replace")
        self.nodes.append((name, op, now - self._t))
        return True

    def reset(self) -> None:
        self.nodes = []

    def n_nodes(self) -> int:
        """Graph nodes computed since the last reset that do work (views and reshapes excluded)."""
        return sum(1 for _, op, _ in self.nodes if op not in NO_OPS)

    def fixed_cost(self) -> float:
        """Median seconds of a node that computes nothing: the cost of a one-node graph."""
        idle = sorted(dt for _, op, dt in self.nodes if op in NO_OPS)
        return idle[len(idle) // 2] if idle else 0.0

    def groups(self) -> dict[str, float]:
        """Seconds per group over the recorded nodes, less the fixed cost of each (unnamed nodes
        go with the next named one)."""
        out: dict[str, float] = defaultdict(float)
        pending = 0.0
        fixed = self.fixed_cost()
        for name, op, dt in self.nodes:
            if op in NO_OPS:
                # llama.cpp names some gaze results on their reshape (gaze_sel, gaze_kq_mask, gaze_k):
                # such a name still ends the work computed for it
                g = group_of(name, op)
                if g in ("gaze select", "gaze mask/gather") and pending:
                    out[g] += pending
                    pending = 0.0
                continue
            dt = max(0.0, dt - fixed)
            g = group_of(name, op)
            if g is None:
                pending += dt
                continue
            out[g] += dt + pending
            pending = 0.0
        out["weights"] += pending
        return {g: out.get(g, 0.0) for g in GROUPS}
