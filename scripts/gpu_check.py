#!/usr/bin/env python3
"""One-command check of layernorm_ext on a machine with a CUDA GPU (no network needed).

Steps, each with a time limit inside an overall budget (default 9.5 minutes):
  1. build the extension in place for sm_80, sm_90 and the visible GPU;
  2. run the whole test suite (CUDA tests included; a CPU-only build fails);
  3. run compute-sanitizer memcheck, racecheck, synccheck and initcheck over
     scripts/cuda_sanitizer_workload.py (every CUDA kernel variant, small shapes);
  4. time the seed shape's host cost per call (bench/host_overhead.py, ~10 s:
     bench/results/<gpu>-host-overhead.md), then run the benchmark sweep
     (bench/bench_layernorm.py --device cuda), which writes bench/results/<gpu>.md, .csv
     and .png.
It writes bench/results/<gpu>-check.txt (a summary table, then every step's command and
output) and exits 0 only when no step failed or was left out for want of time. Uses only
the standard library here; the steps run under a Python with a CUDA build of torch:
--python, else the project's .venv, else python3.

    make gpu-check            # or: python3 scripts/gpu_check.py [--quick] [--skip-bench]
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
WORKLOAD = ROOT / "scripts" / "cuda_sanitizer_workload.py"
# The reliability fuzz cases' CUDA half (issue 8), under memcheck and racecheck.
FUZZ_WORKLOAD = {"memcheck": ["--cases", "40"], "racecheck": ["--cases", "10"]}
FUZZ_SCRIPT = ROOT / "tests" / "fuzz_cuda_cases.py"
BENCH = ROOT / "bench" / "bench_layernorm.py"
HOST_OVERHEAD = ROOT / "bench" / "host_overhead.py"
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")

PROBE = """
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.is_available()}
if info["gpu"]:
    info["name"] = torch.cuda.get_device_name(0)
    info["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
print(json.dumps(info))
"""


@dataclass
class Step:
    name: str
    status: str = "SKIP"  # PASS, FAIL or SKIP
    out_of_time: bool = False  # skipped because the budget ran out: the check is incomplete
    seconds: float = 0.0
    summary: str = ""
    command: str = ""
    output: str = ""


class Interrupted(Exception):
    """The check was stopped from outside (SIGTERM)."""


@dataclass
class Check:
    deadline: float
    env: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    running: Optional[Step] = None  # the step whose command runs now

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: Step, cmd: list, limit: float, env: Optional[dict] = None) -> int:
        """Runs cmd from the repository root, echoing and recording its output; returns its
        exit status (124 when it was stopped at min(limit, the time left))."""
        timeout = min(limit, self.remaining() - 15)
        step.command = shlex.join(str(c) for c in cmd)
        print(f"\n=== {step.name}: {step.command}", flush=True)
        if timeout < 10:
            step.status, step.summary = "SKIP", "no time left in the budget"
            step.out_of_time = True
            return 124
        start = time.monotonic()
        self.running = step
        proc = None
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            if proc is None:
                return
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole process group it started
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, stop)
        lines = []
        try:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or self.env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", start_new_session=True)
            timer.start()
            for line in proc.stdout:
                sys.stdout.write(line)
                lines.append(line)
            rc = proc.wait()
        except BaseException:  # Interrupted (SIGTERM) or Ctrl-C: leave nothing running
            stop()
            step.seconds = time.monotonic() - start
            step.output = "".join(lines) + "\n[interrupted]\n"
            raise
        finally:
            timer.cancel()
        step.seconds = time.monotonic() - start
        step.output = "".join(lines)
        if timed_out.is_set():
            step.output += f"\n[stopped after {timeout:.0f} s]\n"
            return 124
        return rc


def slugify(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (as bench/machine.py names it)."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def probe_python(python: str) -> Optional[dict]:
    try:
        out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def choose_python(explicit: Optional[str]) -> tuple[str, dict]:
    candidates = [explicit] if explicit else [str(ROOT / ".venv" / "bin" / "python"), "python3",
                                              sys.executable]
    seen = []
    for python in dict.fromkeys(candidates):  # in order, without repeats
        if not python or not (Path(python).exists() or shutil.which(python)):
            continue
        info = probe_python(python)
        seen.append(f"{python}: {info or 'no torch'}")
        if info and info.get("gpu") and info.get("cuda"):
            return python, info
    raise SystemExit("gpu_check: no Python with a CUDA build of torch that sees a GPU:\n  "
                     + "\n  ".join(seen or ["(no candidate found)"]))


def find_tool(name: str) -> Optional[str]:
    """A CUDA tool on PATH, in CUDA_HOME, or in the usual install places."""
    found = shutil.which(name)
    if found:
        return found
    patterns = [os.path.join(os.environ[v], "bin", name) for v in ("CUDA_HOME", "CUDA_PATH")
                if os.environ.get(v)]
    patterns += [f"/usr/local/cuda/bin/{name}", f"/usr/local/cuda-*/bin/{name}",
                 f"/usr/local/cuda*/{name}/{name}", f"/opt/nvidia/*/{name}",
                 f"/opt/nvidia/*/*/{name}"]
    for pattern in patterns:
        for path in sorted(glob.glob(pattern), reverse=True):
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return None


def tool_version(path: Optional[str]) -> str:
    if not path:
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        lines = [l for l in out.stdout.splitlines() if l.strip()]
        return f"{path} ({lines[-1].strip() if lines else '?'})"
    except (OSError, subprocess.SubprocessError):
        return f"{path} (no version)"


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Must raise, not crash: an extension that carries a private libstdc++ crashes here.
ERROR_PATH_PROBE = """
import torch, layernorm_ext
try:
    torch.ops.layernorm_ext.forward(torch.randn(4, 8), [7], None, None, 1e-5)
except RuntimeError as e:
    print("error path ok:", str(e).splitlines()[0])
else:
    raise SystemExit("a bad shape did not raise")
"""


def system_compilers() -> Optional[dict]:
    """CC/CXX of the distribution's gcc, when they differ from the environment's."""
    cc, cxx = "/usr/bin/gcc", "/usr/bin/g++"
    if not (os.path.exists(cc) and os.path.exists(cxx)):
        return None
    if os.environ.get("CXX") in (None, "", cxx, "g++", "c++"):
        return None
    return {"CC": cc, "CXX": cxx}


LIBSTDCXX_PROBE = '#include <stdexcept>\nvoid probe() { throw std::runtime_error("probe"); }\n'


def links_libstdcxx_statically(cxx: str) -> bool:
    """Whether a shared library linked by `cxx` carries its own libstdc++ (setup.py then
    refuses the extension, after the whole build): a second or two to ask first."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        source, library = Path(tmp, "probe.cpp"), Path(tmp, "probe.so")
        source.write_text(LIBSTDCXX_PROBE)
        try:
            built = subprocess.run([cxx, "-shared", "-fPIC", str(source), "-o", str(library)],
                                   capture_output=True, timeout=60).returncode == 0
            dynamic = subprocess.run([readelf, "-d", str(library)], capture_output=True,
                                     text=True, timeout=60).stdout if built else ""
        except (OSError, subprocess.SubprocessError):
            return False
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    return bool(needed) and not any(name.startswith("libstdc++.so") for name in needed)


def build_compilers() -> dict:
    """CC/CXX for the build: the distribution's gcc when the environment's CXX links
    libstdc++ statically (as on the H200 image of 2026-12-04), else nothing to change."""
    fallback = system_compilers()
    if fallback and links_libstdcxx_statically(os.environ["CXX"]):
        return fallback
    return {}


def build(check: Check, python: str, info: dict) -> Step:
    step = Step("build")
    archs = ["8.0", "9.0"] + ([info["capability"]] if info["capability"] not in ("8.0", "9.0")
                              else [])
    env = dict(check.env, TORCH_CUDA_ARCH_LIST=";".join(archs), MAX_JOBS=str(os.cpu_count() or 4))
    env.pop("LAYERNORM_EXT_CPU_ONLY", None)
    env.update(build_compilers())

    def run_part(name: str, cmd: list, limit: float, part_env: Optional[dict] = None) -> int:
        """One part of the step (the build, a retry, a probe), its output added to the
        step's, also when it is interrupted (the report then shows the build's output)."""
        part = Step(name)
        try:
            return check.run(part, cmd, limit, part_env)
        finally:
            step.command = step.command or part.command
            step.output += part.output
            step.seconds += part.seconds
            if part.out_of_time:
                step.status, step.summary, step.out_of_time = part.status, part.summary, True
            check.running = step

    # In place: nothing is installed, and the repository root is on the steps' PYTHONPATH.
    cmd = [python, "setup.py", "build_ext", "--inplace"]
    rc = run_part("build", cmd, 480, env)
    fallback = system_compilers()
    if (rc != 0 and not step.out_of_time and "links libstdc++ statically" in step.output
            and fallback and env.get("CXX") != fallback["CXX"]):
        # setup.py refused a compiler that links the C++ runtime in (see setup.py).
        shutil.rmtree(ROOT / "build", ignore_errors=True)
        env.update(fallback)
        step.output += f"\n[retried with CC={fallback['CC']} CXX={fallback['CXX']}]\n"
        rc = run_part("build, retried", cmd, 480, env)
    for name, code in (("build check", "import layernorm_ext, sys; sys.exit(0 if "
                        "layernorm_ext.has_cuda_kernels() else 'no CUDA kernels')"),
                       ("error path check", ERROR_PATH_PROBE)):
        if rc != 0 or step.out_of_time:
            break
        rc = run_part(name, [python, "-c", code], 120)
    if step.out_of_time:
        return step
    step.status = "PASS" if rc == 0 else "FAIL"
    step.summary = f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}" + (
        f", CXX={env['CXX']}" if env.get("CXX") else "") + (
        "" if rc == 0 else f", exit status {rc}")
    return step


