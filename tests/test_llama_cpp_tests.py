"""llama.cpp's own tests, built from the same patched tree: test-gaze and test-backend-ops.

test-gaze (patch 0008) checks the registry under seq_* ops, gaze vs a host-side removal reference,
top_k >= n_regions == dense, traces; test-backend-ops runs every op the gaze graph uses, with the
gaze-shaped flash-attention cases (`mask_gaze`: a mask row per query head, and the per-KV-head
stream layout) among them. Without a GPU the only
backend is the CPU (`-b CPU`), whose results test-backend-ops checks against its CPU reference.
"""

from __future__ import annotations

import subprocess

import pytest

from gaze_edge.runtime import build

# MUL_MAT only with f32 operands (the scoring matmuls); its full quantized matrix takes minutes
GAZE_OPS = ["FLASH_ATTN_EXT", "GET_ROWS", "SET_ROWS", "TOP_K", "MUL_MAT", "SUM_ROWS", "CONCAT"]
FILTERS = {"MUL_MAT": ["-p", "type_a=f32,type_b=f32"]}


@pytest.fixture(scope="module")
def bin_dir():
    return build.build_tests(build.BuildSpec.from_env(), ["test-gaze", "test-backend-ops"])


def test_test_gaze_passes(bin_dir):
    proc = subprocess.run([str(bin_dir / "test-gaze")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_backend_ops_gaze_flash_attention_cases(bin_dir):
    proc = subprocess.run(
        [str(bin_dir / "test-backend-ops"), "test", "-b", "CPU", "-o", "FLASH_ATTN_EXT", "-p", "mask_gaze=1"],
        capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "mask_gaze=1" in out and "FAIL" not in out


@pytest.mark.parametrize("op", GAZE_OPS[1:])
def test_backend_ops_used_by_the_gaze_graph(bin_dir, op):
    proc = subprocess.run([str(bin_dir / "test-backend-ops"), "test", "-b", "CPU", "-o", op, *FILTERS.get(op, [])],
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "FAIL" not in out
