"""Random LayerNorm cases, the float64 reference and the error bound they are judged by.

Shared by the property-based tests (tests/test_fuzz.py, driven by hypothesis) and by
tests/fuzz_cuda_cases.py (driven by a seeded ``random.Random``, so compute-sanitizer can run
the same kind of cases without hypothesis). A :class:`Case` names everything about a call
(shapes, dtypes, memory layouts, value range, eps, seed), so printing it is a reproducer:
``check_case(Case(...), "cpu")``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import layernorm_ext


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that must import the layernorm_ext this process
    imported (the checkout, a copy of it, or CI's CPU-torch build outside the tree), with
    ``extra`` set: its folder first on PYTHONPATH."""
    package_root = os.path.dirname(os.path.dirname(layernorm_ext.__file__))
    paths = [package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


def sanitizer_flags() -> list[str]:
    """gcc's flags for the C++ a test compiles (the CUDA emulator, the host replay) under
    `make test-sanitize`, which sets LAYERNORM_EXT_SANITIZE as for setup.py; else none."""
    sanitize = os.environ.get("LAYERNORM_EXT_SANITIZE", "")
    return ([f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
            if sanitize else [])


# (input dtype, weight/bias dtype): every pair the operator accepts.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
]

# Absolute slack, relative to the values' scale, on top of "at most 2x torch's own error
# against the float64 reference": roughly a few units in the last place of each dtype.
# float32 and float64 were 1e-5 and 1e-12 until 2026-12-06; the CPU suite and the CUDA
# emulator needed at most 1.5e-7 and 9e-16 (an auditor's log of every comparison).
ATOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# How a tensor of the wanted shape is laid out in memory:
#   contiguous   - the plain case
#   offset       - contiguous, but starting one element into its storage (misaligned base)
#   transposed   - dims stored in reverse order, then permuted back (non-unit last stride)
#   sliced       - every other element of a larger tensor along the first and last dims
#   expanded     - the first dim broadcast with stride 0
#   broadcast    - one value broadcast with stride 0 everywhere (as the grad_out of
#                  ``y.sum().backward()``; for an input, rows of zero variance)
# torch has no negative strides (flip() returns a contiguous copy), so there is no
# negative-step layout to test.
LAYOUTS = ("contiguous", "offset", "transposed", "sliced", "expanded", "broadcast")

# Normalized sizes around the CPU vector widths (8/16 floats, 32 bf16/fp16 per chunk) and
# the CUDA 16-byte packs, where main loops and tails meet.
ROW_SIZES = (1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 257, 1000,
             1031)
EPS_VALUES = (1e-5, 1e-6, 1e-3, 0.25)
VALUE_RANGES = ((1.0, 0.0), (1e-2, 0.0), (1e2, 0.0), (1.0, 5.0), (3.0, -30.0))  # (scale, offset)
OUTPUT_NAMES = ("output", "grad_input", "grad_weight", "grad_bias")
# Close to each dtype's largest finite value.
LARGEST = {torch.float32: 3e38, torch.float64: 1.7e308, torch.float16: 6e4,
           torch.bfloat16: 3e38}
# "layer": layer_norm vs F.layer_norm; "rms": rms_norm vs F.rms_norm (the same kernels with
# the Norm::kRms flag; a case's bias is then ignored).
NORMS = ("layer", "rms")


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of layer_norm forward + backward; see LAYOUTS for the layout names."""

    leading: tuple[int, ...]
    normalized: tuple[int, ...]
    dtype: torch.dtype
    param_dtype: torch.dtype
    x_layout: str = "contiguous"
    grad_layout: str = "contiguous"
    param_layout: str = "contiguous"
    has_weight: bool = True
    has_bias: bool = True
    input_requires_grad: bool = True
    eps: float = 1e-5
    scale: float = 1.0
    offset: float = 0.0
    seed: int = 0
    norm: str = "layer"


# Shapes at the kernels' internal boundaries, which random cases rarely reach: more rows
# than the CUDA backward has slots (each slot loops over several rows), rows longer than one CUDA block
# covers in one pass, D = 1 with many rows, and misaligned 16-byte-packable rows.
BOUNDARY_CASES = [
    Case(leading=(1000,), normalized=(64,), dtype=torch.float32, param_dtype=torch.float32),
    Case(leading=(700,), normalized=(1,), dtype=torch.bfloat16, param_dtype=torch.float32),
    Case(leading=(3,), normalized=(16392,), dtype=torch.float32, param_dtype=torch.float32),
    Case(leading=(2,), normalized=(32776,), dtype=torch.bfloat16, param_dtype=torch.bfloat16),
    Case(leading=(513,), normalized=(8,), dtype=torch.float16, param_dtype=torch.float16,
         x_layout="offset", grad_layout="offset", param_layout="offset"),
    Case(leading=(40,), normalized=(1024,), dtype=torch.float64, param_dtype=torch.float64,
         x_layout="offset", has_bias=False),
    Case(leading=(600, 2), normalized=(5, 3), dtype=torch.float16, param_dtype=torch.float32,
         x_layout="transposed", grad_layout="broadcast"),
]


def input_layouts(leading: tuple[int, ...]) -> tuple[str, ...]:
    """The layouts an input may take without making rows of zero variance.

    Constant rows are tested on their own, against their exact results
    (tests/test_extreme_values.py): here the bound's conditioning (distance_from_zero,
    |mean| / sqrt(eps) for them) would widen their slack by up to ~1e5. (They once hit an
    accuracy bug of the CPU kernel; 600 such cases passed on 2026-12-06.)
    """
    return tuple(layout for layout in LAYOUTS
                 if layout != "broadcast" and (layout != "expanded" or leading))


def random_case(rng: random.Random) -> Case:
    """A case drawn with ``rng``, from the same ranges as the hypothesis strategy."""
    if rng.random() < 0.6:
        normalized = (rng.choice(ROW_SIZES),)
    else:
        normalized = tuple(rng.randint(0, 6) for _ in range(rng.randint(2, 3)))
    dtype, param_dtype = rng.choice(DTYPE_PAIRS)
    scale, offset = rng.choice(VALUE_RANGES)
    leading = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))
    return Case(
        leading=leading, normalized=normalized, dtype=dtype, param_dtype=param_dtype,
        x_layout=rng.choice(input_layouts(leading)), grad_layout=rng.choice(LAYOUTS),
        param_layout=rng.choice(LAYOUTS), has_weight=rng.random() < 0.75,
        has_bias=rng.random() < 0.75, input_requires_grad=rng.random() < 0.9,
        eps=rng.choice(EPS_VALUES), scale=scale, offset=offset, seed=rng.randrange(2**31))


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``values`` (same shape, same numbers) in the given memory layout."""
    shape = values.shape
    if layout == "contiguous" or values.dim() == 0:
        return values.contiguous()
    if layout == "offset":
        storage = values.new_empty(values.numel() + 1)
        storage[1:] = values.reshape(-1)
        return storage[1:].view(shape)
    if layout == "transposed":
        dims = list(reversed(range(values.dim())))
        return values.permute(dims).contiguous().permute(dims)
    if layout == "sliced":
        # Every other element along the first and the last dim of a twice larger tensor.
        index = (slice(None, None, 2),) + (slice(None),) * (values.dim() - 1)
        index = index[:-1] + (slice(None, None, 2),)
        bigger = [2 * size if i.step == 2 else size for i, size in zip(index, shape)]
        base = values.new_zeros(bigger)
        base[index] = values
        return base[index]
    if layout == "expanded":
        # Every slice along dim 0 is made equal to the first one, then broadcast.
        if shape[0] == 0:
            return values
        return values[:1].contiguous().expand(shape)
    if layout == "broadcast":
        if values.numel() == 0:
            return values
        return values.reshape(-1)[:1].reshape([1] * values.dim()).expand(shape)
    raise ValueError(f"unknown layout {layout!r}")