def has_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def tests(check: Check, python: str, limit: float, marker: str, keyword: str) -> Step:
    step = Step("tests" + (f" (-m '{marker}')" if marker else "")
                + (f" (-k '{keyword}')" if keyword else ""))
    env = dict(check.env, LAYERNORM_EXT_EXPECT_CUDA="1")
    # -v names every test as it ends, so a step stopped at its limit still says which
    # tests failed; xdist and a per-test timeout when the Python has them.
    cmd = [python, "-m", "pytest", "-v", "-rfEs", "--durations=15", "-p", "no:cacheprovider"]
    if has_module(python, "xdist"):
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    if has_module(python, "pytest_timeout"):
        cmd += ["--timeout", "240"]
    if marker:
        cmd += ["-m", marker]
    if keyword:
        cmd += ["-k", keyword]
    rc = check.run(step, cmd + ["tests"], limit, env)
    if step.out_of_time:
        return step
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?)\s*=*$", step.output,
                         re.MULTILINE)
    failed = sorted(set(re.findall(r"(?:FAILED|ERROR) (tests/\S+)", step.output)))
    step.summary = summary[-1] if summary else f"exit status {rc}"
    if failed:
        step.summary += f"; failed: {', '.join(failed[:20])}" + (" ..." if len(failed) > 20 else "")
    # With a GPU, no CUDA test may be skipped for want of one.
    cuda_skips = len(re.findall(r"SKIPPED.*needs a CUDA GPU", step.output))
    if cuda_skips:
        step.summary += f"; {cuda_skips} CUDA tests skipped"
    step.status = "PASS" if rc == 0 and not cuda_skips else "FAIL"
    return step


