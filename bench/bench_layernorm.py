"""LayerNorm microbenchmark: layernorm_ext against torch eager, torch.compile (and on CUDA
Liger-Kernel and apex), each against the memory roof measured in the same run; with
--norms rms (or layer,rms) also RMSNorm against F.rms_norm eager and compiled.

    python bench/bench_layernorm.py                   # full CPU sweep -> bench/results/<machine>.*
    python bench/bench_layernorm.py --malloc-tuned    # the same under tuned glibc malloc settings
    python bench/bench_layernorm.py --device cuda     # the GPU sweep
    python bench/bench_layernorm.py --quick --out /tmp/q
    python bench/bench_layernorm.py --norms layer,rms # LayerNorm and RMSNorm rows

LayerNorm is memory-bound, so each contender is judged by its effective bandwidth under the
byte model (forward 2*M*N*s, backward 3*M*N*s, forward+backward 5*M*N*s for s bytes per
element) against the bandwidth of a copy of the same byte count between preallocated
buffers. The sweep logic is importable (``bench.sweep.run_sweep``,
``bench.report.write_reports``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import machine
from bench.contenders import CONTENDER_KEYS, NORMS, select_contenders
from bench.sweep import (DTYPES, PASSES, QUICK_SHAPES, RESULTS_DIR, SEED_SHAPE, SWEEP_DIMS,
                         SweepConfig, SweepResult, run_sweep)

__all__ = ["SweepConfig", "SweepResult", "run_sweep", "main"]


def _parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(allowed)}")
    return items


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            rows, cols = (int(part) for part in item.lower().strip().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not MxN (e.g. 4096x768)") from None
        if rows < 1 or cols < 1:
            raise argparse.ArgumentTypeError(f"shape {item!r} must be positive")
        shapes.append((rows, cols))
    return shapes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python bench/bench_layernorm.py",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument("--norms", type=lambda s: _parse_list(s, NORMS, "norm"), default="layer",
                        help="comma-separated subset of layer,rms (LayerNorm, RMSNorm; "
                             "default: %(default)s)")
    parser.add_argument("--passes", type=lambda s: _parse_list(s, PASSES, "pass"),
                        default=",".join(PASSES), help="comma-separated subset of the default %(default)s")
    parser.add_argument("--dtypes", type=lambda s: _parse_list(s, tuple(DTYPES), "dtype"),
                        default=",".join(DTYPES), help="comma-separated subset of the default %(default)s")
    parser.add_argument("--shapes", type=_parse_shapes, default=None,
                        help="comma-separated MxN shapes instead of the default sweep "
                             f"({SEED_SHAPE[0]}x{SEED_SHAPE[1]} plus D in "
                             f"{','.join(map(str, SWEEP_DIMS))} at a size that leaves the caches)")
    parser.add_argument("--contenders",
                        type=lambda s: _parse_list(s, tuple(CONTENDER_KEYS), "contender"),
                        default=None,
                        help="comma-separated subset of " + ",".join(CONTENDER_KEYS)
                             + " (default: all that can run; the copy roof is always measured)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small shapes {', '.join(f'{m}x{n}' for m, n in QUICK_SHAPES)} and "
                             "few repetitions: a smoke run of under a minute")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed rounds per case (default 15, 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds per case, at least 1 (default 2, 1 with --quick)")
    parser.add_argument("--min-sample-ms", type=float, default=2.0,
                        help="a timed sample repeats a fast call until it lasts this long "
                             "(default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help="output prefix for PREFIX.md, PREFIX.csv, PREFIX.png "
                             "(default bench/results/<machine-name>)")
    parser.add_argument("--malloc-tuned", action="store_true",
                        help="re-run under glibc settings that keep freed memory for reuse ("
                             + " ".join(f"{k}={v}" for k, v in machine.TUNED_MALLOC_ENV.items())
                             + "), for all contenders alike")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, shown in the header)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, value, least in (("--reps", args.reps, 1), ("--warmup", args.warmup, 0),
                                 ("--threads", args.threads, 1),
                                 ("--min-sample-ms", args.min_sample_ms, 0)):
        if value is not None and value < least:
            parser.error(f"{option} must be at least {least}, got {value}")
    if args.malloc_tuned and not machine.malloc_is_tuned(dict(os.environ)):
        # glibc reads these once, at process start: run this script again under them.
        env = machine.tuned_malloc_env(dict(os.environ))
        script_args = list(argv) if argv is not None else sys.argv[1:]
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *script_args],
                  env)
    from bench.report import write_reports  # matplotlib is only needed once there are results

    config = SweepConfig(
        device=args.device, norms=args.norms, passes=args.passes, dtypes=args.dtypes, shapes=args.shapes,
        quick=args.quick,
        reps=args.reps if args.reps is not None else (5 if args.quick else 15),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        min_sample_s=args.min_sample_ms / 1e3, progress=not args.no_progress,
        contenders=(None if args.contenders is None
                    else [CONTENDER_KEYS[key] for key in args.contenders]))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    if config.contenders is not None:
        runnable, skipped = select_contenders(config.device, config.contenders)
        if not runnable:  # a table of the copy roof alone
            parser.error(f"--contenders {','.join(args.contenders)}: none can run on "
                         f"{config.device} (" + "; ".join(f"{name}: {why}" for name, why
                                                          in skipped.items()) + ")")
    prefix = Path(args.out) if args.out else RESULTS_DIR / machine.machine_name(config.device)
    result = run_sweep(config, after_case=lambda partial: write_reports(partial, prefix, plot=False))
    for path in write_reports(result, prefix):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
