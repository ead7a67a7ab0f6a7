"""Shared fixtures: every test is written once and runs per device."""

from __future__ import annotations

import pytest
import torch

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
