# A newcomer's two commands (README.md): `make train` and `make test`.
# Both create .venv, install torch and the dev tools, build the extension when a source
# changed, then run the main job or the test suite. Re-running is cheap (stamp files).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
SOURCES := setup.py $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')
export MAX_JOBS ?= 2

.PHONY: setup train test clean gpu-check test-cpu-torch

# The stamp names the torch version: `make TORCH_VERSION=...` installs that torch into
# the existing venv, and the build below then compiles against it.
DEPS_STAMP := $(VENV)/.deps-torch-$(TORCH_VERSION)-stamp
$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" -r requirements-dev.txt
	rm -f $(VENV)/.deps-torch-*-stamp  # one version at a time: going back reinstalls too
	touch $@

# Built in place against the torch installed above, keeping the objects in build/: a
# rebuild compiles only what changed (`pip install -e` compiles everything, in a fresh
# temporary folder, every time). The .pth file puts this checkout on the venv's path, as
# an editable install would.
$(VENV)/.build-stamp: $(DEPS_STAMP) $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c 'import os, sysconfig; open(os.path.join(sysconfig.get_paths()["purelib"], "layernorm_ext-checkout.pth"), "w").write(os.getcwd() + "\n")'
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
	rm -f $(VENV)/lib/python*/site-packages/layernorm_ext-checkout.pth

# The CPU-only build path against another torch: torch 2.13.0's CPU-only wheel (no
# CUDA, an older autograd API), built outside the source tree so the main build stays,
# then the autograd and API tests on it. Run by .ci/run after `make test`.
# PyPI's Linux torch has CUDA; elsewhere than here pass
# CPU_TORCH_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
CPU_TORCH_VERSION ?= 2.13.0
CPU_TORCH_PIP_ARGS ?=
CPU_VENV ?= .venv-cpu-torch
CPU_BUILD := build/cpu-torch
test-cpu-torch:
	test -x $(CPU_VENV)/bin/python || python3 -m venv $(CPU_VENV)
	$(CPU_VENV)/bin/python -m pip install -q $(CPU_TORCH_PIP_ARGS) "torch==$(CPU_TORCH_VERSION)" pytest numpy expecttest hypothesis setuptools
	$(CPU_VENV)/bin/python -c "import sys, torch; sys.exit(None if torch.version.cuda is None else \
	    f'test-cpu-torch wants a CPU-only torch, got {torch.__version__} (CUDA {torch.version.cuda}): rm -rf $(CPU_VENV), then run it again with CPU_TORCH_PIP_ARGS (see above)')"
	rm -rf $(CPU_BUILD)
	$(CPU_VENV)/bin/python setup.py -q build --build-base $(CPU_BUILD) --build-lib $(CPU_BUILD)/lib
	# pytest's own script, not python -m: the source tree must not shadow the build.
	LAYERNORM_EXT_EXPECT_CUDA=0 PYTHONPATH=$(abspath $(CPU_BUILD))/lib $(CPU_VENV)/bin/pytest -q -p no:cacheprovider \
	    tests/test_autograd_graph.py tests/test_ops.py tests/test_transforms.py tests/test_module.py \
	    tests/test_decompositions.py

# The CPU microbenchmark's full sweep (bench/bench_layernorm.py --help for the options).
.PHONY: bench
bench: setup
	$(PY) bench/bench_layernorm.py --malloc-tuned
