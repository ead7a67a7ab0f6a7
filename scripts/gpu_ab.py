#!/usr/bin/env python3
"""A/B of kernel designs on one GPU, in one command: the tree as it is against the same tree
with each patch applied (bench/ab/*.patch: a design choice undone), built side by side for
the visible GPU and timed by the same benchmark shapes one variant after the other.

Each variant is a copy of the tree under --work (the repository itself is not touched),
built in place for the GPU's compute capability alone. The benchmark runs in every
variant's copy and writes OUT/<variant>.{md,csv,png}; the last lines printed are a table
of layernorm_ext's median time and % of the copy roof per shape and variant (the roof is
measured in each variant's own run, so the % columns compare across runs; the other
contenders are left out: --contenders ext). The sweeps that fit the budget after the
builds are chosen up front: the baseline first, then the patches in the order given.
OUT/ab.md is rewritten after every sweep. Uses only the standard library here; the steps
run under --python (default python3).

    python3 scripts/gpu_ab.py --out /tmp/ab-out \\
        --bench-args "--contenders ext --passes fwd --dtypes float32 --shapes 524288x128"
    python3 scripts/gpu_ab.py --patches bench/ab/forward-no-huge-slices.patch ...
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported from elsewhere
from gpu_check import build_compilers, probe_python  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "as-is"
# Not copied into a variant: build outputs, environments, results, git metadata.
IGNORED = shutil.ignore_patterns(".git", ".venv*", "build", "*.so", "__pycache__", "results",
                                 "*.egg-info", ".pytest_cache", "out", ".whl", ".gl")


def run(cmd: list, cwd: Path, env: dict, timeout: float, log: Path) -> int:
    """cmd in cwd, its output in log; the exit status (124 when stopped at timeout, with
    every process it started: compilers left running would slow the later sweeps)."""
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(str(c) for c in cmd)}\n")
        out.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write(f"\n[stopped after {timeout:.0f} s]\n")
            return 124


def prepare(name: str, patch: Optional[Path], work: Path) -> Path:
    """A copy of the tree under work/name, with the patch applied."""
    dest = work / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT, dest, ignore=IGNORED)
    if patch is not None:
        applied = apply_patch(patch, dest)
        if applied.returncode != 0:
            raise SystemExit(f"gpu_ab: {patch} does not apply: {applied.stderr.strip()}")
        unchanged = [f for f in patched_files(patch) if (dest / f).read_bytes() ==
                     (ROOT / f).read_bytes()]
        if unchanged:
            raise SystemExit(f"gpu_ab: {patch} left {', '.join(unchanged)} unchanged")
    return dest


def apply_patch(patch: Path, tree: Path) -> subprocess.CompletedProcess:
    """git apply in `tree`, as a plain directory: inside another git working tree, git
    would take paths from that tree's root and skip the others, and still succeed."""
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.resolve().parent))
    return subprocess.run(["git", "apply", str(patch.resolve())], cwd=tree, env=env,
                          capture_output=True, text=True)


def patched_files(patch: Path) -> list:
    """The files a patch changes ("+++ b/<path>" lines)."""
    return [line[6:].strip() for line in patch.read_text().splitlines()
            if line.startswith("+++ b/")]


def ext_rows(csv_path: Path) -> dict:
    """(norm, pass, dtype, MxN) -> (median µs, % roof) of layernorm_ext in a sweep's CSV."""
    rows = {}
    if not csv_path.exists():
        return rows
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            if r["contender"] == "layernorm_ext":
                key = (r.get("norm", "layer"), r["pass"], r["dtype"], f"{r['M']}x{r['N']}")
                rows[key] = (float(r["median_us"]), float(r["pct_roof"]))
    return rows


