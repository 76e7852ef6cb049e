#!/usr/bin/env bash
# Compile the patched llama.cpp with the CUDA backend on a machine without a GPU (a compile check:
# nothing runs). Needs nvcc (CUDA 13) and network access to PyPI.
#
#   scripts/cuda-compile-check.sh [WORKDIR]      (default WORKDIR: ~/.cache/gaze-edge/cuda-check)
#
# The toolkit on the project's machines has no cuBLAS and no libcuda stub, so CMake's
# CUDA::cublas / CUDA::cuda_driver are missing (../shared/FACTS.md). The cuBLAS headers and
# libraries come from PyPI's nvidia-cublas wheel, overlaid on the toolkit in a folder of symlinks;
# GGML_CUDA_NO_VMM drops the driver library. CMake resolves nvcc to the real toolkit, whose include
# folder has no cublas_v2.h: the wheel's include folder is passed as a flag as well. One architecture (sm_90) keeps it short: ggml-cuda
# alone takes ~14 min on 2 cores. Builds ggml-cuda, llama and mtmd (every file our patches touch).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$HOME/.cache/gaze-edge/cuda-check}
CUBLAS=nvidia-cublas==13.10.0.20
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
CUDA_HOME=$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
mkdir -p "$WORK"

SRC=$("$PY" -m gaze_edge.runtime.build source | tail -1)  # the patched vendor/llama.cpp
[ -f "$SRC/CMakeLists.txt" ] || { echo "no patched llama.cpp tree at $SRC" >&2; exit 1; }

if [ ! -d "$WORK/cublas/nvidia" ]; then
  "$PY" -m pip download --no-deps -q "$CUBLAS" -d "$WORK/dl"
  rm -rf "$WORK/cublas.tmp" && mkdir -p "$WORK/cublas.tmp"
  "$PY" -m zipfile -e "$WORK"/dl/nvidia_cublas-*.whl "$WORK/cublas.tmp"
  mv "$WORK/cublas.tmp" "$WORK/cublas"
fi
CB=$WORK/cublas/nvidia/cu13
OV=$WORK/toolkit
rm -rf "$OV" && mkdir -p "$OV/include" "$OV/lib64"
ln -s "$CUDA_HOME/bin" "$OV/bin"
ln -s "$CUDA_HOME/nvvm" "$OV/nvvm"
ln -s "$CUDA_HOME"/include/* "$OV/include/"
ln -sf "$CB"/include/* "$OV/include/"
ln -s "$CUDA_HOME"/lib64/* "$OV/lib64/"
ln -sf "$CB"/lib/* "$OV/lib64/"
ln -sf "$CB/lib/libcublas.so.13" "$OV/lib64/libcublas.so"
ln -sf "$CB/lib/libcublasLt.so.13" "$OV/lib64/libcublasLt.so"

LAUNCHER=()
command -v ccache > /dev/null && LAUNCHER=(-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCUDAToolkit_ROOT="$OV" -DCMAKE_CUDA_COMPILER="$OV/bin/nvcc" "${LAUNCHER[@]}" \
  -DCMAKE_CUDA_FLAGS="-I$CB/include" -DCMAKE_CXX_FLAGS="-I$CB/include" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$WORK/configure.log"
time cmake --build "$WORK/build" -j "$(nproc)" --target ggml-cuda llama mtmd 2>&1 | tee "$WORK/build.log" | grep -E "error|warning: .*gaze|^\[[0-9]+/[0-9]+\] Linking" || true
test "${PIPESTATUS[0]}" -eq 0
echo "CUDA compile check passed: $(grep -c '\.cu\.o' "$WORK/build.log") CUDA objects; $WORK/build.log"
