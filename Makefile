# A newcomer's two commands (README.md): `make train` and `make test`.
# Both create .venv, install torch and the dev tools, build the extension when a source
# changed, then run the main job or the test suite. Re-running is cheap (stamp files).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
SOURCES := setup.py $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')
export MAX_JOBS ?= 2

.PHONY: setup train test clean gpu-check test-cpu-torch test-image-torch test-sanitize

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

# Builds the extension against another venv's torch, outside the source tree (the main
# build stays), then runs the API tests on that build with pytest's own script (with
# python -m the source tree would shadow the build).
# $(call build_and_test,venv,build dir,LAYERNORM_EXT_EXPECT_CUDA)
OTHER_TORCH_TESTS := tests/test_autograd_graph.py tests/test_ops.py tests/test_transforms.py \
    tests/test_module.py tests/test_decompositions.py tests/test_eager_entry.py
define build_and_test
	rm -rf $(2)
	$(1)/bin/python setup.py -q build --build-base $(2) --build-lib $(2)/lib
	LAYERNORM_EXT_EXPECT_CUDA=$(3) PYTHONPATH=$(abspath $(2))/lib $(1)/bin/pytest -q \
	    -p no:cacheprovider $(OTHER_TORCH_TESTS)
endef

# The CPU-only build path against another torch: torch 2.13.0's CPU-only wheel (no
# CUDA, an older autograd API), then the API tests on it. Run by .ci/run after `make test`.
# PyPI's Linux torch has CUDA; elsewhere than here pass
# CPU_TORCH_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
CPU_TORCH_VERSION ?= 2.13.0
CPU_TORCH_PIP_ARGS ?=
CPU_VENV ?= .venv-cpu-torch
test-cpu-torch:
	test -x $(CPU_VENV)/bin/python || python3 -m venv $(CPU_VENV)
	$(CPU_VENV)/bin/python -m pip install -q $(CPU_TORCH_PIP_ARGS) "torch==$(CPU_TORCH_VERSION)" pytest numpy expecttest hypothesis setuptools
	$(CPU_VENV)/bin/python -c "import sys, torch; sys.exit(None if torch.version.cuda is None else \
	    f'test-cpu-torch wants a CPU-only torch, got {torch.__version__} (CUDA {torch.version.cuda}): rm -rf $(CPU_VENV), then run it again with CPU_TORCH_PIP_ARGS (see above)')"
	$(call build_and_test,$(CPU_VENV),build/cpu-torch,0)

# The torch of the GPU machines' image (2.11.0, CUDA 13.0 wheel): the CPU and CUDA
# kernels built against it, then the API tests on the CPU. Run it by hand after changing
# the C++ that talks to torch: a build that breaks there costs a GPU session its build
# step (the build broke there three times, once on the H200). Not run by .ci/run: the
# wheel and its CUDA libraries (~5 GB) come from the package index, not this machine's
# local copy (here: 2 minutes to install, 6 to build, 2 to test).
IMAGE_TORCH_VERSION ?= 2.11.0
IMAGE_VENV ?= .venv-image-torch
test-image-torch:
	test -x $(IMAGE_VENV)/bin/python || python3 -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q "torch==$(IMAGE_TORCH_VERSION)" pytest numpy expecttest hypothesis setuptools ninja
	$(call build_and_test,$(IMAGE_VENV),build/image-torch,1)

# The C++ under gcc's AddressSanitizer and UndefinedBehaviorSanitizer: the CPU kernels,
# checks and autograd (a CPU-only build in build/sanitize), the CUDA kernels on their CPU
# emulator and their host replay (the tests build both with the same flags), through the
# tests that run them; then the CPU kernels' tests again on the lower x86 instruction sets
# (ATen's capability picks ours). A report aborts the run. Python is not instrumented: it
# preloads the runtime (and libstdc++, which ASan must find loaded). Not run by .ci/run
# (about 30 minutes on 2 cores, half of it the emulator); run it after changing csrc/.
SANITIZE ?= address,undefined
SANITIZE_BUILD := build/sanitize
SANITIZE_TESTS ?= tests/test_ops.py tests/test_fuzz.py tests/test_rms_norm.py \
    tests/test_extreme_values.py tests/test_extreme_sizes.py tests/test_cpu_paths.py \
    tests/test_bad_input.py tests/test_errors.py tests/test_module.py \
    tests/test_autograd_graph.py tests/test_transforms.py tests/test_concurrency_and_leaks.py \
    tests/test_patch.py tests/test_dtensor.py tests/test_decompositions.py \
    tests/test_cuda_emulated.py tests/test_cuda_static.py::test_host_replay_of_indexing_and_reductions
# gcc's ASan does not check AVX-512 masked loads and stores or non-temporal stores (builtins,
# not memory accesses): AVX2 and DEFAULT load and store partial vectors through memcpy and
# plain stores, which it does check; test_cpu_paths.py streams every output.
SANITIZE_ISA_TESTS ?= tests/test_ops.py tests/test_fuzz.py tests/test_rms_norm.py \
    tests/test_extreme_values.py tests/test_cpu_paths.py
# allocator_may_return_null: some bad-input cases ask for more than ASan's largest block.
# --capture=sys: a report, written to fd 2 as the process aborts, reaches the terminal
# (pytest's default capture of fd 2 would swallow it with the process).
SANITIZE_PYTEST = LD_PRELOAD="$$($${CXX:-c++} -print-file-name=libasan.so) $$($${CXX:-c++} -print-file-name=libstdc++.so)" \
    ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1 \
    LAYERNORM_EXT_SANITIZE=$(SANITIZE) LAYERNORM_EXT_EXPECT_CUDA=0 \
    PYTHONPATH=$(abspath $(SANITIZE_BUILD))/lib $(VENV)/bin/pytest -q -p no:cacheprovider --capture=sys
test-sanitize: setup
	LAYERNORM_EXT_CPU_ONLY=1 LAYERNORM_EXT_SANITIZE=$(SANITIZE) $(PY) setup.py -q build \
	    --build-base $(SANITIZE_BUILD) --build-lib $(SANITIZE_BUILD)/lib
	$(SANITIZE_PYTEST) $(SANITIZE_TESTS)
	for isa in avx2 default; do \
	    ATEN_CPU_CAPABILITY=$$isa $(SANITIZE_PYTEST) $(SANITIZE_ISA_TESTS) || exit 1; done

# The CPU microbenchmark's full sweep (bench/bench_layernorm.py --help for the options).
.PHONY: bench
bench: setup
	$(PY) bench/bench_layernorm.py --malloc-tuned
