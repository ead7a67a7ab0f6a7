"""Extreme values: NaN/Inf, zero-variance rows, large offsets, values near the dtype's max.

Where torch's own result is the standard (which outputs are NaN or Inf), ours must agree
with it exactly; where there is a right answer, ours is judged against the float64 (or
extended-precision) reference with the bound of layernorm_cases.reference_errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import layernorm_ext
from layernorm_cases import (ATOL, LARGEST, OUTPUT_NAMES, check_constant_largest_rows,
                             check_constant_rows, check_constant_rows_far_from_zero_backward,
                             check_outlier_first_rows, check_ramp_rows,
                             check_rows_unlike_their_start, check_whole_range_rows,
                             check_wide_spread_rows, max_abs_error, params, random64,
                             reference_errors, run_all)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def special_masks(t: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"nan": torch.isnan(t), "+inf": torch.isposinf(t), "-inf": torch.isneginf(t)}


def assert_same_special_values(ours, theirs, names=OUTPUT_NAMES):
    """NaN, +Inf and -Inf at exactly the same places in ours and torch's results."""
    for name, o, t in zip(names, ours, theirs, strict=True):
        for kind, mask in special_masks(t).items():
            got = special_masks(o)[kind]
            assert torch.equal(got, mask), (
                f"{name}: {kind} at {got.nonzero().tolist()[:8]} (ours) vs "
                f"{mask.nonzero().tolist()[:8]} (torch)")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("D", [5, 33, 100])
def test_nan_and_inf_in_rows_propagate_as_torch(device, dtype, D):
    x = random64(8, D).to(device, dtype)
    inf = float("inf")
    x[1, 2] = float("nan")
    x[2, 3] = inf
    x[3, 0] = -inf
    x[4, 1], x[4, 4] = inf, -inf
    x[5] = float("nan")
    x[6] = inf
    weight, bias = params(D, dtype, device)
    grad_out = random64(8, D, seed=2).to(device, dtype)
    ours, theirs, reference = run_all(x, [D], weight, bias, grad_out)
    assert_same_special_values(ours, theirs)
    # The rows without special values are untouched by their neighbours.
    clean = [0, 7]
    problems = reference_errors([ours[0][clean], ours[1][clean]],
                                [theirs[0][clean], theirs[1][clean]],
                                [reference[0][clean], reference[1][clean]], dtype)
    assert not problems, problems


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("where", ["weight", "bias"])
def test_nan_and_inf_in_params_propagate_as_torch(device, dtype, where):
    D = 40
    x = random64(6, D).to(device, dtype)
    weight, bias = params(D, dtype, device)
    grad_out = random64(6, D, seed=2).to(device, dtype)
    flat = {"weight": weight, "bias": bias}[where].view(-1)
    flat[3], flat[17], flat[-1] = float("nan"), float("inf"), -float("inf")
    ours, theirs, _ = run_all(x, [D], weight, bias, grad_out)
    assert_same_special_values(ours, theirs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("D", [5, 40, 100])
def test_nan_and_inf_in_grad_out_make_the_same_rows_non_finite(device, dtype, D):
    """A NaN or infinite grad_out element leaves its row's dx undefined: every element of
    that row is non-finite in ours, as in torch's, and the other rows are untouched.
    Which of them are NaN and which +-Inf is not torch's: its dx = a*dy*w + b*x + c
    multiplies the uncentered x by the infinite row sums, and the centering then adds
    infinities of opposite signs (NaN), where ours centers first, rstd * (g - mean(g) -
    xhat * mean(g * xhat)), and may give +-Inf (at D = 5 torch's 25 elements of these
    rows are all NaN, ours 22 NaN and 3 +-Inf, in every dtype). y, dW and dB: exactly
    torch's NaN/Inf."""
    rows = 8
    x = random64(rows, D).to(device, dtype)
    weight, bias = params(D, dtype, device)
    grad_out = random64(rows, D, seed=2).to(device, dtype)
    inf = float("inf")
    grad_out[0, 1] = inf  # a lone +Inf, then -Inf, at other places
    grad_out[2, D - 1] = -inf
    grad_out[3, D // 2] = float("nan")
    grad_out[4, 0], grad_out[4, D - 1] = inf, inf  # two of the same sign
    grad_out[5, 0], grad_out[5, D - 1] = inf, -inf
    special_rows = [0, 2, 3, 4, 5]
    ours, theirs, reference = run_all(x, [D], weight, bias, grad_out)
    not_dx = [0, 2, 3]
    assert_same_special_values([ours[i] for i in not_dx], [theirs[i] for i in not_dx],
                               [OUTPUT_NAMES[i] for i in not_dx])
    dx_ours, dx_torch = ours[1], theirs[1]
    assert not torch.isfinite(dx_ours[special_rows]).any(), dx_ours[special_rows]
    assert not torch.isfinite(dx_torch[special_rows]).any(), "torch's rows changed"
    clean = [1, 6, 7]
    problems = reference_errors([dx_ours[clean]], [dx_torch[clean]], [reference[1][clean]],
                                dtype, names=["grad_input"])
    assert not problems, problems


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 3, 7, 15, 16, 33, 100, 1000])
def test_constant_rows_match_reference(device, dtype, D):
    check_constant_rows(torch.ops.layernorm_ext.forward, dtype, D, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [8, 64, 100])  # even: rows of mean 0
