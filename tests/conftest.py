"""Shared fixtures: every test is written once and runs per device."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

# torch.compile's on-disk caches (AOTAutograd's, Inductor's) key a graph without the
# source of the ops' fake kernels: after a change to those, a graph compiled by an
# earlier run came back with that run's guards (a batch size specialized by an old
# fake). Each session compiles into its own directory (its subprocesses inherit it),
# removed at its end, unless the caller chose one.
_OWN_CACHE_DIR = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="layernorm_ext_tests_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _OWN_CACHE_DIR

import layernorm_ext

_CUDA_OK = torch.cuda.is_available() and layernorm_ext.has_cuda_kernels()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not _CUDA_OK, reason="needs a CUDA GPU and a CUDA build of layernorm_ext")),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def pytest_configure(config) -> None:
    # Slow tests run by default (CI included); deselect them with -m "not slow".
    config.addinivalue_line("markers", "slow: takes several seconds or many GB of memory")


def pytest_unconfigure(config) -> None:
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)
