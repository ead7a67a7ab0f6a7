"""The GPU scripts' parts that run without a GPU: scripts/gpu_check.py reports a step that
its time budget leaves out as left out (SKIP, the check incomplete), not as a failed
step, keeps its report when stopped from outside, and picks its compiler before the
build; scripts/gpu_ab.py plans its sweeps within the budget, and the patches it compares
against still apply to the tree.

On an H200 (2026-12-04) the sanitizer steps found no time left in a short budget and were
reported as "FAIL ... the workload did not pass", though none had run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import threading
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


def terminate_once_exists(path: Path, seconds: float = 60) -> None:
    """SIGTERM to this process, from a thread, once `path` exists (the command that
    writes it has started and printed), as `timeout` would send it."""
    def wait_and_terminate() -> None:
        deadline = time.monotonic() + seconds
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # its output on the way
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_and_terminate, daemon=True).start()


def assert_ends(pid: int, seconds: float = 10) -> None:
    """The process ends (or is a zombie, killed and not yet reaped) within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError):  # reaped, even between two reads
            return
        if state == "Z":
            return
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.1)


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


def test_ab_sweeps_that_fit_the_budget_start_with_the_baseline(gpu_ab):
    """Chosen once, after the builds: a short budget drops the last patches, never the
    baseline (a share of the time left per sweep had skipped the first variants and given
    their time to the last ones)."""
    variants = [gpu_ab.BASELINE, "a", "b", "c"]
    assert gpu_ab.sweeps_that_fit(variants, 3 * gpu_ab.MIN_SWEEP_SECONDS - 1) == variants[:2]
    assert gpu_ab.sweeps_that_fit(variants, 10 * gpu_ab.MIN_SWEEP_SECONDS) == variants
    assert gpu_ab.sweeps_that_fit(variants, gpu_ab.MIN_SWEEP_SECONDS - 1) == []


def test_ab_summary_lists_variants_not_run_yet(gpu_ab, tmp_path):
    """ab.md is rewritten after each sweep: with the later variants' results missing."""
    args = gpu_ab.argparse.Namespace(out=tmp_path, bench_args="--contenders ext", device="cuda")
    key = ("layer", "fwd", "float32", "1024x768")
    table = gpu_ab.write_summary(args, [gpu_ab.BASELINE, "a"], {gpu_ab.BASELINE: {key: (9.5, 80)}},
                                 {gpu_ab.BASELINE: "ok"})
    text = (tmp_path / "ab.md").read_text()
    assert "- a: pending" in text and "| 9.5 (80) | - | - |" in table


requires_gcc = pytest.mark.skipif(not (shutil.which("g++") and shutil.which("readelf")),
                                  reason="needs g++ and readelf")


@requires_gcc
def test_a_compiler_that_links_libstdcxx_statically_is_replaced_before_the_build(
        gpu_check, tmp_path, monkeypatch):
    """The H200 image's CXX linked libstdc++ into the extension, and setup.py refused it
    only after the whole build; the scripts now ask the compiler first."""
    static_cxx = tmp_path / "static-g++"
    static_cxx.write_text(f'#!/bin/sh\nexec {shutil.which("g++")} -static-libstdc++ "$@"\n')
    static_cxx.chmod(0o755)
    assert gpu_check.links_libstdcxx_statically(str(static_cxx))
    assert not gpu_check.links_libstdcxx_statically(shutil.which("g++"))
    monkeypatch.setenv("CXX", shutil.which("g++"))
    assert gpu_check.build_compilers() == {}
    monkeypatch.setenv("CXX", str(static_cxx))
    fallback = gpu_check.system_compilers()
    if fallback is None:
        pytest.skip("no /usr/bin/gcc and /usr/bin/g++ to fall back to")
    assert gpu_check.build_compilers() == fallback
    assert not gpu_check.links_libstdcxx_statically(fallback["CXX"])


def test_a_stopped_check_keeps_its_report_and_ends_the_running_command(
        gpu_check, tmp_path, monkeypatch):
    """SIGTERM (from `timeout`, or a device call's limit) during a step: the command's
    process group is killed, and the report lists the steps done and the interrupted one
    with its output so far."""
    info = {"name": "Test GPU", "capability": "9.0", "torch": "test", "cuda": "13.0"}
    monkeypatch.setattr(gpu_check, "choose_python", lambda explicit: (sys.executable, info))
    monkeypatch.setattr(gpu_check, "find_tool", lambda name: None)
    monkeypatch.setattr(gpu_check, "RESULTS_DIR", tmp_path)
    pid_file = tmp_path / "pid"
    sleeper = ("import os, time; open(%r, 'w').write(str(os.getpid())); print('working', "
               "flush=True); time.sleep(60)" % str(pid_file))

    def run_steps(check, args, python, info, add, *rest):
        done = gpu_check.Step("first", status="PASS", summary="done")
        add(done)
        terminate_once_exists(pid_file)
        check.run(gpu_check.Step("second"), [sys.executable, "-c", sleeper], 50)
        raise AssertionError("not interrupted")

    monkeypatch.setattr(gpu_check, "run_steps", run_steps)
    previous = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    try:
        assert gpu_check.main([]) == 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert time.monotonic() - started < 30
    report = (tmp_path / "test-gpu-check.txt").read_text()
    assert "INTERRUPTED: stopped by signal" in report
    assert "| first | PASS |" in report and "| second | SKIP |" in report
    assert "working" in report and "[interrupted]" in report
    assert_ends(int(pid_file.read_text()))


def test_a_build_stopped_in_its_probe_is_reported_with_the_build_output(
        gpu_check, tmp_path, monkeypatch):
    """The build step runs parts (the build, a retry, probes of the result): stopped in
    one, the report shows the build step with every part's output so far."""
    fake_python = tmp_path / "python"
    started = tmp_path / "probing"
    fake_python.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo probing; '
                           f'touch {started}; sleep 60; else echo compiling; fi\n')
    fake_python.chmod(0o755)
    info = {"name": "Test GPU", "capability": "9.0", "torch": "test", "cuda": "13.0"}
    monkeypatch.setattr(gpu_check, "choose_python", lambda explicit: (str(fake_python), info))
    monkeypatch.setattr(gpu_check, "find_tool", lambda name: None)
    monkeypatch.setattr(gpu_check, "RESULTS_DIR", tmp_path)
    monkeypatch.delenv("CXX", raising=False)
    previous = signal.getsignal(signal.SIGTERM)
    terminate_once_exists(started)
    try:
        assert gpu_check.main(["--skip-tests", "--skip-sanitizer", "--skip-bench"]) == 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = (tmp_path / "test-gpu-check.txt").read_text()
    assert "| build | SKIP |" in report and "build check" not in report
    assert "compiling" in report and "probing" in report and "[interrupted]" in report


def test_ab_command_stopped_at_its_limit_takes_its_children_along(gpu_ab, tmp_path):
    """A build or sweep stopped at its share: the compilers it started must not run on
    into the next variant's timings."""
    pid_file = tmp_path / "child"
    code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); open(%r, 'w').write(str(child.pid)); "
            "time.sleep(60)" % str(pid_file))
    started = time.monotonic()
    rc = gpu_ab.run([sys.executable, "-c", code], tmp_path, dict(os.environ), 3,
                    tmp_path / "log")
    assert rc == 124 and time.monotonic() - started < 30
    assert "[stopped after 3 s]" in (tmp_path / "log").read_text()
    assert_ends(int(pid_file.read_text()))
