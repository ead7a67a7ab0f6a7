# A newcomer's two commands (README.md): `make train` and `make test`.
# Both create .venv, install torch and the dev tools, build the extension when a source
# changed, then run the main job or the test suite. Re-running is cheap (stamp files).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
SOURCES := setup.py $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu')
export MAX_JOBS ?= 2

.PHONY: setup train test clean gpu-check

$(VENV)/.deps-stamp: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" -r requirements-dev.txt
	touch $@

# --no-build-isolation: compile against the torch installed above (an isolated build
# would download another torch and could break the ABI).
$(VENV)/.build-stamp: $(VENV)/.deps-stamp $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.build-stamp

train: setup
	$(PY) -m layernorm_ext.train

test: setup
	$(PY) -m pytest -q tests

# On a machine with a CUDA GPU (no network needed): build for it, run the tests on CUDA,
# compute-sanitizer and the benchmark; writes bench/results/<gpu>-check.txt and the
# benchmark's bench/results/<gpu>.{md,csv,png}. Options: GPU_CHECK_ARGS="--quick" etc.
gpu-check:
	python3 scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info layernorm_ext/*.so $(VENV)/.build-stamp

# The CPU microbenchmark's full sweep (bench/bench_layernorm.py --help for the options).
.PHONY: bench
bench: setup
	$(PY) bench/bench_layernorm.py --malloc-tuned
