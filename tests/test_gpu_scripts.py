"""The GPU scripts' parts that run without a GPU: scripts/gpu_check.py reports a step that
its time budget leaves out as left out (SKIP, the check incomplete), not as a failed
step; the patches scripts/gpu_ab.py compares against still apply to the tree.

On an H200 (2026-12-04) the sanitizer steps found no time left in a short budget and were
reported as "FAIL ... the workload did not pass", though none had run.
"""

from __future__ import annotations

import importlib.util
import shutil
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


def test_test_bench_and_host_steps_without_time_are_skipped(gpu_check):
    check = spent_check(gpu_check)
    tests = gpu_check.tests(check, sys.executable, 100, "", "cuda")
    bench = gpu_check.bench(check, sys.executable, Path("/nonexistent/prefix"), True, [])
    host = gpu_check.host_overhead(check, sys.executable, Path("/nonexistent/host.md"))
    assert [(s.status, s.out_of_time) for s in (tests, bench, host)] == [("SKIP", True)] * 3


def test_a_step_that_runs_is_not_out_of_time(gpu_check):
    check = gpu_check.Check(deadline=time.monotonic() + 120)
    step = gpu_check.Step("echo")
    assert check.run(step, [sys.executable, "-c", "print('ran')"], 60) == 0
    assert not step.out_of_time and "ran" in step.output


# scripts/gpu_ab.py times the tree against the tree with each of these patches applied:
# a patch that no longer applies would cost a GPU session its A/B.
AB_PATCHES = sorted((SCRIPT.parents[1] / "bench" / "ab").glob("*.patch"))


@pytest.fixture(scope="module")
def gpu_ab():
    spec = importlib.util.spec_from_file_location("gpu_ab", SCRIPT.parent / "gpu_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("patch", AB_PATCHES, ids=lambda p: p.stem)
def test_ab_patch_changes_the_tree(gpu_ab, patch, tmp_path):
    """Applied as gpu_ab.py does, to a copy of csrc/ (here inside this repository's
    working tree when tmp_path is: the case where a plain git apply changes nothing)."""
    shutil.copytree(SCRIPT.parents[1] / "csrc", tmp_path / "csrc")
    applied = gpu_ab.apply_patch(patch, tmp_path)
    assert applied.returncode == 0, applied.stderr
    files = gpu_ab.patched_files(patch)
    assert files and all((tmp_path / f).read_bytes() != (SCRIPT.parents[1] / f).read_bytes()
                         for f in files)


def test_ab_patches_exist():
    assert {p.stem for p in AB_PATCHES} >= {"forward-block-per-row-group",
                                            "forward-no-huge-slices",
                                            "backward-one-pack-a-batch"}