def test_subnormal_outputs_are_kept(device, dtype, D):
    # Rows of +-1 with eps = 0 have xhat = +-1 exactly, so y = +-weight exactly: here
    # subnormal values (bf16's are float32's), which a conversion that flushes them
    # (e.g. vcvtne2ps2bf16) would turn into zeros.
    x = torch.tensor([1.0, -1.0]).repeat(4, D)[:, :D].to(device, dtype)
    tiny = torch.finfo(dtype).smallest_normal / 4
    weight = torch.full((D,), tiny, dtype=dtype, device=device)
    y = layernorm_ext.layer_norm(x, [D], weight, None, 0.0)
    assert torch.equal(y, x * weight), (y, x * weight)
    assert (y != 0).all()
    # Backward: with grad_out = tiny * [1, 1, -1, -1, ...], mean(g) = mean(g * xhat) = 0
    # (D % 4 == 0), so dx = grad_out exactly.
    if D % 4 == 0:
        grad_out = tiny * torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(4, D // 4).to(device, dtype)
        x.requires_grad_()
        (dx,) = torch.autograd.grad(layernorm_ext.layer_norm(x, [D], None, None, 0.0), x, grad_out)
        assert torch.equal(dx, grad_out), (dx, grad_out)
        assert (dx != 0).all()


def ulp(value: float, dtype: torch.dtype) -> float:
    v = torch.tensor(value, dtype=dtype)
    return (torch.nextafter(v, torch.tensor(float("inf"), dtype=dtype)) - v).item()


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.float64, 1e8),
                                          (torch.float64, 1e12)], ids=str)
@pytest.mark.parametrize("D", [7, 64, 1000, 4097])
def test_large_offset_small_spread_keeps_accuracy(device, dtype, offset, D):
    """offset + N(0, 1): the statistics must not cancel catastrophically.

    The inputs are exact in the reference; what no algorithm avoids is rounding the mean
    to the dtype: an error of ulp(offset)/2 in every x - mean, i.e. in xhat (rstd ~ 1).
    So the slack on top of 2x torch's error is a few ulps of the offset (times the
    output's scale) instead of a few ulps of 1. A one-pass E[x^2] - E[x]^2 variance is
    off by ~1e3 here, which the bound rejects (checked below).
    """
    x = random64(8, D, seed=D, offset=offset).to(device, dtype)
    weight, bias = params(D, dtype, device)
    grad_out = random64(8, D, seed=2).to(device, dtype)
    ours, theirs, reference = run_all(x, [D], weight, bias, grad_out)
    problems = reference_errors(ours, theirs, reference, dtype, atol=8 * ulp(offset, dtype))
    assert not problems, problems
    if (dtype, offset) == (torch.float32, 1e4):  # well conditioned enough for the usual bound
        problems = reference_errors(ours, theirs, reference, dtype)
        assert not problems, problems

    bound = 8 * ulp(offset, dtype) * weight.abs().max().item()
    assert max_abs_error(ours[0], reference[0]) <= bound
    # The bound is tight enough to catch the textbook one-pass variance.
    xs = x.cpu()
    one_pass_var = (xs * xs).mean(-1, keepdim=True) - xs.mean(-1, keepdim=True) ** 2
    one_pass = ((xs - xs.mean(-1, keepdim=True)) / (one_pass_var.clamp_min(0) + 1e-5).sqrt()
                * weight.cpu() + bias.cpu())
    assert max_abs_error(one_pass, reference[0]) > bound

    _, mean, rstd = torch.ops.layernorm_ext.forward(x, [D], weight, bias, 1e-5)
    exact_mean = x.cpu().double().mean(-1)
    assert (mean.cpu().double() - exact_mean).abs().max().item() <= 4 * ulp(offset, dtype)
    # rstd against numpy's long double, two-pass (torch's float64 var is itself 5e-5 off at
    # offset 1e12): a few ulps, plus the squared error of a mean rounded to the dtype.
    rows = x.cpu().double().numpy().astype(np.longdouble)
    centered = rows - rows.mean(-1, keepdims=True)
    exact_rstd = 1 / np.sqrt((centered * centered).mean(-1) + np.longdouble(1e-5))
    relative = np.abs(rstd.cpu().double().numpy().astype(np.longdouble) / exact_rstd - 1).max()
    rstd_bound = 8 * torch.finfo(dtype).eps + (ulp(offset, dtype) * exact_rstd.max()) ** 2
    assert relative <= rstd_bound, (float(relative), float(rstd_bound))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("offset", [10.0, 100.0, 1000.0])