def ours(report: str) -> bool:
    """Whether a sanitizer report is about one of our kernels (its lines before the host
    backtrace name the kernel)."""
    device_part = re.split(r"Host Frame|host backtrace", report, maxsplit=1)[0]
    return "layernorm_ext" in device_part


def sanitizer_reports(output: str) -> list:
    """The reports in compute-sanitizer output: blocks that start with a '========= X' line,
    other than its banner and summaries."""
    blocks = re.split(r"^(?=={9} \S)", output, flags=re.MULTILINE)
    return [b for b in blocks if b.startswith("=========") and not re.match(
        r"={9} (COMPUTE-SANITIZER|ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY)", b)]


def sanitizer(check: Check, python: str, tool: str, sanitizer_path: Optional[str],
              kernel_filter: bool, fuzz_args: Optional[list] = None) -> Step:
    """compute-sanitizer `tool` over the kernel-variant workload, or over the fuzz
    cases when `fuzz_args` is given."""
    step = Step(f"compute-sanitizer {tool}" + (" (fuzz)" if fuzz_args is not None else ""))
    if sanitizer_path is None:
        step.status, step.summary = "FAIL", "compute-sanitizer not found"
        return step
    # initcheck needs every kernel instrumented (torch's kernels initialize our inputs), and
    # then may report torch's own kernels: only reports about ours count. The other tools
    # look at our kernels only (much faster), and any report fails the step.
    cmd = [sanitizer_path, "--tool", tool, "--print-limit", "100"]
    if tool != "initcheck":
        cmd += ["--error-exitcode", "99"]
    filtered = cmd + ["--kernel-name", "kns=layernorm_ext"]
    workload = ([python, str(FUZZ_SCRIPT), *fuzz_args] if fuzz_args is not None
                else [python, str(WORKLOAD)])
    env = dict(check.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    use_filter = kernel_filter and tool != "initcheck"
    rc = check.run(step, (filtered if use_filter else cmd) + workload, 240, env)
    if step.out_of_time:
        return step
    if use_filter and rc not in (0, 124) and "cases passed" not in step.output:
        # This compute-sanitizer did not take the filter: run unfiltered.
        first = step.output
        rc = check.run(step, cmd + workload, 240, env)
        step.output = first + "\n[kernel filter refused; unfiltered run follows]\n" + step.output
        if step.out_of_time:
            return step
    reports = sanitizer_reports(step.output)
    mine = [r for r in reports if ours(r)]
    totals = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: .*", step.output)
    step.summary = totals[-1] if totals else f"exit status {rc}"
    if tool == "initcheck":
        step.summary += f"; {len(mine)} in layernorm_ext kernels"
    workload_ok = re.search(r"^(\d+)/\1 cases passed", step.output, re.MULTILINE)
    if not workload_ok:
        step.summary += "; the workload did not pass"
    if tool == "initcheck":
        failed = bool(mine) or not workload_ok or not totals
    else:
        failed = rc != 0 or bool(reports) or not workload_ok or not totals
    step.status = "FAIL" if failed else "PASS"
    return step


def bench(check: Check, python: str, prefix: Path, quick: bool, extra: list) -> Step:
    step = Step("benchmark")
    if not BENCH.exists():
        step.status = "SKIP"
        step.summary = f"{BENCH.relative_to(ROOT)} not found: no benchmark in this checkout"
        print(f"\n=== benchmark: {step.summary}", flush=True)
        return step
    # Both norms: the sweep also checks every contender's output against torch eager.
    cmd = [python, str(BENCH), "--device", "cuda", "--out", str(prefix), "--no-progress",
           "--norms", "layer,rms"]
    cmd += (["--quick"] if quick else []) + extra
    rc = check.run(step, cmd, 420)
    if step.out_of_time:
        return step
    if rc == 124:  # stopped at its limit: the sweep rewrites its report after every shape
        step.status, step.out_of_time = "SKIP", True
        step.summary = "stopped at its time limit; its report holds the shapes it finished"
        return step
    written = re.findall(r"^wrote (\S+)", step.output, re.MULTILINE)
    step.status = "PASS" if rc == 0 else "FAIL"
    step.summary = ("wrote " + ", ".join(Path(p).name for p in written)) if written else (
        f"exit status {rc}")
    return step


def host_overhead(check: Check, python: str, out: Path) -> Step:
    """The seed shape's host time per call, ours against eager's (bench/host_overhead.py):
    on the GPUs so far 100x20 ran slower than eager, with the GPU waiting for the host."""
    step = Step("host overhead")
    cmd = [python, str(HOST_OVERHEAD), "--device", "cuda", "--out", str(out)]
    rc = check.run(step, cmd, 60)
    if step.out_of_time:
        return step
    step.status = "PASS" if rc == 0 else "FAIL"
    step.summary = f"wrote {out.name}" if rc == 0 else f"exit status {rc}"
    return step


def write_report(path: Path, header: list, steps: list) -> None:
    lines = ["# layernorm_ext GPU check", ""] + header + ["", "| step | result | time | summary |",
                                                        "| --- | --- | --- | --- |"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} s | {s.summary} |" for s in steps]
    for s in steps:
        lines += ["", f"## {s.name}: {s.status}", "", f"$ {s.command}" if s.command else "", "",
                  s.output.rstrip()]
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 scripts/gpu_check.py",
        description="Build layernorm_ext for the visible GPU, run the tests on CUDA, "
                    "compute-sanitizer and the benchmark; write bench/results/<gpu>-check.txt.")
    parser.add_argument("--python", help="Python with a CUDA build of torch for the steps "
                                         "(default: .venv/bin/python, else python3)")
    parser.add_argument("--budget", type=float, default=570,
                        help="seconds for the whole check (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the benchmark's --quick sweep")
    parser.add_argument("--bench-args", default="",
                        help="more arguments for bench/bench_layernorm.py, one string")
    parser.add_argument("--tests-limit", type=float, default=360,
                        help="seconds for the test step (default: %(default)s)")
    parser.add_argument("--tests-marker", default="",
                        help="pytest -m expression for the test step, e.g. 'not slow'")
    parser.add_argument("--tests-k", default="cuda and not emulated",
                        help="pytest -k expression for the test step (default: the CUDA cases "
                             "and CUDA test files but the CPU emulator's; CI runs the CPU ones "
                             "and the emulator); '' for all")
    for name in ("build", "tests", "sanitizer", "bench"):
        parser.add_argument(f"--skip-{name}", action="store_true", help=f"skip the {name} step")
    args = parser.parse_args(argv)

    started = time.monotonic()
    python, info = choose_python(args.python)
    slug = slugify(info["name"])
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    report = RESULTS_DIR / f"{slug}-check.txt"
    nvcc = find_tool("nvcc")
    sanitizer_path = find_tool("compute-sanitizer")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # CUDA_HOME is left to setup.py, which asks nvcc itself (nvcc may be a wrapper script).
    check = Check(deadline=started + args.budget, env=env)
    kernel_filter = False
    if sanitizer_path:
        helptext = subprocess.run([sanitizer_path, "--help"], capture_output=True, text=True,
                                  timeout=60).stdout
        kernel_filter = "--kernel-name" in helptext
    header = [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- revision: {git_revision()}",
        f"- GPU: {info['name']} (compute capability {info['capability']})",
        f"- python: {python}, torch {info['torch']} (CUDA {info['cuda']})",
        f"- nvcc: {tool_version(nvcc)}",
        f"- compute-sanitizer: {tool_version(sanitizer_path)}",
    ]
    print("\n".join(header), flush=True)

    def save(note: str = "") -> list:
        """The report as it stands: rewritten after every step, so that a check stopped
        from outside (SIGTERM, e.g. by `timeout`) keeps what it did."""
        unrun = [s.name for s in check.steps if s.out_of_time]
        lines = ([f"- INCOMPLETE: no time left in the budget for {', '.join(unrun)}"]
                 if unrun else []) + ([f"- {note}"] if note else [])
        write_report(report, header + [f"- total: {time.monotonic() - started:.0f} s"] + lines,
                     check.steps)
        return lines

    def add(step: Step) -> Step:
        check.steps.append(step)
        save("in progress")
        return step

    def interrupted(signum, frame):
        raise Interrupted(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    note = ""
    try:
        run_steps(check, args, python, info, add, sanitizer_path, kernel_filter, slug)
    except (Interrupted, KeyboardInterrupt) as stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the report
        note = f"INTERRUPTED: {stop or 'Ctrl-C'}"
        if check.running is not None and check.running not in check.steps:
            check.running.status, check.running.out_of_time = "SKIP", True
            check.running.summary = "interrupted while it ran (its output so far below)"
            check.steps.append(check.running)
    steps = check.steps
    incomplete = save(note)

    print("\n=== summary")
    for s in steps:
        print(f"{s.status:4}  {s.name:28} {s.seconds:5.0f} s  {s.summary}")
    print("\n".join(incomplete))
    print(f"wrote {report} ({time.monotonic() - started:.0f} s in all)")
    return 1 if incomplete or any(s.status == "FAIL" for s in steps) else 0


def run_steps(check: Check, args: argparse.Namespace, python: str, info: dict, add,
              sanitizer_path: Optional[str], kernel_filter: bool, slug: str) -> None:
    """The steps in order, each passed to add() as it ends."""
    if not args.skip_build and add(build(check, python, info)).status != "PASS":
        print("\nno build: the remaining steps need it", flush=True)
        return
    if not args.skip_tests:
        add(tests(check, python, args.tests_limit, args.tests_marker, args.tests_k))
    if not args.skip_sanitizer:
        for tool in SANITIZER_TOOLS:
            add(sanitizer(check, python, tool, sanitizer_path, kernel_filter))
        for tool, fuzz_args in FUZZ_WORKLOAD.items():
            add(sanitizer(check, python, tool, sanitizer_path, kernel_filter, fuzz_args))
    if not args.skip_bench:
        add(host_overhead(check, python, RESULTS_DIR / f"{slug}-host-overhead.md"))
        add(bench(check, python, RESULTS_DIR / slug, args.quick, shlex.split(args.bench_args)))


if __name__ == "__main__":
    sys.exit(main())
