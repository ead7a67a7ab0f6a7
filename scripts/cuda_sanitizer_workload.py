"""A small CUDA workload for compute-sanitizer: forward and backward through every kernel
variant of layernorm_ext (csrc/cuda/layernorm_cuda_config.h), on small shapes, for
LayerNorm and for RMSNorm (the same kernels compiled with the Norm::kRms flag).

Each case is checked against torch in float64, loosely (the test suite checks accuracy;
this catches garbage), so the run also fails on wrong results. Exit status 0 when every
case passed. Run it under the sanitizer with the caching allocator off, so that every
tensor is its own allocation and out-of-bounds accesses are seen:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python scripts/cuda_sanitizer_workload.py
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import layernorm_ext  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    cols: int
    rows: int
    param_dtype: Optional[torch.dtype] = None  # default: dtype
    affine: bool = True
    x_offset: int = 0  # elements past an aligned address: the scalar fallback
    param_offset: int = 0  # misaligned weight/bias: scalar parameter loads


CASES = [
    Case("a row per thread (fwd and bwd), D=7", torch.float32, 7, 19),
    # 300 rows: 3 spans of 128 on 2 blocks, the backward's columns added across spans.
    Case("a row per thread (fwd and bwd), D=20 bf16", torch.bfloat16, 20, 300),
    Case("fwd small slices, sub-warp, D=200 bf16", torch.bfloat16, 200, 19),
    Case("fwd large slices, sub-warp, D=1001 fp16 + fp32 params", torch.float16, 1001, 9,
         param_dtype=torch.float32),
    Case("fwd large slices, 2 warps, D=2047 fp32", torch.float32, 2047, 5),
    Case("fwd large slices, block, D=4099 bf16", torch.bfloat16, 4099, 5),
    Case("fwd huge slices (all 16) / bwd registers x32, D=16383 fp32", torch.float32, 16383, 3),
    Case("fwd large slices G=512 / bwd streaming, D=20001 bf16 + fp32 params", torch.bfloat16,
         20001, 3, param_dtype=torch.float32),
    Case("streaming both, D=33001 fp16", torch.float16, 33001, 2),
    # 70 rows: several passes of the column kernel's loop over a slot's rows (4 at a
    # time); D % 4 = 2, so every other row has a head.
    Case("bwd streaming, many rows a slot, D=16390 fp32", torch.float32, 16390, 70),
    Case("streaming float64, D=33", torch.float64, 33, 5),
    Case("scalar fallback (misaligned x), D=100 fp32", torch.float32, 100, 7, x_offset=1),
    Case("scalar fallback (misaligned x), D=5000 fp16", torch.float16, 5000, 3, x_offset=3),
    Case("misaligned weight/bias, D=768 bf16", torch.bfloat16, 768, 6, param_offset=1),
    Case("no weight/bias, D=64 fp32", torch.float32, 64, 40, affine=False),
    Case("no weight/bias, a row per thread, D=20 fp16", torch.float16, 20, 300, affine=False),
    Case("many rows per backward slot, D=256 bf16", torch.bfloat16, 256, 700),
    Case("no rows, D=16", torch.float32, 16, 0),
    # The forward grid is one wave of resident blocks; these take several row groups a
    # block (an H100/H200 holds about 100k such D=20 rows, 10k such D=200 rows at once).
    Case("grid-stride forward, a thread per row, D=20 bf16", torch.bfloat16, 20, 250_000),
    Case("grid-stride forward, small slices, D=200 fp32", torch.float32, 200, 30_000),
]


def offset_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    if offset == 0:
        return t
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


NORMS = ("layer", "rms")


def run_case(case: Case, device: str, norm: str = "layer") -> Optional[str]:
    """Runs one case with LayerNorm or RMSNorm (no bias); returns an error message, or None."""
    g = torch.Generator().manual_seed(case.cols * 31 + case.rows)
    pdtype = case.param_dtype or case.dtype
    x = offset_copy((torch.randn(case.rows, case.cols, generator=g) * 2 + 0.5)
                    .to(device, case.dtype), case.x_offset)
    dy = torch.randn(case.rows, case.cols, generator=g).to(device, case.dtype)
    w = b = None
    if case.affine:
        w = offset_copy((torch.randn(case.cols, generator=g) + 1).to(device, pdtype),
                        case.param_offset)
        b = offset_copy(torch.randn(case.cols, generator=g).to(device, pdtype),
                        case.param_offset)
    if norm == "rms":
        b = None
        ours_fn = lambda x, w, b: layernorm_ext.rms_norm(x, [case.cols], w, 1e-5)  # noqa: E731
        ref_fn = lambda x, w, b: F.rms_norm(x, [case.cols], w, 1e-5)  # noqa: E731
    else:
        ours_fn = lambda x, w, b: layernorm_ext.layer_norm(x, [case.cols], w, b)  # noqa: E731
        ref_fn = lambda x, w, b: F.layer_norm(x, [case.cols], w, b)  # noqa: E731
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = ours_fn(*leaves)
    y.backward(dy)
    torch.cuda.synchronize()

    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None
                  for t in (x, w, b)]
    ref = ref_fn(*ref_leaves)
    ref.backward(dy.double())
    tol = 1e-3 if case.dtype in (torch.float32, torch.float64) else 6e-2
    pairs = [("output", y, ref)] + [
        (name, leaf.grad, r.grad) for name, leaf, r in zip(("grad_input", "grad_weight",
                                                            "grad_bias"), leaves, ref_leaves)
        if leaf is not None]
    for name, ours, theirs in pairs:
        if ours is None or ours.shape != theirs.shape:
            return f"{name}: missing or wrong shape"
        err = (ours.double() - theirs).abs().max().item() if ours.numel() else 0.0
        scale = max(1.0, theirs.abs().max().item()) if ours.numel() else 1.0
        if not err <= tol * scale * (1 + case.rows / 64):  # grads sum over rows
            return f"{name}: max error {err:.3g} (allowed {tol * scale:.3g})"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/cuda_sanitizer_workload.py",
        description="Forward and backward through every layernorm_ext CUDA kernel variant on "
                    "small shapes (a workload for compute-sanitizer).")
    parser.add_argument("--device", default="cuda", help="CUDA device (default: %(default)s)")
    parser.add_argument("--norm", default=",".join(NORMS),
                        help="comma-separated norms to run, of %(default)s (default: both)")
    args = parser.parse_args(argv)
    norms = [n.strip() for n in args.norm.split(",") if n.strip()]
    if not norms or set(norms) - set(NORMS):
        parser.error(f"--norm: choose from {', '.join(NORMS)}")
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    if not layernorm_ext.has_cuda_kernels():
        print("layernorm_ext was built without CUDA kernels", file=sys.stderr)
        return 2
    failures = 0
    runs = [(norm, case) for norm in norms for case in CASES]
    for norm, case in runs:
        error = run_case(case, args.device, norm)
        print(f"{'FAIL' if error else 'ok  '} [{norm}] {case.name}"
              + (f": {error}" if error else ""), flush=True)
        failures += error is not None
    print(f"{len(runs) - failures}/{len(runs)} cases passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