@pytest.mark.parametrize("D", [20, 45, 90, 768, 1000, 4096, 4133])
def test_ramps_far_from_zero_as_accurate_as_torch(device, dtype, offset, D):
    """Sorted rows far from zero (layernorm_cases.check_ramp_rows). Short rows too: the
    CPU's unshifted Welford failed at offset 1000 from D = 39 on."""
    check_ramp_rows(dtype, offset, D, device)


@pytest.mark.parametrize("odd_at", [0, 1, 17], ids=lambda i: f"odd_at{i}")
@pytest.mark.parametrize("D", [20, 45, 4096])
def test_ramps_with_an_odd_early_value_as_accurate_as_torch(device, D, odd_at):
    """Ramps at offset 100 (float32) with one value near the start far from the rest, or
    0 (layernorm_cases.check_ramp_rows): their shift must not hang on that value."""
    check_ramp_rows(torch.float32, 100.0, D, device, odd_at=odd_at)


@pytest.mark.parametrize("D", [7, 18, 20, 22, 27, 31, 64, 768, 4096, 4133])
def test_an_outlier_first_value_leaves_the_others_accurate(device, D):
    """A row whose first value is far from the rest (layernorm_cases.check_outlier_first_rows).
    D < 32: the CPU's rows shorter than a vector, shifted by their first element before
    short_row_shift (9-14x torch's error at D = 18..27)."""
    check_outlier_first_rows(D, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 768, 2000, 4096, 4133, 20000])
def test_rows_unlike_their_start_as_accurate_as_torch(device, dtype, D):
    """Rows whose first values mislead their shift (layernorm_cases.
    check_rows_unlike_their_start) take their statistics again, less their mean; the rows
    beside them keep theirs. On CUDA, float32 2000 has two rows of two warps a block,
    which take a second pass together (__syncthreads_or)."""
    def forward(x, shape, weight, bias, eps):
        return torch.ops.layernorm_ext.forward(x, shape, weight, bias, eps)
    check_rows_unlike_their_start(forward, dtype, D, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [2, 7, 20, 31])
def test_short_half_rows_keep_the_variance_accurate(device, dtype, D):
    """Half/bf16 rows shorter than a CPU vector chunk take their moments from one pass of
    sums shifted by the first element. Its worst case is a first element far from the
    rest (the shifted squares are then up to n times m2, and cancel); a large common
    offset is the textbook E[x^2] - E[x]^2's (checked below to fail the bound). rstd
    must be within 2^-15 (relative) of float64's in both."""
    g = torch.Generator().manual_seed(D)
    outlier_first = torch.randn(32, D, generator=g, dtype=torch.float64) * 0.01
    outlier_first[:, 0] = (torch.randn(32, generator=g, dtype=torch.float64)
                           * 10.0 ** torch.arange(32).remainder(4))
    offset = 100 + torch.randn(32, D, generator=g, dtype=torch.float64) * (1 + torch.arange(32)[:, None] % 4)
    x = torch.cat([outlier_first, offset]).to(dtype)
    _, mean, rstd = torch.ops.layernorm_ext.forward(x.to(device), [D], None, None, 1e-5)
    exact = x.double()
    exact_rstd = (exact.var(-1, unbiased=False) + 1e-5).rsqrt()
    assert ((rstd.cpu().double() / exact_rstd) - 1).abs().max().item() <= 2.0 ** -15
    assert ((mean.cpu().double() - exact.mean(-1)).abs() / exact.abs().amax(-1)).max() <= 2.0 ** -20
    if D >= 7:  # (two values are too few to cancel much)
        f = exact.float()
        textbook = (((f * f).mean(-1) - f.mean(-1) ** 2).clamp_min(0) + 1e-5).rsqrt().double()
        assert ((textbook / exact_rstd) - 1).abs().max().item() > 2.0 ** -15