def make_inputs(case: Case, device: str):
    """(x, weight, bias, grad_out) for the case; weight/bias are None when absent."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = case.leading + case.normalized

    def randn(size, layout, dtype, scale=1.0, offset=0.0):
        values = torch.randn(size, generator=gen, dtype=torch.float64) * scale + offset
        return laid_out(values.to(device=device, dtype=dtype), layout)

    x = randn(shape, case.x_layout, case.dtype, case.scale, case.offset)
    weight = randn(case.normalized, case.param_layout, case.param_dtype, 1.0, 1.0)
    bias = randn(case.normalized, case.param_layout, case.param_dtype)
    grad_out = randn(shape, case.grad_layout, case.dtype)
    return x, (weight if case.has_weight else None), (bias if case.has_bias else None), grad_out


LayerNormFn = Callable[..., torch.Tensor]


def forward_backward(fn: LayerNormFn, x, normalized_shape, weight, bias, grad_out, eps,
                     input_requires_grad: bool = True) -> list[Optional[torch.Tensor]]:
    """[output, grad_input, grad_weight, grad_bias] of ``fn``; None for what has no grad."""
    x = x.detach().requires_grad_(input_requires_grad)
    params = [p.detach().requires_grad_() if p is not None else None for p in (weight, bias)]
    output = fn(x, list(normalized_shape), params[0], params[1], eps)
    if output.requires_grad:
        output.backward(grad_out)
    grads = [x.grad] + [p.grad if p is not None else None for p in params]
    return [output.detach()] + grads


Results = list  # [output, grad_input, grad_weight, grad_bias], None where no gradient


def _rms_norm(x, normalized_shape, weight, bias, eps):
    assert bias is None, "RMSNorm has no bias"
    return layernorm_ext.rms_norm(x, normalized_shape, weight, eps)


def _torch_rms_norm(x, normalized_shape, weight, bias, eps):
    assert bias is None, "RMSNorm has no bias"
    return F.rms_norm(x, normalized_shape, weight, eps)


# What run_all/check_case judge: ours_fn(x, normalized_shape, weight, bias, grad_out, eps,
# input_requires_grad, norm) -> Results. layernorm_ext's functions by default;
# tests/test_cuda_emulated.py passes the CUDA kernels run on the CPU emulator.
OursFn = Callable[..., Results]


def layernorm_ext_results(x, normalized_shape, weight, bias, grad_out, eps,
                          input_requires_grad=True, norm="layer") -> Results:
    """layernorm_ext.layer_norm's (or rms_norm's) results, through autograd."""
    fn = _rms_norm if norm == "rms" else layernorm_ext.layer_norm
    return forward_backward(fn, x, normalized_shape, weight, bias, grad_out, eps,
                            input_requires_grad)


def run_all(x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], grad_out: torch.Tensor, eps: float = 1e-5,
            input_requires_grad: bool = True, norm: str = "layer",
            ours_fn: OursFn = layernorm_ext_results) -> tuple[Results, Results, Results]:
    """(ours, torch's, reference) forward + backward results for one set of inputs.

    The reference is float64 on the CPU: torch's layer_norm on float64 copies for
    float32/float16/bfloat16 inputs, extended_precision_reference for float64 inputs.
    With norm="rms" (bias must be None): rms_norm, against torch's rms_norm in float64.
    """
    args = (normalized_shape, eps, input_requires_grad)
    ours = ours_fn(x, normalized_shape, weight, bias, grad_out, eps, input_requires_grad, norm)
    if norm == "rms":
        with warnings.catch_warnings():  # torch: mixed dtypes skip its fused kernel
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
            theirs = forward_backward(_torch_rms_norm, x, normalized_shape, weight, None,
                                      grad_out, *args[1:])
        cpu64 = [None if t is None else t.detach().cpu().double() for t in (x, weight, grad_out)]
        reference = forward_backward(_torch_rms_norm, cpu64[0], normalized_shape, cpu64[1], None,
                                     cpu64[2], *args[1:])
        return ours, theirs, reference
    theirs = torch_results(x, weight, bias, grad_out, *args)
    cpu64 = [None if t is None else t.detach().cpu().double() for t in (x, weight, bias, grad_out)]
    if x.dtype == torch.float64:
        reference = extended_precision_reference(*cpu64, *args)
    else:
        reference = forward_backward(F.layer_norm, cpu64[0], normalized_shape, cpu64[1],
                                     cpu64[2], cpu64[3], eps, input_requires_grad)
    return ours, theirs, reference


def run_case(case: Case, device: str) -> tuple[Results, Results, Results]:
    """(ours, torch's, reference) results of the case; see run_all."""
    x, weight, bias, grad_out = make_inputs(case, device)
    if case.norm == "rms":
        bias = None
    return run_all(x, case.normalized, weight, bias, grad_out, case.eps,
                   case.input_requires_grad, case.norm)


def torch_results(x, weight, bias, grad_out, normalized_shape, eps,
                  input_requires_grad=True) -> Results:
    """torch's layer_norm results, working around the calls torch itself does not run."""
    param = weight if weight is not None else bias
    if param is None or param.dtype == x.dtype:
        return forward_backward(F.layer_norm, x, normalized_shape, weight, bias, grad_out, eps,
                                input_requires_grad)
    # Reduced-precision input with fp32 parameters. torch's CUDA kernel rejects it
    # (pytorch #138128) and its CPU backward rejects an fp32 bias without a weight
    # ("expected scalar type BFloat16 but found Float"): run torch's CPU kernel, with a
    # weight of ones where there is none (same output, same input and bias gradients).
    missing_weight = weight is None
    if missing_weight:
        weight = torch.ones(normalized_shape, dtype=param.dtype)
    on_cpu = [None if t is None else t.cpu() for t in (x, weight, bias, grad_out)]
    result = forward_backward(F.layer_norm, on_cpu[0], normalized_shape, on_cpu[1], on_cpu[2],
                              on_cpu[3], eps, input_requires_grad)
    if missing_weight:
        result[2] = None
    return result


# numpy's long double: 80-bit x87 on x86-64 Linux (64-bit mantissa), binary128 on aarch64.
EXTENDED_PRECISION_AVAILABLE = np.finfo(np.longdouble).eps < np.finfo(np.float64).eps


def extended_precision_reference(x, weight, bias, grad_out, normalized_shape, eps,
                                 input_requires_grad=True) -> Results:
    """[output, grad_input, grad_weight, grad_bias] in float64, computed in long double.

    A float64 input cannot be judged by torch's float64 result: that is only another
    float64 computation (for a constant row it is off by an ulp of x * rstd where the exact
    output is the bias). So float64 inputs are compared with the LayerNorm formulas in
    numpy's extended precision, two-pass (the mean refined once), which is exact to well
    below a float64 ulp. Takes CPU tensors.
    """
    assert EXTENDED_PRECISION_AVAILABLE, "numpy has no long double wider than float64 here"
    ext = np.longdouble
    normalized_shape = tuple(normalized_shape)
    axes = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    row_axes = tuple(range(x.dim() - len(normalized_shape)))

    def as_ext(t, default=None):
        return ext(default) if t is None else t.detach().double().numpy().astype(ext)

    xv, dy, w, b = as_ext(x), as_ext(grad_out), as_ext(weight, 1), as_ext(bias, 0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # means of empty rows
        centered = xv - xv.mean(axis=axes, keepdims=True)
        centered -= centered.mean(axis=axes, keepdims=True)
        rstd = 1 / np.sqrt((centered * centered).mean(axis=axes, keepdims=True) + ext(eps))
        xhat = centered * rstd
        output = xhat * w + b
        g = dy * w
        grad_input = rstd * (g - g.mean(axis=axes, keepdims=True)
                             - xhat * (g * xhat).mean(axis=axes, keepdims=True))
        grad_weight = (dy * xhat).sum(axis=row_axes)
        grad_bias = dy.sum(axis=row_axes)

    def as_tensor(a, shape):
        return torch.from_numpy(np.asarray(a, dtype=np.float64)).reshape(shape)

    return [as_tensor(output, x.shape),
            as_tensor(grad_input, x.shape) if input_requires_grad else None,
            as_tensor(grad_weight, normalized_shape) if weight is not None else None,
            as_tensor(grad_bias, normalized_shape) if bias is not None else None]


def max_abs_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    if result.numel() == 0:
        return 0.0
    return (result.detach().cpu().double() - reference.cpu()).abs().max().item()


def reference_errors(ours: Sequence[Optional[torch.Tensor]],
                     theirs: Sequence[Optional[torch.Tensor]],
                     reference: Sequence[Optional[torch.Tensor]],
                     dtype: torch.dtype, names: Sequence[str] = OUTPUT_NAMES,
                     atol: Optional[float] = None) -> list[str]:
    """What breaks the bound: ours' error <= 2x torch's error + atol * scale.

    Errors are max-abs against the float64 reference; scale is max(1, max|reference|);
    atol defaults to ATOL[dtype], a few ulps (callers with ill-conditioned inputs pass
    the error the inputs' rounding forces instead). An output of another dtype (the
    float32 parameter gradients of float16/bfloat16 input) gets atol in its own units:
    atol * ATOL[its dtype] / ATOL[dtype].
    Also checks that ours and torch's agree on presence, shape and dtype. Returns one
    message per broken check (empty when all hold).
    """
    problems = []
    for name, o, t, r in zip(names, ours, theirs, reference):
        if (o is None) != (t is None):
            problems.append(f"{name}: ours is {'None' if o is None else 'set'}, torch's is not")
            continue
        if o is None:
            continue
        if o.shape != t.shape or o.dtype != t.dtype:
            problems.append(f"{name}: ours {o.dtype}{list(o.shape)} vs torch's "
                            f"{t.dtype}{list(t.shape)}")
            continue
        if not torch.isfinite(r).all():
            problems.append(f"{name}: the float64 reference is not finite; not a valid case")
            continue
        err_ours = max_abs_error(o, r)
        err_torch = max_abs_error(t, r)
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        slack = (ATOL[dtype] if atol is None else atol) * ATOL[o.dtype] / ATOL[dtype]
        bound = 2 * err_torch + slack * scale
        if not err_ours <= bound:  # also catches NaN
            problems.append(f"{name}: max error {err_ours:.4g} > bound {bound:.4g} "
                            f"(torch's error {err_torch:.4g}, scale {scale:.4g})")
    return problems


def distance_from_zero(x: torch.Tensor, normalized_ndim: int, eps: float) -> float:
    """The largest |row mean| / row std of x: how ill-conditioned its rows are.

    Every algorithm rounds the mean to its accumulation type, which puts an error of
    about one ulp of the mean into x - mean; relative to the row's spread, that is
    this number of ulps. (Two close values far from zero, e.g. [-28.119, -28.1715],
    make it ~1e3.)
    """
    row_size = math.prod(x.shape[x.dim() - normalized_ndim:])
    if x.numel() == 0 or row_size < 2:  # the mean of one value is exact
        return 0.0
    rows = x.detach().cpu().double().reshape(-1, row_size)
    mean = rows.mean(-1)
    std = (rows.var(-1, unbiased=False) + eps).sqrt()
    return (mean.abs() / std).max().item()


# Rows whose mean sits farther than this many standard deviations from zero get slack
# in proportion (see check_case); of the random cases, ~3% (short rows with an offset).
WELL_CONDITIONED = 16.0


def check_case(case: Case, device: str, ours_fn: OursFn = layernorm_ext_results) -> None:
    """Runs the case and raises AssertionError, naming the case, if a bound is broken.

    The slack ATOL[dtype] is scaled by max(1, distance_from_zero / WELL_CONDITIONED):
    random short rows with an offset (e.g. two values close together around -28) are
    ill-conditioned, and there 2x torch's error is a matter of luck. Constant rows,
    where the exact mean is reachable, are not drawn (see input_layouts).
    """
    x, weight, bias, grad_out = make_inputs(case, device)
    if case.norm == "rms":
        bias = None
    ours, theirs, reference = run_all(x, case.normalized, weight, bias, grad_out, case.eps,
                                      case.input_requires_grad, case.norm, ours_fn)
    # RMSNorm subtracts no mean: its statistic has no such cancellation.
    conditioning = 0.0 if case.norm == "rms" else distance_from_zero(x, len(case.normalized),
                                                                      case.eps)
    atol = ATOL[case.dtype] * max(1.0, conditioning / WELL_CONDITIONED)
    problems = reference_errors(ours, theirs, reference, case.dtype, atol=atol)
    assert not problems, f"{case}:\n  " + "\n  ".join(problems)


def with_kernel_name(torch_message: str, kernel: str) -> str:
    """torch's dtype error ('"LayerNormKernelImpl" not implemented for 'Long'') naming
    `kernel` instead. For rms_norm torch names a different kernel by release and device
    ("rms_norm" in 2.14 on the CPU, "LayerNormKernelImpl" in 2.11 on CUDA); ours is
    always '"rms_norm" not implemented for ...'. Other messages come back unchanged."""
    return re.sub(r'^"[^"]*" not implemented for', f'"{kernel}" not implemented for',
                  torch_message)


def random64(*shape, seed=0, scale=1.0, offset=0.0):
    """Seeded standard normal float64 values (times scale, plus offset), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset


def params(D, dtype, device, seed=1):
    """A weight around 1 and a bias around 0 of D elements."""
    weight = (random64(D, seed=seed) + 1).to(device, dtype)
    bias = random64(D, seed=seed + 1).to(device, dtype)
    return weight, bias


def positive64(*shape, seed=0):
    """Seeded uniform float64 values on [0.5, 1.5): terms of one sign, whose sums'
    rounding errors add up instead of cancelling."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5


def check_parameter_grads_of_many_rows(norm: str, data: str, D: int, device: str = "cpu",
                                       ours_fn: OursFn = layernorm_ext_results,
                                       floor: float = 0.0, rows: int = 1 << 17) -> None:
    """dgamma (and dbeta) of float32 rows, `data` "signed" (standard normal x and
    grad_out) or "positive" (positive64), each within twice torch's error, or `floor`,
    of the float64 reference, relative to its largest element."""
    make = {"signed": random64, "positive": positive64}[data]
    x = make(rows, D).float().to(device)
    weight = (random64(D, seed=1) + 1).float().to(device)
    bias = random64(D, seed=2).float().to(device) if norm == "layer" else None
    grad_out = make(rows, D, seed=3).float().to(device)
    ours, theirs, reference = run_all(x, [D], weight, bias, grad_out, norm=norm, ours_fn=ours_fn)
    for name, o, t, r in list(zip(("grad_weight", "grad_bias"), ours[2:], theirs[2:],
                                  reference[2:]))[:2 if norm == "layer" else 1]:
        scale = r.abs().max().item()
        error = (o.cpu().double() - r).abs().max().item() / scale
        torch_error = (t.cpu().double() - r).abs().max().item() / scale
        assert error <= max(floor, 2 * torch_error), (name, error, torch_error)


def check_mean_square_of_like_terms(rms_forward: Callable, D: int,
                                    dtype: torch.dtype = torch.float32,
                                    device: str = "cpu") -> None:
    """rstd of constant rows (3.3: squares of one sign, whose rounding errors add up along
    a chain) from rms_forward (torch.ops.layernorm_ext.rms_forward's signature), within
    two float32 epsilons of the float64 reference."""
    x = torch.full((2, D), 3.3, device=device).to(dtype)
    _, rstd = rms_forward(x, [D], None, 1e-6)
    reference = (x.cpu().double().pow(2).mean(-1) + 1e-6).rsqrt()
    error = ((rstd.cpu().double().flatten() - reference) / reference).abs().max().item()
    assert error <= 2 * torch.finfo(torch.float32).eps, (D, dtype, error)


def check_ramp_rows(dtype: torch.dtype, offset: float, D: int, device: str = "cpu",
                    ours_fn: OursFn = layernorm_ext_results, odd_at: int | None = None) -> None:
    """Rows that climb from offset to offset + 1 (sorted values: smooth signals,
    positions), forward and backward, within the usual bound, with no slack for their
    distance from zero. A running mean rounded to the offset's ulps drifts the same way
    step after step here, where on i.i.d. rows its errors cancel: the CPU's unshifted
    Welford gave an rstd ~1800 ulps off on float32 rows of 4096 at offset 100 (torch's:
    2), 29x torch's error in y. odd_at: the value there is 0.7 * offset in the first two
    rows and 0 in the others (a value the kernels' shift rule must not trust: judged on
    the first value alone, such rows went unshifted, 90-340x torch's error)."""
    steps = torch.linspace(0.0, 1.0, D, dtype=torch.float64)
    x = offset + steps + 0.125 * torch.arange(4, dtype=torch.float64)[:, None]
    if odd_at is not None:
        x[:2, odd_at], x[2:, odd_at] = 0.7 * offset, 0.0
    x = x.to(device, dtype)
    weight, bias = params(D, dtype, device)
    grad_out = random64(4, D, seed=3).to(device, dtype)
    ours, theirs, reference = run_all(x, [D], weight, bias, grad_out, ours_fn=ours_fn)
    problems = reference_errors(ours, theirs, reference, dtype)
    assert not problems, f"D={D} {dtype} offset {offset}: {problems}"


def check_outlier_first_rows(D: int, device: str = "cpu",
                             ours_fn: OursFn = layernorm_ext_results) -> None:
    """float32 rows of N(0, 1) values but the first, 1000 (a large activation in channel
    0). The other values' y must stay within 8x torch's error: the CPU Welford shifted by
    the row's first value (check_ramp_rows' fix, first try) rounded every shifted value
    to 1000's ulps, 80-115x torch's error there; torch's own form is unshifted."""
    x = random64(8, D, seed=5)
    x[:, 0] = 1000.0
    x = x.to(device, torch.float32)
    weight, bias = params(D, torch.float32, device)
    grad_out = random64(8, D, seed=3).to(device, torch.float32)
    ours, theirs, reference = run_all(x, [D], weight, bias, grad_out, ours_fn=ours_fn)
    error = max_abs_error(ours[0][:, 1:], reference[0][:, 1:])
    torch_error = max_abs_error(theirs[0][:, 1:], reference[0][:, 1:])
    assert error <= 8 * torch_error + 1e-8, (D, error, torch_error)
    problems = reference_errors(ours, theirs, reference, torch.float32)
    assert not problems, f"D={D}: {problems}"


def rows_unlike_their_start(D: int) -> torch.Tensor:
    """float64 rows (D >= 64) whose first values are unlike the rest, each followed by a
    row of N(0, 1) values, and one more of the first kind (an odd count: a CUDA block's
    last row group may hold no row). The first 32 (a CPU vector chunk): 1000 + N(0, 1)
    before N(0, 0.01); 0 before a ramp 1000..1001; N(0, 0.001) before a ramp 100..101;
    a ramp 300..301 before one at 100..101. The first three (of the CUDA forwards' four
    probes): 400 before a ramp 100..101. The kernels judge a row's shift from those
    values, wrong here: taken less it, the statistics had up to 36x torch's error (CPU)
    and 53x (the CUDA forwards, emulated) where the rows are long enough for the mean to
    lie over math::kReshiftDeviations (8) standard deviations from the shift."""
    ramp = torch.linspace(0.0, 1.0, D, dtype=torch.float64)
    rows = [0.01 * random64(D, seed=1), 1000.0 + ramp, 100.0 + ramp, 100.0 + ramp, 100.0 + ramp]
    starts = [1000.0 + random64(32, seed=2), torch.zeros(32, dtype=torch.float64),
              1e-3 * random64(32, seed=3), 300.0 + ramp[:32], torch.full((3,), 400.0)]
    for row, start in zip(rows, starts):
        row[:len(start)] = start
    pairs = [r for k, row in enumerate(rows) for r in (row, random64(D, seed=10 + k))]
    return torch.stack(pairs + [rows[0]])


def check_rows_unlike_their_start(forward: Callable, dtype: torch.dtype, D: int,
                                  device: str = "cpu",
                                  ours_fn: OursFn = layernorm_ext_results) -> None:
    """rows_unlike_their_start in dtype (float32, bfloat16), given the forward operator
    (torch.ops.layernorm_ext.forward's signature) and ours_fn. Each row's statistics,
    mean (as its error in y: times the exact rstd) and rstd (relative), within 2x the
    error of torch's float32 statistics plus 4 ulps of 1 and an ulp of the mean (its
    rounding to float32, which no algorithm avoids); outputs and gradients within the
    usual bound. The N(0, 1) rows (odd indices) keep the statistics they have beside
    rows of their kind: a CUDA warp or block takes a row's second pass together, and
    only that row's results may change."""
    x64 = rows_unlike_their_start(D)
    x = x64.to(device, dtype)
    exact = x.double().cpu()
    exact_mean = exact.mean(-1)
    exact_rstd = (exact.var(-1, unbiased=False) + 1e-5).rsqrt()
    mean_ulp = torch.nextafter(exact_mean.float(), torch.tensor(math.inf)).double() - \
        exact_mean.float().double()

    def statistics_errors(mean, rstd):
        mean_error = (mean.double().cpu().view(-1) - exact_mean).abs() * exact_rstd
        return torch.maximum(mean_error, (rstd.double().cpu().view(-1) / exact_rstd - 1).abs())

    _, mean, rstd = forward(x, [D], None, None, 1e-5)
    _, torch_mean, torch_rstd = torch.native_layer_norm(x.cpu().float(), [D], None, None, 1e-5)
    ours, theirs = statistics_errors(mean, rstd), statistics_errors(torch_mean, torch_rstd)
    bound = 2 * theirs + 4 * torch.finfo(torch.float32).eps + mean_ulp.abs() * exact_rstd
    assert (ours <= bound).all(), (D, ours.tolist(), bound.tolist())

    # The N(0, 1) rows, beside rows of their kind instead: the same bits.
    plain = x64.clone()
    plain[0::2] = random64((plain.shape[0] + 1) // 2, D, seed=20)
    _, plain_mean, plain_rstd = forward(plain.to(device, dtype), [D], None, None, 1e-5)
    assert torch.equal(plain_mean.view(-1)[1::2], mean.view(-1)[1::2]), D
    assert torch.equal(plain_rstd.view(-1)[1::2], rstd.view(-1)[1::2]), D

    weight, bias = params(D, dtype, device)
    grad_out = random64(*x.shape, seed=3).to(device, dtype)
    ours, theirs, reference = run_all(x, [D], weight, bias, grad_out, ours_fn=ours_fn)
    problems = reference_errors(ours, theirs, reference, dtype)
    assert not problems, f"D={D}: {problems}"


def check_constant_rows(forward: Callable, dtype: torch.dtype, D: int, device: str = "cpu",
                        ours_fn: OursFn = layernorm_ext_results) -> None:
    """Rows holding one value in every element (0, 0.1, 1, -3.7, 123.456, 1e4), given the
    forward operator (torch.ops.layernorm_ext.forward's signature) and ours_fn.

    Their variance is exactly 0, so rstd = 1 / sqrt(eps) ~ 316 multiplies any error in
    the mean: a mean an ulp off (a plain sum / D of 0.1f) gives y errors of 1e-4, where
    torch's is 0. The saved mean must be the row's value exactly and every row's rstd
    that of the row of zeros; then outputs and gradients are judged against torch and
    the float64 reference."""
    values = torch.tensor([0.0, 0.1, 1.0, -3.7, 123.456, 1e4], dtype=torch.float64)
    x = values[:, None].expand(-1, D).to(device, dtype)
    weight, bias = params(D, dtype, device)
    _, mean, rstd = forward(x, [D], weight, bias, 1e-5)
    assert torch.equal(mean, x[:, 0].to(mean.dtype)), (mean, x[:, 0])
    assert torch.equal(rstd, rstd[:1].expand_as(rstd)), rstd
    grad_out = random64(*x.shape, seed=2).to(device, dtype)
    ours, theirs, reference = run_all(x, [D], weight, bias, grad_out, ours_fn=ours_fn)
    problems = reference_errors(ours, theirs, reference, dtype)
    assert not problems, problems


def check_constant_largest_rows(forward: Callable, dtype: torch.dtype, D: int,
                                device: str = "cpu") -> None:
    """Rows holding the dtype's largest finite value, +max and -max, in every element,
    given the forward operator (torch.ops.layernorm_ext.forward's signature).

    A thread's partial sum of such values overflows unless the kernel scales them first
    (the overflow rescue, math::kRescueFactor, must exceed the most values one thread
    sums). The mean is +-max and finite. In bfloat16 and float16 (8 and 11 significant
    bits) every partial sum is exact in float32, so the variance is exactly 0: rstd =
    1 / sqrt(eps) and y = bias. In float32/float64 a partial sum may round, and the
    variance of that rounding, (an ulp of max)^2, overflows: rstd is then 0 (see
    math::normalize_center) and y still the bias."""
    largest = torch.finfo(dtype).max
    x = torch.tensor([largest, -largest], dtype=torch.float64).repeat_interleave(D)
    x = x.view(2, D).to(device, dtype)
    weight = torch.full((D,), 2.0, dtype=dtype, device=device)
    bias = torch.linspace(-1, 1, D, dtype=torch.float64).to(device, dtype)
    eps = 1e-5
    y, mean, rstd = forward(x, [D], weight, bias, eps)
    torch.testing.assert_close(mean.cpu().double().flatten(),
                               torch.tensor([largest, -largest], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    exact_rstd = torch.full((2,), eps ** -0.5, dtype=torch.float64)
    if dtype in (torch.bfloat16, torch.float16):
        torch.testing.assert_close(rstd.cpu().double().flatten(), exact_rstd, rtol=1e-6,
                                   atol=0)
    else:
        for value in rstd.cpu().double().flatten().tolist():
            assert value == 0 or math.isclose(value, exact_rstd[0].item(), rel_tol=1e-6), rstd
    torch.testing.assert_close(y, bias.expand_as(y))


def check_wide_spread_rows(forward: Callable, dtype: torch.dtype, D: int,
                           device: str = "cpu") -> None:
    """Rows of alternating +-a, a = 2 * sqrt(max / D) of the accumulation type, given the
    forward operator (torch.ops.layernorm_ext.forward's signature).

    M2 = D * a^2 = 4 * max overflows, the variance a^2 does not: rstd = 1 / a and
    y = +-weight + bias, as in float64 (the kernels take M2 / D of x / kRescueFactor,
    math::rescue_unscaled; torch's float32 M2 overflows here, giving rstd 0)."""
    acc_max = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max
    a = 2 * math.sqrt(acc_max / D)
    x = (a * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(3, (D + 1) // 2))[:, :D]
    x = x.to(dtype)
    gen = torch.Generator().manual_seed(D)
    weight = (torch.rand(D, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.rand(D, generator=gen, dtype=torch.float64).to(dtype)
    y, mean, rstd = forward(x.to(device), [D], weight.to(device), bias.to(device), 1e-5)
    x64 = x.double()
    expected_mean = (x64 / D).sum(1)
    expected_rstd = 1 / ((x64 / a - expected_mean[:, None] / a) ** 2).mean(1).sqrt() / a
    torch.testing.assert_close(mean.cpu().double().flatten(), expected_mean, rtol=0,
                               atol=a * 1e-6)
    torch.testing.assert_close(rstd.cpu().double().flatten(), expected_rstd, rtol=1e-5,
                               atol=0)
    # torch's float64 layer_norm would overflow M2 too for float64 rows: by hand.
    expected_y = ((x64 - expected_mean[:, None]) * expected_rstd[:, None] * weight.double()
                  + bias.double())
    torch.testing.assert_close(y.cpu(), expected_y.to(dtype))


def check_whole_range_rows(forward: Callable, backward: Callable, dtype: torch.dtype, D: int,
                           device: str = "cpu") -> None:
    """Finite rows spread over +-max, given the forward and backward operators (the
    signatures of torch.ops.layernorm_ext.forward/backward).

    The variance overflows, so rstd = 0 and xhat = 0 (the formula at rstd = 0; torch's
    x * rstd - mean * rstd where its statistics stay finite, torch is often NaN here):
    y = bias and dx = dweight = 0. The mean stays finite and right although partial sums
    and x - mean overflow (the kernels' overflow rescue, math::kRescueFactor); inf * 0
    gave NaN before."""
    largest = LARGEST[dtype]
    gen = torch.Generator().manual_seed(D)

    def uniform(*shape, scale):
        return (2 * torch.rand(*shape, generator=gen, dtype=torch.float64) - 1) * scale

    x64 = uniform(4, D, scale=largest)
    x64[:, 0], x64[:, -1] = largest, -largest  # both ends in every row
    # The dtype's +max (up to three times), then -max only: 2 max from the first element,
    # which the CUDA register forward's sums are shifted by (math::row_shift_value; its
    # RowShift halves the deviations).
    lead = min(3, D - 1)
    x64[3, :lead], x64[3, lead:] = torch.finfo(dtype).max, -torch.finfo(dtype).max
    x = x64.to(device, dtype)
    weight = (uniform(D, scale=1.0) + 1).to(device, dtype)
    bias = uniform(D, scale=1.0).to(device, dtype)
    grad_out = uniform(4, D, scale=1.0).to(device, dtype)
    y, mean, rstd = forward(x, [D], weight, bias, 1e-5)
    assert torch.equal(rstd.cpu(), torch.zeros_like(rstd.cpu()))
    assert torch.isfinite(mean).all(), mean
    expected_mean = (x.cpu().double() / D).sum(1)  # divided first: the sum would overflow
    torch.testing.assert_close(mean.cpu().double().flatten(), expected_mean, rtol=1e-5, atol=0)
    assert torch.equal(y, bias.expand_as(y))
    dx, dweight, dbias = backward(grad_out, x, [D], mean, rstd, weight, bias)
    assert torch.equal(dx, torch.zeros_like(dx))
    assert torch.equal(dweight, torch.zeros_like(dweight))
    torch.testing.assert_close(dbias, grad_out.double().sum(0).to(dtype))


def check_constant_rows_far_from_zero_backward(forward: Callable, backward: Callable,
                                               dtype: torch.dtype, D: int, value: str,
                                               device: str = "cpu") -> None:
    """Constant rows of 1e33 (eps 1e-12, BERT's) or of the largest value (eps 1e-5), given
    the forward and backward operators: xhat = 0, so dx = rstd * (dy - mean(dy)), finite,
    and exactly 0 for one-element rows. The CPU's row sums once saw the zero-filled lanes
    past a row's end as x = 0, whose xhat (-mean * rstd) overflowed: NaN whenever D was
    no multiple of the vector chunk."""
    eps = 1e-12 if value == "1e33" else 1e-5
    fill = 1e33 if value == "1e33" else torch.finfo(dtype).max
    x = torch.full((3, D), fill, dtype=dtype).to(device)
    dy = torch.randn(3, D, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    y, mean, rstd = forward(x, [D], None, None, eps)
    dx, _, _ = backward(dy, x, [D], mean, rstd, None, None)
    # The variance is exactly 0: rstd is eps ** -0.5, to a few ulps of its dtype.
    exact_rstd = eps ** -0.5
    rstd_rtol = 1e-14 if rstd.dtype == torch.float64 else 5e-7
    torch.testing.assert_close(rstd.cpu().double(), torch.full((3,), exact_rstd,
                                                               dtype=torch.float64),
                               rtol=rstd_rtol, atol=0)
    dy64 = dy.cpu().double()
    expected = exact_rstd * (dy64 - dy64.mean(-1, keepdim=True))
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(dx.cpu().double(), expected, rtol=0,
                               atol=ATOL[dtype] * exact_rstd * dy64.abs().max().item())
    if D == 1:
        assert (dx == 0).all()


def check_module_under_autocast(ours: torch.nn.Module, theirs: torch.nn.Module, device: str,
                                input_dtype: torch.dtype, autocast_dtype: torch.dtype) -> None:
    """A module of ours against torch's under autocast, with the same random parameters
    (set here): torch's output dtype and values, and the parameter gradients to the
    rounding of the coarser of the input's and the output's dtypes (they come from the
    input's data: torch's sums differ at its rounding)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=gen).to(device, input_dtype)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen))
            q.copy_(p)
    with torch.autocast(device, dtype=autocast_dtype):
        expected = theirs(x)
        got = ours(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected)
    grad_out = torch.randn(got.shape, generator=gen).to(device, got.dtype)
    got.backward(grad_out)
    expected.backward(grad_out)
    coarse = max(input_dtype, got.dtype, key=lambda dtype: torch.finfo(dtype).eps)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad.to(coarse), q.grad.to(coarse))
