"""Host time per call at a small shape (by default the seed's 100x20), where a GPU waits
for the host: how much each contender's Python, dispatcher and launch path costs, and where
ours spends it (torch.profiler's CPU self times).

    python bench/host_overhead.py --device cuda            # 100x20 float32 -> stdout
    python bench/host_overhead.py --device cpu --calls 200 --out /tmp/host.md

Each round calls a contender `calls` times back to back: "host" is the time until the last
call returns, "wall" until the device has finished them too. host ~ wall: the loop is
bound by the host; wall > host: by the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import layernorm_ext
from bench import machine
from bench.contenders import EAGER, EPS, EXT

# layer_norm hands the common eager call to the extension's entry point, which calls the op
# through the dispatcher; torch.ops is its way under torch.compile and for other calls.
ENTRY = "layernorm_ext._C.forward_output"
OP = "torch.ops.layernorm_ext.forward"
ALLOC = "torch.empty_like (floor)"  # one dispatcher call and one allocation
COPY = "copy_ (the roof's call)"


def calls_to_time(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                  ) -> dict[str, Callable[[], object]]:
    """The forward calls compared, each a zero-argument callable."""
    shape = (x.shape[-1],)
    op = torch.ops.layernorm_ext.forward.default
    dst = torch.empty_like(x)
    return {
        EAGER: lambda: F.layer_norm(x, shape, weight, bias, EPS),
        EXT: lambda: layernorm_ext.layer_norm(x, shape, weight, bias, EPS),
        ENTRY: lambda: layernorm_ext._C.forward_output(x, shape, weight, bias, EPS),
        OP: lambda: op(x, list(shape), weight, bias, EPS),
        ALLOC: lambda: torch.empty_like(x),
        COPY: lambda: dst.copy_(x),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fns: dict[str, Callable[[], object]], device: str, calls: int, rounds: int
               ) -> dict[str, tuple[float, float]]:
    """Median (host, wall) seconds per call of each, over `rounds` interleaved rounds."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: first-call costs (lazy loading, caches)
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            returned = time.perf_counter()
            _sync(device)
            done = time.perf_counter()
            samples[name].append(((returned - start) / calls, (done - start) / calls))
    return {name: (statistics.median(h for h, _ in s), statistics.median(w for _, w in s))
            for name, s in samples.items()}


def profile_rows(fn: Callable[[], object], device: str, calls: int, top: int
                 ) -> list[tuple[str, int, float]]:
    """(name, calls, self CPU microseconds per call of fn) of the `top` costliest events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.count, e.self_cpu_time_total / calls) for e in events[:top]]


def report(device: str, shape: tuple[int, int], dtype: torch.dtype, calls: int, rounds: int,
           times: dict[str, tuple[float, float]],
           profiles: dict[str, list[tuple[str, int, float]]]) -> str:
    lines = [f"# Host time per forward call, {shape[0]}x{shape[1]} {str(dtype).split('.')[-1]}",
             "", f"- machine: {machine.device_description(device)}",
             f"- torch {torch.__version__}; {calls} calls a round, median of {rounds} rounds",
             "", "| call | host µs/call | wall µs/call |", "| --- | --- | --- |"]
    lines += [f"| {name} | {host * 1e6:.2f} | {wall * 1e6:.2f} |"
              for name, (host, wall) in times.items()]
    for name, rows in profiles.items():
        lines += ["", f"## {name}: profiler CPU self time per call", "",
                  "| event | count | self µs/call |", "| --- | --- | --- |"]
        lines += [f"| `{key}` | {count} | {per_call:.2f} |" for key, count, per_call in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/host_overhead.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--shape", default="100x20", help="MxN (default: %(default)s)")
    parser.add_argument("--dtype", default="float32",
                        choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument("--calls", type=int, default=2000, help="calls a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile-calls", type=int, default=200,
                        help="calls of ours and eager's under the profiler (0: none)")
    parser.add_argument("--top", type=int, default=12, help="profiler rows shown")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    for option, value, least in (("--calls", args.calls, 1), ("--rounds", args.rounds, 1),
                                 ("--profile-calls", args.profile_calls, 0),
                                 ("--top", args.top, 1)):
        if value < least:
            parser.error(f"{option} must be at least {least}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    try:
        rows, cols = (int(part) for part in args.shape.lower().split("x"))
    except ValueError:
        parser.error(f"--shape {args.shape!r} is not MxN")
    if min(rows, cols, args.calls, args.rounds) < 1:
        parser.error("--shape, --calls and --rounds must be positive")

    dtype = getattr(torch, args.dtype)
    x = torch.randn(rows, cols, device=args.device, dtype=dtype)
    weight = torch.randn(cols, device=args.device, dtype=dtype)
    bias = torch.randn(cols, device=args.device, dtype=dtype)
    fns = calls_to_time(x, weight, bias)
    times = time_calls(fns, args.device, args.calls, args.rounds)
    profiles = ({name: profile_rows(fns[name], args.device, args.profile_calls, args.top)
                 for name in (EXT, EAGER)} if args.profile_calls > 0 else {})
    text = report(args.device, (rows, cols), dtype, args.calls, args.rounds, times, profiles)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