def table(names: list, results: dict) -> str:
    """Markdown: one line per shape, µs and % roof per variant, time ratio to the baseline."""
    keys = sorted({k for rows in results.values() for k in rows},
                  key=lambda k: (k[0], k[1], k[2], int(k[3].split("x")[1])))
    head = ["norm", "pass", "dtype", "MxN"] + [f"{n} µs (% roof)" for n in names]
    head += [f"{n} / {BASELINE}" for n in names if n != BASELINE]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key in keys:
        cells = list(key)
        for n in names:
            us_pct = results.get(n, {}).get(key)
            cells.append(f"{us_pct[0]:.1f} ({us_pct[1]:.0f})" if us_pct else "-")
        base = results.get(BASELINE, {}).get(key)
        for n in names:
            if n == BASELINE:
                continue
            other = results.get(n, {}).get(key)
            cells.append(f"{other[0] / base[0]:.2f}" if base and other else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MIN_SWEEP_SECONDS = 30


def sweeps_that_fit(runnable: list, seconds: float) -> list:
    """The variants to sweep in `seconds`: as many as get MIN_SWEEP_SECONDS each, the
    first ones (the baseline, then the patches in their order)."""
    return runnable[:max(0, int(seconds // MIN_SWEEP_SECONDS))]


def write_summary(args: argparse.Namespace, names: list, results: dict, status: dict) -> str:
    """ab.md: each variant's status (those not run yet: pending), then the table."""
    summary = table(names, results)
    (args.out / "ab.md").write_text(
        f"# A/B: {', '.join(names)}\n\nbench args: `{args.bench_args}`, device {args.device}\n\n"
        + "\n".join(f"- {n}: {status.get(n, 'pending')}" for n in names) + "\n\n"
        + summary + "\n")
    return summary


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 scripts/gpu_ab.py",
        description="Build the tree as it is and with each patch applied, time the same "
                    "benchmark shapes in each, and print them side by side.")
    parser.add_argument("--patches", nargs="*", type=Path,
                        default=sorted((ROOT / "bench" / "ab").glob("*.patch")),
                        help="patches to compare against the tree (default: bench/ab/*.patch)")
    parser.add_argument("--bench-args", default="--contenders ext --norms layer --passes "
                        "fwd,bwd --dtypes float32,bfloat16 --reps 7 --warmup 1",
                        help="arguments for bench/bench_layernorm.py (default: %(default)s)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a CPU-only build and sweep, to try this script without a "
                             "GPU (the patches only change CUDA code)")
    parser.add_argument("--python", default="python3", help="Python with torch (default: python3)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/layernorm_ext_ab"),
                        help="where the variants' copies are built (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ab",
                        help="the sweeps and build logs (default: bench/results/ab)")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds for everything; a sweep that would start past it is "
                             "left out (default: %(default)s)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    # Absolute: the steps run in the variants' copies.
    args.python = str(Path(shutil.which(args.python) or args.python).absolute())
    names = [BASELINE] + [p.stem for p in args.patches]
    if len(set(names)) != len(names):
        raise SystemExit("gpu_ab: two variants with one name")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:  # an earlier run's files must not pass for this run's
        for suffix in (".csv", ".md", ".png", "-build.log", "-bench.log"):
            (args.out / f"{name}{suffix}").unlink(missing_ok=True)
    (args.out / "ab.md").unlink(missing_ok=True)
    dirs = {BASELINE: prepare(BASELINE, None, args.work)}
    for patch in args.patches:
        dirs[patch.stem] = prepare(patch.stem, patch.resolve(), args.work)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(build_compilers())  # as gpu_check's build: a CXX setup.py would refuse
    if args.device == "cuda":
        info = probe_python(args.python)
        if not (info and info.get("gpu")):
            raise SystemExit("gpu_ab: no GPU visible to " + args.python)
        env.update(TORCH_CUDA_ARCH_LIST=info["capability"])
        env.pop("LAYERNORM_EXT_CPU_ONLY", None)
    else:
        env.update(LAYERNORM_EXT_CPU_ONLY="1")
    jobs = max(1, (os.cpu_count() or 2) // len(names))
    env.update(MAX_JOBS=str(jobs))

    def build(name: str) -> int:
        return run([args.python, "setup.py", "build_ext", "--inplace"], dirs[name], env,
                   args.budget, args.out / f"{name}-build.log")

    # Builds in parallel (they share the cores), sweeps one after the other.
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        built = dict(zip(names, pool.map(build, names)))
    print(f"built in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{n} {'ok' if rc == 0 else f'FAILED ({rc})'}" for n, rc in built.items()),
          flush=True)

    # The sweeps that fit, decided once: the baseline first, then the patches in the order
    # given, each with an equal share of the time left (a sweep stopped at its share keeps
    # the shapes it finished).
    runnable = [n for n in names if built[n] == 0]
    left = args.budget - (time.monotonic() - started)
    chosen = sweeps_that_fit(runnable, left)
    results, status = {}, {}
    for name in names:
        if built[name] != 0:
            status[name] = "build failed: " + str(args.out / f"{name}-build.log")
        elif name not in chosen:
            status[name] = "no time left in the budget"
        else:
            todo = len(chosen) - chosen.index(name)
            share = (args.budget - (time.monotonic() - started)) / todo
            cmd = [args.python, "bench/bench_layernorm.py", "--device", args.device,
                   "--no-progress", "--out", args.out / name, *shlex.split(args.bench_args)]
            rc = run(cmd, dirs[name], dict(env, PYTHONPATH=str(dirs[name])), share,
                     args.out / f"{name}-bench.log")
            status[name] = "ok" if rc == 0 else f"sweep exit status {rc} (partial results kept)"
        results[name] = ext_rows(args.out / f"{name}.csv")
        print(f"{name}: {status[name]}", flush=True)
        write_summary(args, names, results, status)  # after each: a stopped run keeps it

    print(write_summary(args, names, results, status))
    print(f"wrote {args.out / 'ab.md'} ({time.monotonic() - started:.0f} s in all)")
    return 0 if all(s == "ok" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
