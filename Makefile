# The two set-up commands of the README: `make demo` and `make test`.
# Both work from a clean clone: they make .venv/, install the dependencies and build the patched
# llama.cpp runtime (cached under ~/.cache/gaze-edge, keyed by sdist + patches + CMAKE_ARGS).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.gaze-edge-deps

.PHONY: demo test runtime lint test-binaries bench cuda-compile-check clean-venv

demo: runtime
	$(VENV)/bin/gaze-edge chat --image examples/scene.png -p "Describe the image."

test: runtime
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(DEPS)
	$(PY) -m ruff check .

# The patched llama-cpp-python, installed into .venv (a no-op when the cached build matches).
runtime: $(DEPS)
	$(PY) -m gaze_edge.runtime.build install

# llama.cpp's own test binaries (test-backend-ops, llama-mtmd-cli) from the same patched tree.
test-binaries: runtime
	$(PY) -m gaze_edge.runtime.build tests

# The tables of docs/BENCHMARKS.md (not part of the tests; ~15 min on 2 cores, most of it the
# 16k-token prefill of the 0.5B-shaped model).
bench: runtime
	$(VENV)/bin/gaze-edge bench --threads 2 --rounds 6
	$(VENV)/bin/gaze-edge bench --shape qwen2-0.5b --threads 2 --rounds 6 --restrict both
	$(VENV)/bin/gaze-edge eval --keep-ratio dense --keep-ratio 0.5 --keep-ratio 0.25 --keep-ratio 0.1 \
	  --reference gaze_edge/models/default-hf --threads 2

# Compile the patched tree with the CUDA backend (no GPU needed; ~15 min; see the script).
cuda-compile-check: runtime
	scripts/cuda-compile-check.sh

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(DEPS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[convert,train,dev,server,video]'
	touch $@

clean-venv:
	rm -rf $(VENV)
