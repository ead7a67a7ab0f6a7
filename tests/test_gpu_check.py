"""scripts/gpu_check.py's bookkeeping, which runs without a GPU: a step that its time budget
leaves out is reported as left out (SKIP, the check incomplete), not as a failed step.

On an H200 (2026-12-04) the sanitizer steps found no time left in a short budget and were
reported as "FAIL ... the workload did not pass", though none had run.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def spent_check(gpu_check):
    return gpu_check.Check(deadline=time.monotonic())  # no time left


@pytest.mark.parametrize("tool", ["memcheck", "initcheck"])
def test_sanitizer_step_without_time_is_skipped_not_failed(gpu_check, tool):
    step = gpu_check.sanitizer(spent_check(gpu_check), sys.executable, tool, sys.executable,
                               kernel_filter=True)
    assert (step.status, step.out_of_time) == ("SKIP", True), step
    assert step.summary == "no time left in the budget"


def test_test_and_bench_steps_without_time_are_skipped(gpu_check):
    check = spent_check(gpu_check)
    tests = gpu_check.tests(check, sys.executable, 100, "", "cuda")
    bench = gpu_check.bench(check, sys.executable, Path("/nonexistent/prefix"), True, [])
    assert [(s.status, s.out_of_time) for s in (tests, bench)] == [("SKIP", True)] * 2


def test_a_step_that_runs_is_not_out_of_time(gpu_check):
    check = gpu_check.Check(deadline=time.monotonic() + 120)
    step = gpu_check.Step("echo")
    assert check.run(step, [sys.executable, "-c", "print('ran')"], 60) == 0
    assert not step.out_of_time and "ran" in step.output
