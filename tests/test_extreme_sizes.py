"""Extreme sizes: one very long row, a million tiny rows, and more than 2^31 elements.

D = 1,000,000 with two rows is in tests/test_ops.py (test_d_one_million).
"""

from __future__ import annotations

import pytest
import torch

from layernorm_cases import ATOL, check_parameter_grads_of_many_rows, reference_errors, run_all

GiB = 1 << 30


def random64(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_and_check(x, normalized, weight, bias, grad_out):
    ours, theirs, reference = run_all(x, normalized, weight, bias, grad_out)
    problems = reference_errors(ours, theirs, reference, x.dtype)
    assert not problems, problems


@pytest.mark.parametrize("dtype,D", [(torch.float32, (1 << 23) + 3),
                                     (torch.bfloat16, (1 << 22) + 3)],
                         ids=["float32-8M", "bfloat16-4M"])
def test_one_long_row(device, dtype, D):
    x = (random64(1, D) * 2 + 0.5).to(device, dtype)  # D: not a multiple of any vector width
    weight = (random64(D, seed=1) + 1).to(device, dtype)
    bias = random64(D, seed=2).to(device, dtype)
    run_and_check(x, [D], weight, bias, random64(1, D, seed=3).to(device, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [1, 3])
def test_a_million_tiny_rows(device, dtype, D):
    M = (1 << 20) + 7
    x = (random64(M, D) * 2 + 0.5).to(device, dtype)
    weight = (random64(D, seed=1) + 1).to(device, dtype)
    bias = random64(D, seed=2).to(device, dtype)
    run_and_check(x, [D], weight, bias, random64(M, D, seed=3).to(device, dtype))


@pytest.mark.parametrize("data", ["signed", "positive"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_parameter_grads_of_many_rows_keep_their_accuracy(device, norm, data):
    """dgamma (and dbeta) sum a term from every row: 131072 of them here. Summed one after
    another per thread (65536 a chunk on 2 threads), RMSNorm's dgamma had a relative error
    of 5.9e-6, 25x that of torch's composite rms_norm, which sums pairwise. In chunks of at
    most a few hundred rows whose partials were summed one after another: 6.8e-7 (signed
    data) and 7.6e-7 (positive), 2.9x and 3.6x torch's; summed pairwise: 2.9e-7 and 8.3e-8,
    1.25x and 0.4x. LayerNorm's: 2.8e-7 and 4.0e-7, where torch's kernel, whose threads
    sum one after another, has 8e-6 and 7e-6. Relative to max |reference|. The CUDA
    kernels' order of sums: tests/test_cuda_emulated.py."""
    # On a GPU, torch's CUDA kernels are the yardstick, and ours there are not measured at
    # this size yet (their order of sums is, on the emulator).
    floor = 2e-6 if device == "cuda" else 0.0
    check_parameter_grads_of_many_rows(norm, data, 64, device, floor=floor)


def available_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def correlate(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """c[j] = sum_i a[i] * b[i + j] for j < n, by FFT (float64)."""
    size = 1 << (a.numel() + b.numel()).bit_length()
    spectrum = torch.fft.rfft(a, size).conj() * torch.fft.rfft(b, size)
    return torch.fft.irfft(spectrum, size)[:n]


@pytest.mark.slow
def test_more_than_2_31_elements(device):
    """bf16 rows of 65,537 elements, 2^31 + 163,842 in all; forward and backward.

    Row i is the window base[i : i + D] of one random vector, so every row differs and
    the exact row statistics, grad_bias and grad_weight follow from prefix sums and one
    FFT correlation of `base`: all of them are checked, over every element. Outputs
    and input gradients are checked in full on rows sampled across the tensor, among
    them row 32767, which straddles element 2^31. Peak memory: x and one output, 8.6 GB.
    """
    M, D = 32770, 65537
    straddling_row = 2**31 // D  # 32767: its elements are on both sides of index 2^31
    assert M * D > 2**31 and straddling_row * D < 2**31 < (straddling_row + 1) * D
    if available_memory(device) < 11 * GiB:
        pytest.skip("needs 11 GiB of free memory: two 4.3 GB tensors and headroom")
    base = random64(M + D - 1).bfloat16()
    x = base.to(device).as_strided((M, D), (1, 1)).contiguous()
    base = base.double()

    output, mean, rstd = torch.ops.layernorm_ext.forward(x, [D], None, None, 1e-5)
    prefix = torch.cat([base.new_zeros(1), base.cumsum(0)])
    prefix_sq = torch.cat([base.new_zeros(1), (base * base).cumsum(0)])
    rows = torch.arange(M)
    exact_mean = (prefix[rows + D] - prefix[rows]) / D
    exact_var = (prefix_sq[rows + D] - prefix_sq[rows]) / D - exact_mean**2
    exact_rstd = (exact_var + 1e-5).rsqrt()
    torch.testing.assert_close(mean.cpu().double(), exact_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(rstd.cpu().double(), exact_rstd, rtol=1e-5, atol=0)

    sampled = sorted({0, 1, straddling_row, straddling_row + 1, M - 1, *range(0, M, 2048)})
    sample = x[sampled]
    dy_sample = sample  # backward below uses grad_out = x
    ours = [output[sampled]]
    del output
    grad_input, grad_weight, grad_bias = torch.ops.layernorm_ext.backward(
        x, x, [D], mean, rstd, None, None)
    ours.append(grad_input[sampled])
    del grad_input

    _, theirs, reference = run_all(sample, [D], None, None, dy_sample)
    problems = reference_errors(ours, theirs[:2], reference[:2], torch.bfloat16,
                                names=["output", "grad_input"])
    assert not problems, problems

    # grad_bias[j] = sum_i x[i, j];  grad_weight[j] = sum_i x[i, j] * (x[i, j] - m_i) r_i.
    exact_grad_bias = prefix[torch.arange(D) + M] - prefix[torch.arange(D)]
    exact_grad_weight = (correlate(exact_rstd, base * base, D)
                         - correlate(exact_mean * exact_rstd, base, D))
    # bf16 results: one rounding (2^-8 relative) on top of fp32 sums of 32,770 terms.
    for name, got, exact in [("grad_bias", grad_bias, exact_grad_bias),
                             ("grad_weight", grad_weight, exact_grad_weight)]:
        torch.testing.assert_close(got.cpu().double(), exact, rtol=2**-8,
                                   atol=ATOL[torch.bfloat16], msg=name)
