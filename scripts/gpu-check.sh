#!/usr/bin/env bash
# The CUDA check of the gaze runtime, for a lent GPU machine (one short run; see docs/RUNTIME.md).
#
#   scripts/gpu-check.sh pack     here: the patched llama.cpp tree -> .gpu/llama.tgz (git-ignored)
#   scripts/gpu-check.sh run      on the GPU machine (with .gpu/llama.tgz carried along; logs to $OUT)
#
# `run` builds test-backend-ops and test-gaze with -DGGML_CUDA=ON (sm_90, the lent H100/H200), then
# runs test-backend-ops -b CUDA0 for the gaze decode flash-attention cases (failing when CUDA skips
# one as not supported) and every other op the gaze graph uses, and test-gaze --gpu: the gaze decode
# steps with all layers offloaded against the dense step over a cache with the unselected regions
# removed, selections, the registry, and every node of a gaze step supported by the GPU (each score
# mode, mask and gather) with no flash-attention mask that CUDA would send back to the CPU.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in
pack)
  SRC=$(dirname "$("${PY:-$ROOT/.venv/bin/python}" -m gaze_edge.runtime.build source | tail -1)")
  mkdir -p "$ROOT/.gpu"
  tar czf "$ROOT/.gpu/llama.tgz" -C "$SRC" --exclude=llama.cpp/models --exclude=llama.cpp/docs \
    --exclude=llama.cpp/examples --exclude=llama.cpp/.git llama.cpp
  ls -la "$ROOT/.gpu/llama.tgz"
  ;;
run)
  OUT=${OUT:-/tmp/gpu-check}
  mkdir -p "$OUT" /tmp/l
  T0=$(date +%s)
  tar xzf "$ROOT/.gpu/llama.tgz" -C /tmp/l && cd /tmp/l/llama.cpp || exit 1
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
  cmake --build build -j "$(nproc)" --target test-backend-ops test-gaze > "$OUT/build.log" 2>&1; rc=$?
  echo "build rc=$rc after $(( $(date +%s) - T0 )) s"; tail -3 "$OUT/build.log"
  [ $rc -eq 0 ] || exit 1
  fail=0
  ./build/bin/test-backend-ops test -b CUDA0 -o FLASH_ATTN_EXT -p mask_gaze=1 > "$OUT/fa_gaze.log" 2>&1 || fail=1
  echo "[FLASH_ATTN_EXT mask_gaze] $(tail -1 "$OUT/fa_gaze.log")"
  # test-backend-ops skips what a backend does not support: every gaze layout must run on CUDA
  n_fa=$(grep -c "mask_gaze=1" "$OUT/fa_gaze.log"); n_skip=$(grep "mask_gaze=1" "$OUT/fa_gaze.log" | grep -ci "not supported")
  echo "[FLASH_ATTN_EXT mask_gaze] $n_fa cases, $n_skip not supported"
  { [ "$n_fa" -gt 0 ] && [ "$n_skip" -eq 0 ]; } || fail=1
  for op in GET_ROWS SET_ROWS TOP_K MEAN SUM_ROWS MUL ADD REPEAT CONCAT CPY CONT POOL_2D; do
    ./build/bin/test-backend-ops test -b CUDA0 -o $op > "$OUT/op_$op.log" 2>&1 || fail=1
    echo "[$op] $(tail -1 "$OUT/op_$op.log")"
  done
  timeout 300 ./build/bin/test-gaze --gpu > "$OUT/test_gaze.log" 2>&1 || fail=1
  echo "[test-gaze --gpu] $(tail -1 "$OUT/test_gaze.log")"
  echo "done after $(( $(date +%s) - T0 )) s, failures: $fail"
  exit $fail
  ;;
*)
  echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
