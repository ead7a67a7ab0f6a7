"""Runs the fuzz cases of tests/test_fuzz.py on one device, without hypothesis.

Meant for the CUDA kernels under compute-sanitizer, which slows every kernel down by
orders of magnitude, so the cases are a fixed, seeded list: the kernel boundary shapes
(layernorm_cases.BOUNDARY_CASES) and then --cases random ones (layernorm_cases.random_case).
Each case runs forward + backward and is checked against the reference like the tests do.

    python tests/fuzz_cuda_cases.py                      # 200 random cases on cuda
    compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python tests/fuzz_cuda_cases.py --cases 40
    compute-sanitizer --tool racecheck --error-exitcode 1 \\
        python tests/fuzz_cuda_cases.py --cases 10
    python tests/fuzz_cuda_cases.py --device cpu         # the same cases on the CPU
    python tests/fuzz_cuda_cases.py --norm rms           # RMSNorm only (default: both)

Every case runs once per norm (--norm): LayerNorm, and RMSNorm (the same kernels with the
Norm::kRms flag; the case's bias is ignored).

Exits with status 1 when a case breaks its bound or raises; each failing Case is printed
and replays alone with ``layernorm_cases.check_case(Case(...), device)``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import dataclasses  # noqa: E402

from layernorm_cases import NORMS, BOUNDARY_CASES, check_case, random_case  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", default="cuda", help="device to run on (default: cuda)")
    parser.add_argument("--cases", type=int, default=200,
                        help="random cases after the boundary cases (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random cases")
    parser.add_argument("--no-boundary", action="store_true",
                        help="skip the boundary cases (the largest ones)")
    parser.add_argument("--norm", default=",".join(NORMS),
                        help="comma-separated norms, of %(default)s (default: both)")
    args = parser.parse_args(argv)
    args.norms = [n.strip() for n in args.norm.split(",") if n.strip()]
    if not args.norms or set(args.norms) - set(NORMS):
        parser.error(f"--norm: choose from {', '.join(NORMS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to run (use --device cpu to run on the CPU)")
        return 2
    rng = random.Random(args.seed)
    cases = ([] if args.no_boundary else list(BOUNDARY_CASES))
    cases += [random_case(rng) for _ in range(args.cases)]
    cases = [dataclasses.replace(case, norm=norm) for norm in args.norms for case in cases]
    failures = 0
    for index, case in enumerate(cases):
        try:
            check_case(case, args.device)
        except Exception as error:  # noqa: BLE001 - report every case, then fail
            failures += 1
            print(f"case {index} FAILED: {type(error).__name__}: {error}", flush=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()  # surface an asynchronous kernel error here
    print(f"{len(cases) - failures} passed, {failures} failed")
    print(f"{len(cases) - failures}/{len(cases)} cases passed")  # what scripts/gpu_check.py reads
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