ROW_KINDS = ["uniform_to_max", "near_max", "one_at_max", "alternating_max", "sqrt_max", "tiny"]


def extreme_row(kind: str, D: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(D)
    largest = LARGEST[dtype]
    uniform = torch.rand(D, generator=g, dtype=torch.float64)
    normal = torch.randn(D, generator=g, dtype=torch.float64)
    if kind == "uniform_to_max":
        return (2 * uniform - 1) * largest
    if kind == "near_max":
        return largest * (1 - 1e-2 * uniform)
    if kind == "one_at_max":
        normal[D // 2] = largest
        return normal
    if kind == "alternating_max":
        return torch.tensor([largest, -largest], dtype=torch.float64).repeat(D)[:D]
    if kind == "sqrt_max":  # the squares reach the max
        return normal * largest ** 0.5
    if kind == "tiny":  # the squares underflow
        return normal * 1e-30
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ROW_KINDS)
def test_values_near_dtype_max_stay_finite_where_torch_does(device, dtype, kind):
    for D in (2, 5, 33, 100, 1000):
        x = extreme_row(kind, D, dtype).repeat(3, 1).to(device, dtype)
        weight, bias = params(D, dtype, device)
        grad_out = random64(3, D, seed=2).to(device, dtype)
        ours, theirs, reference = run_all(x, [D], weight, bias, grad_out)
        for name, o, t, r in zip(OUTPUT_NAMES, ours, theirs, reference):
            o, t = o.cpu(), t.cpu()
            torch_finite = torch.isfinite(t)
            assert torch.isfinite(o)[torch_finite].all(), (
                f"D={D} {name}: not finite where torch's is")
            # Nor where the float64 result fits the dtype, even if torch's overflows (in
            # many of these cases it does everywhere, and the check above checks nothing).
            assert torch.isfinite(o)[torch.isfinite(r.to(o.dtype))].all(), (
                f"D={D} {name}: not finite where the exact result fits {o.dtype}")
            if not torch.isfinite(r).all():
                continue
            # Where torch is finite, no worse than torch (torch itself may be far off:
            # its fp32 statistics overflow too).
            err_ours = max_abs_error(o[torch_finite], r[torch_finite])
            err_torch = max_abs_error(t[torch_finite], r[torch_finite])
            scale = max(1.0, r.abs().max().item())
            assert err_ours <= 2 * err_torch + ATOL[dtype] * scale, (
                f"D={D} {name}: error {err_ours:.3g} vs torch's {err_torch:.3g}")


# Dtypes whose accumulation type has no more range than they have: a row spanning their
# whole range overflows the variance.
ACC_RANGE_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", ACC_RANGE_DTYPES, ids=str)
@pytest.mark.parametrize("D", [2, 5, 33, 100, 1000, 5000])
def test_rows_spanning_the_whole_range_give_the_bias(device, dtype, D):
    """Finite rows spread over +-max: rstd = 0, y = bias, dx = dweight = 0, and a finite,
    right mean (layernorm_cases.check_whole_range_rows)."""
    check_whole_range_rows(torch.ops.layernorm_ext.forward, torch.ops.layernorm_ext.backward,
                           dtype, D, device)


@pytest.mark.parametrize("dtype", ACC_RANGE_DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 1023, 2047, 32767])
def test_rows_of_the_largest_value(device, dtype, D):
    """Rows of +-max in every element: a finite mean, y = bias
    (layernorm_cases.check_constant_largest_rows)."""
    check_constant_largest_rows(torch.ops.layernorm_ext.forward, dtype, D, device)


@pytest.mark.parametrize("dtype", ACC_RANGE_DTYPES, ids=str)
@pytest.mark.parametrize("D", [20, 64, 1024, 5000, 20000])
def test_rows_whose_m2_overflows_but_not_their_variance(device, dtype, D):
    """Rows of +-a with D * a^2 past max and a^2 within it: rstd = 1 / a and y as in
    float64 (layernorm_cases.check_wide_spread_rows)."""
    check_wide_spread_rows(torch.ops.layernorm_ext.forward, dtype, D, device)


@pytest.mark.parametrize("dtype", ACC_RANGE_DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 7, 20, 33, 1023, 1041])
@pytest.mark.parametrize("value", ["1e33", "largest"])
def test_backward_of_constant_rows_far_from_zero(device, dtype, D, value):
    """layernorm_cases.check_constant_rows_far_from_zero_backward."""
    check_constant_rows_far_from_zero_backward(torch.ops.layernorm_ext.forward,
                                               torch.ops.layernorm_ext.backward, dtype, D,
                                               value, device)
