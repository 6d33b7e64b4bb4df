# Every target does its own set-up: a virtualenv in .venv (re-used while pyproject.toml is
# unchanged) and the converted model in the cache (re-used once prepared).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-reliability bench schemas clean-venv

setup: $(STAMP)
	$(PY) cli.py model prepare

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11 or newer is needed (PYTHON=$(PYTHON))"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[test]'
	# torchao (the [gpu] extra, --quantize on CUDA) goes beside the venv, not into it: transformers
	# imports it on every model load when installed (1.3 s here), which a CPU user does not need.
	# Only the tests that check the CUDA path's wiring on CPU put it on their path.
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/extras \
		"$$($(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['gpu'])")"
	touch $(STAMP)

demo: setup
	$(PY) cli.py demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The fault suite at full size (500-task crash run, 5,000-task flood); `make test` runs it lighter.
test-reliability: setup
	GEMMA_BATCH_RELIABILITY=full $(PY) -m pytest -m reliability $(PYTEST_ARGS)

# Peers (llama-cpp-python compiles from source the first time: several minutes) and the benchmark;
# BENCH_ARGS=--quick for a smoke run. Figures go to bench/results/; see docs/PERFORMANCE.md.
BENCH_ARGS ?=
# llama.cpp's AMX kernels died with SIGILL (tilezero) on a 2-core KVM guest whose CPU reports AMX and
# whose PyTorch uses it, so the peer is built for this CPU without AMX (its AVX-512/AVX2 kernels;
# docs/PERFORMANCE.md). An explicit -mno-* flag wins over ggml's -march=native in GCC.
LLAMA_NO_AMX = -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS='$(LLAMA_NO_AMX)' -DCMAKE_CXX_FLAGS='$(LLAMA_NO_AMX)'

bench: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) cli.py bench $(BENCH_ARGS)

schemas: $(STAMP)
	$(PY) -m schemas.export

clean-venv:
	rm -rf $(VENV)
