"""The CUDA kernels, run on the CPU by an emulator, against torch and a float64 reference.

Almost every machine that builds this project has no GPU, so the CUDA kernels would
otherwise be checked only by their compiled form (tests/test_cuda_static.py) and the
host replay of their indexing. Here the kernel sources themselves
(csrc/cuda/layernorm_cuda_{memory,device,forward,backward}.cuh), with the launch logic
of layernorm_cuda_kernels.cuh that picks a variant, slots and grid, are compiled as host
C++ (tests/cuda_emulator/cuda_emulation.h) and run with every thread of a block as a
coroutine that meets the others at each __syncthreads and warp shuffle
(tests/cuda_emulator/emulator.cpp); a vector access at an address a GPU would fault on
is an error there too. The cases reach every
kernel variant: forward in registers (slices of 32, 128 and 256 bytes, a thread per row
to 512-thread groups), backward in registers (a thread per row, the row kept, or read
twice), the
streaming kernels, float64, misaligned and mixed-alignment tensors, and the parameter-gradient
reduction; then the fuzz cases of tests/fuzz_cuda_cases.py (every layout,
multi-dimensional shapes, missing parameters). The variants run again with the threads
of each barrier interval in reverse and in random order: a missing barrier shows up as
a result that depends on the order.

What it does not check: timing, races the orders do not expose, and the device's own
rounding (rsqrt, contracted multiply-adds); compute-sanitizer on a GPU does the first
two (`make gpu-check`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from pathlib import Path

import pytest
import torch

from layernorm_cases import (ATOL, BOUNDARY_CASES, DTYPE_PAIRS, NORMS, check_case,
                             check_constant_largest_rows, check_constant_rows,
                             check_mean_square_of_like_terms, check_parameter_grads_of_many_rows,
                             check_constant_rows_far_from_zero_backward,
                             check_outlier_first_rows, check_ramp_rows,
                             check_rows_unlike_their_start, check_whole_range_rows,
                             check_wide_spread_rows, distance_from_zero, laid_out, random_case,
                             reference_errors, run_all, sanitizer_flags,
                             WELL_CONDITIONED)

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = ROOT / "tests" / "cuda_emulator"


@pytest.fixture(scope="module")
def emulated():
    """The emulated CUDA backend, compiled once (about a minute on 2 cores)."""
    from torch.utils.cpp_extension import load

    # Under `make test-sanitize`, with gcc's sanitizers as the extension (setup.py): ASan
    # then checks each access of the kernels against torch's allocations, as memcheck would.
    sanitize = sanitizer_flags()
    build = ROOT / "build" / ("cuda_emulator-sanitize" if sanitize else "cuda_emulator")
    build.mkdir(parents=True, exist_ok=True)
    return load(
        name="layernorm_ext_cuda_emulated",
        sources=[str(EMULATOR / "emulator.cpp"), str(EMULATOR / "emulated_ops.cpp"),
                 str(ROOT / "csrc" / "layernorm_checks.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(EMULATOR)],
        # -U_FORTIFY_SOURCE: glibc's checked longjmp would abort the emulator (emulator.cpp)
        extra_cflags=["-O2", "-ffp-contract=off", "-Wno-unknown-pragmas", "-U_FORTIFY_SOURCE",
                      *sanitize],
        extra_ldflags=sanitize,
        build_directory=str(build), verbose=os.environ.get("LAYERNORM_EXT_VERBOSE_BUILD") == "1")


def emulated_results(emu, x, normalized_shape, weight, bias, grad_out, eps,
                     input_requires_grad=True, norm="layer", outputs_like_input=False):
    """[output, grad_input, grad_weight, grad_bias] from the emulated CUDA operators,
    None where torch's autograd gives none (an absent parameter, an input that does not
    require grad); a layernorm_cases.OursFn once `emu` is bound. outputs_like_input: the
    kernels write y and dx at x's misalignment (emulated_ops.cpp)."""
    shape = list(normalized_shape)
    suffix = "_outputs_like_input" if outputs_like_input else ""
    if norm == "rms":
        output, rstd = getattr(emu, "rms_norm_forward" + suffix)(x, shape, weight, eps)
        grad_input, grad_weight = getattr(emu, "rms_norm_backward" + suffix)(
            grad_out, x, shape, rstd, weight)
        grad_bias = None
    else:
        output, mean, rstd = getattr(emu, "layer_norm_forward" + suffix)(
            x, shape, weight, bias, eps)
        grad_input, grad_weight, grad_bias = getattr(emu, "layer_norm_backward" + suffix)(
            grad_out, x, shape, mean, rstd, weight, bias)
    return [output, grad_input if input_requires_grad else None,
            grad_weight if weight is not None else None, grad_bias if bias is not None else None]


# Row lengths and the variants they reach (csrc/cuda/layernorm_cuda_config.h):
#   1, 7, 20        a thread alone on its row (up to 128 bytes), head and tail of several
#                   elements each, a block's rows staged through shared memory
#   256             forward: small slices (32 bytes a thread) in sub-warp groups
#   257, 1000       forward: large slices (128 bytes) in sub-warp groups or a warp
#                   (bf16 257: small slices); backward: 16 per thread, several rows per block
#   8200            forward: large slices in 512 threads (fp32: huge slices, 256
#                   threads); backward: 32 per thread, the row read twice
#   16383           forward: fp32 huge slices, every slot of 256 threads, a tail;
#                   backward: 32 per thread
#   16390           forward: fp32 streaming, 2-byte types 512 threads; backward streaming
#   32775           both streaming (every dtype), a tail after the last vector
ROW_SIZES = (1, 7, 20, 256, 257, 1000, 8200, 16383, 16390, 32775)
LAYOUTS = {
    # (x, grad_out). The ops allocate their outputs (y, dx) fresh, on a 16-byte boundary,
    # so an input one element past one ("offset") disagrees with them: the scalar
    # streaming path. Vectorized rows start mid-vector where D is not a multiple of the
    # vector width.
    "aligned": ("contiguous", "contiguous"),
    "offset": ("offset", "offset"),
    "mixed": ("offset", "contiguous"),
}


def rows_for(n: int) -> int:
    """Enough rows for several per backward slot, few enough for the emulator."""
    return 37 if n <= 1000 else 3


def past_a_vector(values: torch.Tensor, elements: int) -> torch.Tensor:
    """values, contiguous, starting `elements` elements past a 16-byte boundary."""
    storage = values.new_empty(values.numel() + elements)
    assert storage.data_ptr() % 16 == 0  # CPU allocations are 64-byte aligned
    storage[elements:] = values.reshape(-1)
    return storage[elements:].view(values.shape)


def check_emulated(emu, n, dtype, param_dtype, layout, norm, seed=0, rows=None, scale=1.0,
                   offset=0.0, weight_layout="contiguous", bias_layout="contiguous"):
    """The emulated kernels against torch on rows of n; a parameter laid out as None is
    absent (RMSNorm has no bias). A layout ("misaligned", k): x and grad_out start k
    elements past a 16-byte boundary, and the kernels write y and dx there too."""
    gen = torch.Generator().manual_seed(seed)
    rows = rows_for(n) if rows is None else rows
    misalign = layout[1] if isinstance(layout, tuple) else None

    def randn(size, how, dt, scale=1.0, offset=0.0):
        values = torch.randn(size, generator=gen, dtype=torch.float64) * scale + offset
        if how == "misaligned":
            return past_a_vector(values.to(dt), misalign)
        return laid_out(values.to(dt), how)

    x_layout, grad_layout = ("misaligned",) * 2 if misalign is not None else LAYOUTS[layout]
    x = randn((rows, n), x_layout, dtype, scale, offset)
    weight = randn((n,), weight_layout, param_dtype, 1.0, 1.0) if weight_layout else None
    bias = randn((n,), bias_layout, param_dtype) if bias_layout and norm == "layer" else None
    grad_out = randn((rows, n), grad_layout, dtype)
    eps = 1e-5
    ours, theirs, reference = run_all(x, (n,), weight, bias, grad_out, eps, norm=norm,
                                      ours_fn=functools.partial(
                                          emulated_results, emu,
                                          outputs_like_input=misalign is not None))
    conditioning = 0.0 if norm == "rms" else distance_from_zero(x, 1, eps)
    atol = ATOL[dtype] * max(1.0, conditioning / WELL_CONDITIONED)
    problems = reference_errors(ours, theirs, reference, dtype, atol=atol)
    assert not problems, (f"n={n} {dtype}/{param_dtype} {layout} {norm}:\n  "
                          + "\n  ".join(problems))


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("n", ROW_SIZES)
@pytest.mark.parametrize("dtype,param_dtype", [p for p in DTYPE_PAIRS if p[0] != torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_kernels_match_torch(emulated, n, dtype, param_dtype, norm):
    check_emulated(emulated, n, dtype, param_dtype, "aligned", norm)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("layout", ["offset", "mixed"])
@pytest.mark.parametrize("n", (7, 20, 257, 1000, 8200))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_misaligned_tensors(emulated, n, dtype, layout, norm):
    check_emulated(emulated, n, dtype, dtype, layout, norm)


# The long-row backward (kElemsBackwardLong: 8192 < D <= 16384, dy and x read twice)
# with several slots of several rows each (40 rows), rows that end mid-vector
# and, offset, a head before the first vector.
LONG_BACKWARD_ROWS = 40


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("layout", ["aligned", "offset"])
@pytest.mark.parametrize("n", (8193, 12289))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_long_backward_slots(emulated, n, dtype, layout, norm):
    assert emulated.config_of(True, n, dtype.itemsize, True)[:2] == ("registers", 32)
    check_emulated(emulated, n, dtype, dtype, layout, norm, rows=LONG_BACKWARD_ROWS)


# The streaming backward (D > 16384, or tensors of differing alignment): its column
# kernel runs down each slot's rows kColumnRowsInFlight at a time, so a slot here has
# 8-14 rows (5 to 8 slots; the last group of 4 partial), in the vector and the scalar
# layouts.
STREAMING_BACKWARD_ROWS = 70


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("layout", ["aligned", "offset", "mixed"])
@pytest.mark.parametrize("n", (16390, 20001))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_streaming_backward_slots(emulated, n, dtype, layout, norm):
    assert emulated.config_of(True, n, dtype.itemsize, True)[0] == "streaming"
    check_emulated(emulated, n, dtype, dtype, layout, norm, rows=STREAMING_BACKWARD_ROWS)


@pytest.mark.parametrize("rows", (1, 3, 7))
@pytest.mark.parametrize("layout", ["aligned", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_streaming_backward_fewer_rows_than_the_period(emulated, dtype, layout, rows):
    """Fewer rows than the alignment period (8 for bfloat16 rows of odd length): a slot a
    row, each split as its own row (cuda_config::column_slots)."""
    assert emulated.config_of(True, 20001, dtype.itemsize, True)[0] == "streaming"
    check_emulated(emulated, 20001, dtype, dtype, layout, "layer", rows=rows)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("n", (1, 20, 1000))
def test_float64_streams(emulated, n, norm):
    check_emulated(emulated, n, torch.float64, torch.float64, "aligned", norm)


@pytest.mark.parametrize("n", [20, 64])
@pytest.mark.parametrize("rows", [0, 1, 16, 700])
def test_row_counts(emulated, rows, n):
    """No rows (zero parameter gradients), one, one slot's worth, and more rows than the
    backward has slots at this width, and than the emulated device's 3 resident blocks of
    the forward hold (the grid-stride loops): a row per thread (20; its backward too) and
    small slices (64)."""
    check_emulated(emulated, n, torch.float32, torch.float32, "aligned", "layer", rows=rows)


STAGED_ROWS = 700  # 6 blocks of 128 rows, the last partial, on 3 resident blocks: 2 rounds


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("n,dtype", [(1, torch.float32), (7, torch.float32), (16, torch.float32),
                                     (20, torch.float32), (32, torch.float32),
                                     (20, torch.bfloat16), (33, torch.bfloat16),
                                     (64, torch.bfloat16), (18, torch.bfloat16),
                                     (12, torch.float16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_staged_rows(emulated, n, dtype, norm):
    """Rows a thread each go through shared memory a block of rows at a time, forward and
    backward (cuda_config::kStage{,Backward}RowsPerThread): forward blocks that loop over
    several, a partial last block, a column's dgamma/dbeta over 128 threads (D = 1), 3
    (bf16 D = 33) or 2 (64), rows that start mid-vector (D = 7, 20, 33), padded rows in
    the tile (D = 16 and 32 float32, 64 bf16), and each unit width the tiles are read in
    (cuda_config::staged_unit_width: 1 at D = 1, 7, 33; 2 at float32 D = 16, 20, 32 and
    bf16 D = 18; 4 at 2-byte D = 12, 20, 64). Every span starts on a vector boundary here
    (fresh outputs, 128 rows a block); test_staged_rows_start_mid_vector has spans that
    start mid-vector, the host replay the indexing of each span start there can be."""
    check_emulated(emulated, n, dtype, dtype, "aligned", norm, rows=STAGED_ROWS)


# (D, dtype, misalignment in elements): the unit widths (cuda_config::staged_unit_width)
# with tensors that start mid-vector: 4 (bf16 D = 20 at 4, fp16 D = 12 at 4), 2 (bf16
# D = 20 at 2 and 6, D = 18 at 4, float32 D = 20 at 2), 1 (bf16 D = 20 at 1, D = 64 at 3,
# float32 D = 7 at 3).
MID_VECTOR_STAGED = [(20, torch.bfloat16, 1), (20, torch.bfloat16, 2), (20, torch.bfloat16, 4),
                     (20, torch.bfloat16, 6), (18, torch.bfloat16, 4), (64, torch.bfloat16, 3),
                     (12, torch.float16, 4), (20, torch.float32, 2), (7, torch.float32, 3)]


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("n,dtype,misalign", MID_VECTOR_STAGED,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_staged_rows_start_mid_vector(emulated, n, dtype, misalign, norm):
    """x, dy, y and dx all k elements past a 16-byte boundary: the staged kernels, still
    vectorized, place their first span k elements into the tile and read it in the units
    that misalignment allows (a unit too wide for it: a misaligned access, which the
    emulator reports as a GPU would)."""
    check_emulated(emulated, n, dtype, dtype, ("misaligned", misalign), norm, rows=STAGED_ROWS)


def test_mid_vector_cases_reach_every_unit_width(emulated):
    """The cases above take the staged kernels, forward and backward, in each unit width
    there is (1 alone without kStagedUnits)."""
    elem_bytes = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
    for n, dtype, _ in MID_VECTOR_STAGED:
        for backward in (False, True):
            kind, _, threads_per_row, _ = emulated.config_of(backward, n, elem_bytes[dtype], True)
            assert (kind, threads_per_row) == ("registers", 1), (n, dtype, backward)
    widths = {(elem_bytes[dtype], emulated.staged_unit_of(elem_bytes[dtype], n, misalign))
              for n, dtype, misalign in MID_VECTOR_STAGED}
    if emulated.staged_units:
        assert widths == {(2, 1), (2, 2), (2, 4), (4, 1), (4, 2)}
    else:
        assert widths == {(2, 1), (4, 1)}


# More spans of 128 rows than the row-per-thread backward has blocks (512, by
# kBackwardThreads): each block takes two, its dgamma/dbeta columns kept across them,
# the last span partial.
LOOPING_STAGED_ROWS = 2 * 512 * 128 - 700


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("n,dtype", [(7, torch.float32), (32, torch.float32),
                                     (20, torch.bfloat16), (64, torch.bfloat16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_staged_backward_blocks_loop(emulated, n, dtype, norm):
    check_emulated(emulated, n, dtype, dtype, "aligned", norm, rows=LOOPING_STAGED_ROWS)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("n,dtype,misalign", [
    (130, torch.float16, 6), (200, torch.float32, 1), (1000, torch.bfloat16, 3),
    (1024, torch.bfloat16, 5), (5000, torch.float32, 2), (12289, torch.float32, 3),
    (20000, torch.float32, 1), (20000, torch.bfloat16, 7)],
    ids=lambda v: str(v).replace("torch.", ""))
def test_vectorized_tensors_start_mid_vector(emulated, n, dtype, misalign, norm):
    """The other kernels with x, dy, y and dx all k elements past a 16-byte boundary, still
    vectorized: forwards in registers (small, large and huge slices), backwards in
    registers (the row kept or read twice), and the streaming kernels (D = 20000)."""
    check_emulated(emulated, n, dtype, dtype, ("misaligned", misalign), norm)


def test_without_bias_and_offset_rows(emulated):
    check_emulated(emulated, 1000, torch.float32, torch.float32, "aligned", "layer",
                   bias_layout=None, scale=1.0, offset=1e4)


# Each kernel reads the weight and bias one of a few ways: plain vector loads where every
# parameter it applies is present and starts a 16-byte vector where every row's vectors
# start (D a multiple of the vector width), else the general reads (a fill for an absent
# parameter, scalar loads for a misaligned one). Contiguous parameters take the first
# way at n = 64 (bf16: a row per thread), 256, 1000, 8200, 16392 (float32 streaming) and
# 32776 (bf16 streaming); offset ones, and n = 20 (bf16), 257 and 32775, the second.
# The forwards have two more (with_param_reads): no reads when no parameter is present,
# and, for LayerNorm without a bias, vector loads of the weight alone (at the n of the
# first way). bf16 rows with float32 parameters read two 4-element vectors per 8 elements.
PARAM_LAYOUTS = [("contiguous", "contiguous"), ("offset", "contiguous"),
                 ("contiguous", "offset"), (None, "contiguous"), ("contiguous", None),
                 (None, None)]


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("weight_layout,bias_layout", PARAM_LAYOUTS, ids=str)
@pytest.mark.parametrize("n", (20, 64, 256, 257, 1000, 8200, 16392, 32775, 32776))
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_parameter_reads(emulated, n, dtype, param_dtype, weight_layout, bias_layout, norm):
    if norm == "rms" and bias_layout != "contiguous":
        pytest.skip("RMSNorm has no bias: the same case as with a contiguous one")
    check_emulated(emulated, n, dtype, param_dtype, "aligned", norm,
                   weight_layout=weight_layout, bias_layout=bias_layout)


# tests/fuzz_cuda_cases.py's cases (the kernels' boundary shapes, then seeded random ones:
# multi-dimensional normalized shapes, every layout of x, grad_out and the parameters,
# value ranges, eps, missing parameters), judged as tests/test_fuzz.py judges the CPU.
FUZZ_RNG = random.Random(0)
FUZZ_CASES = list(BOUNDARY_CASES) + [random_case(FUZZ_RNG) for _ in range(200)]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("index", range(len(FUZZ_CASES)))
def test_fuzz_cases(emulated, index, norm):
    case = dataclasses.replace(FUZZ_CASES[index], norm=norm)
    check_case(case, "cpu", ours_fn=functools.partial(emulated_results, emulated))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [2, 5, 33, 100, 1000, 2000, 5000, 16383, 16390])
def test_overflow_rescue(emulated, dtype, D):
    """Rows spanning +-max (tests/test_extreme_values.py on CPU/CUDA), in every forward
    variant: small slices (D <= 100), large slices in sub-warp groups to blocks (D = 1000
    .. 5000; bf16 16383, 16390), fp32 huge slices (16383), streaming (fp32 D = 16390,
    float64)."""
    check_whole_range_rows(emulated.layer_norm_forward, emulated.layer_norm_backward, dtype, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("offset", [100.0, 1000.0])
@pytest.mark.parametrize("D", [20, 45, 100, 1000, 4133, 16383, 16390])
def test_ramps_far_from_zero(emulated, dtype, offset, D):
    """Sorted rows offset..offset + 1 (tests/test_extreme_values.py on CPU/CUDA) in every
    forward and backward variant: a thread per row (fp32 20), small slices (45, 100),
    large (1000, 4133), fp32 huge slices (16383), streaming (fp32 16390, float64). Before
    the forwards merged their threads' means less the row's shift (row_norm_stats), D =
    45 at offset 1000 had 400x torch's error in y, and the streaming forward (fp32
    16390), whose Chan merges took means not less a shift, 5x."""
    check_ramp_rows(dtype, offset, D, ours_fn=functools.partial(emulated_results, emulated))


@pytest.mark.parametrize("odd_at", [0, 1, 17], ids=lambda i: f"odd_at{i}")
@pytest.mark.parametrize("D", [20, 100, 1000, 4133, 16383, 16390])
def test_ramps_with_an_odd_early_value(emulated, D, odd_at):
    """Ramps at offset 100 (float32) with one value near the start far from the rest, or
    0 (tests/test_extreme_values.py on CPU/CUDA), in every float32 forward variant."""
    check_ramp_rows(torch.float32, 100.0, D, odd_at=odd_at,
                    ours_fn=functools.partial(emulated_results, emulated))


@pytest.mark.parametrize("D", [20, 100, 1000, 4133, 16383, 16390])
def test_an_outlier_first_value_leaves_the_others_accurate(emulated, D):
    """float32 rows whose first value is 1000 among N(0, 1) values (tests/
    test_extreme_values.py on CPU/CUDA), in every float32 forward variant, as above.
    Shifted by that first value (row_norm_stats, before math::row_shift_value), their
    deviations from it gave 10-30x torch's error at D = 20, 1000, 4133, 16383."""
    check_outlier_first_rows(D, ours_fn=functools.partial(emulated_results, emulated))


@pytest.mark.parametrize("dtype,D", [(torch.float32, 64), (torch.bfloat16, 256),
                                     (torch.float32, 1000), (torch.float32, 2000),
                                     (torch.float32, 4132), (torch.float32, 16384),
                                     (torch.float32, 16390)], ids=str)
def test_rows_unlike_their_start(emulated, dtype, D):
    """Rows whose first elements mislead their shift (tests/test_extreme_values.py on
    CPU/CUDA) take their statistics again, less their mean, in every forward variant:
    small slices in sub-warp groups (float32 64: four rows a warp, none far enough from
    its shift; bf16 256: two rows a warp, which take a second pass together:
    __any_sync), large (1000; 2000: two rows of two warps a block, together:
    __syncthreads_or; 4132), huge slices (16384), streaming (16390). Without the votes,
    bf16 256 and float32 2000 deadlock here; before the second pass, 4132, 16384 and
    16390 broke the statistics' bound. (Rows start 16 bytes apart, as the register
    forwards need.)"""
    check_rows_unlike_their_start(emulated.layer_norm_forward, dtype, D,
                                  ours_fn=functools.partial(emulated_results, emulated))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [20, 1000, 16383, 16390, 65536, (1 << 20) + 3])
def test_mean_square_of_like_terms(emulated, D, dtype):
    """RMSNorm's mean(x^2) of constant rows (tests/test_rms_norm.py on the CPU) in every
    forward variant: staged (20), register slices (1000; float32 16383: 64 squares a
    thread), streaming (16390, 65536, 2^20 + 3: 2048 a thread). One chain of a thread's
    squares gave float32 rstd relative errors of 4.3e-7 (16383), 5.3e-7 (65536) and
    2.4e-6 (2^20 + 3), bfloat16 9.1e-6 there; two chains in registers and runs of 16
    vectors' sums when streaming: 1.35e-7 at most."""
    check_mean_square_of_like_terms(emulated.rms_norm_forward, D, dtype)


@pytest.mark.parametrize("data", ["signed", "positive"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("D", [20, 64])
def test_parameter_grads_of_many_rows_keep_their_accuracy(emulated, D, norm, data):
    """dgamma/dbeta of 131072 rows (tests/test_extreme_sizes.py on CPU/CUDA) in the CUDA
    kernels' order of sums: the staged backward (D = 20) or the register one (64), then
    the finalize kernel's lanes. Measured so (2026-12-07): RMSNorm's 0.35x to 1.0x the
    error of torch's CPU kernels, LayerNorm's 17x to 66x smaller; at 2^22 rows of 16,
    RMSNorm's 1.45x and 0.75x (signed, positive data). The GPU's own rounding
    (contracted multiply-adds, approximate rsqrt) is not modelled here."""
    check_parameter_grads_of_many_rows(norm, data, D,
                                       ours_fn=functools.partial(emulated_results, emulated))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [7, 16, 33, 100, 1000, 8200, 16383, 16390])
def test_constant_rows(emulated, dtype, D):
    """Rows of one value (tests/test_extreme_values.py on CPU/CUDA): every thread's
    two-pass moments must give such a row its value as mean and M2 = 0. A thread per
    row (fp32 7, 16), small slices (33, 100), large (1000; bf16 8200, 16383), fp32 huge
    slices (8200, 16383), streaming (fp32 16390, float64). A plain sum / count failed
    for fp32 D = 7, 15, 16, 33 and 1000 on an H200, and here also for 100."""
    check_constant_rows(emulated.layer_norm_forward, dtype, D,
                        ours_fn=functools.partial(emulated_results, emulated))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [32, 64, 1023, 2047, 8200, 16383, 32767])
def test_constant_largest_rows(emulated, dtype, D):
    """Rows of +-max in every element, where a thread's partial sum is longest: a thread
    alone on its row (fp32 D = 32, bf16 D = 64), bf16 large slices with a head and a
    tail (1023, 2047, and 32767 in 512 threads: 66 values a thread) and without (8200:
    64), fp32 huge slices (16383: up to 66 with a head and a tail), fp32 streaming
    (32767)."""
    check_constant_largest_rows(emulated.layer_norm_forward, dtype, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [1, 20, 33, 200, 1023, 9000, 20000])
@pytest.mark.parametrize("value", ["1e33", "largest"])
def test_backward_of_constant_rows_far_from_zero(emulated, dtype, D, value):
    """Constant rows far from 0 (tests/test_extreme_values.py on CPU/CUDA) through the
    backward variants: a thread per row (fp32 1, 20; bf16 1, 20, 33), registers (fp32
    33; 200, 1023; 9000 with the row read twice), streaming (20000, float64)."""
    check_constant_rows_far_from_zero_backward(emulated.layer_norm_forward,
                                               emulated.layer_norm_backward, dtype, D, value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [20, 64, 200, 1024, 5000, 12289, 20000])
def test_rows_whose_m2_overflows_but_not_their_variance(emulated, dtype, D):
    """Rows of +-a, D * a^2 past max, a^2 within it, in every forward variant: a thread
    per row (fp32 20, bf16 20/64), small slices (200), large slices (1024, 5000; bf16
    12289, 20000), fp32 huge slices (12289), streaming (fp32 20000, float64)."""
    check_wide_spread_rows(emulated.layer_norm_forward, dtype, D)


def test_cases_reach_every_variant(emulated):
    """The row sizes above reach each launch configuration they are meant to."""
    def kinds(direction, elem_bytes):
        """(kernel, elements per thread, whether a thread is alone on its row)."""
        configs = (emulated.config_of(direction == "backward", n, elem_bytes, True)
                   for n in ROW_SIZES)
        return {(kind, elems, threads == 1) for kind, elems, threads, _ in configs}

    registers = [("registers", 16, False), ("registers", 32, False), ("streaming", 0, False)]
    assert kinds("forward", 4) == {("registers", 8, False), ("registers", 32, True),
                                   ("registers", 32, False), ("registers", 64, False),
                                   ("streaming", 0, False)}
    assert kinds("forward", 2) == {("registers", 16, False), ("registers", 64, True),
                                   ("registers", 64, False), ("streaming", 0, False)}
    # A thread alone on its row: a large slice (128 bytes) of float32 or 2-byte elements.
    assert kinds("backward", 4) == set(registers) | {("registers", 32, True)}
    assert kinds("backward", 2) == set(registers) | {("registers", 64, True)}
    assert emulated.config_of(False, 20, 4, False)[0] == "streaming"  # mixed alignment


def test_emulator_shuffle_semantics(emulated):
    """The shuffles as CUDA defines them, within segments of `width` lanes:
    __shfl_down_sync leaves a lane past the segment's end its own value, __shfl_sync
    reads lane `src_lane % width` of the lane's own segment."""
    def down(delta, width):
        return emulated.shuffled_lanes(indexed=False, arg=delta, width=width)

    def indexed(src_lane, width):
        return emulated.shuffled_lanes(indexed=True, arg=src_lane, width=width)

    assert down(1, 32) == list(range(1, 32)) + [31]
    assert down(4, 8) == [lane + 4 if lane % 8 < 4 else lane for lane in range(32)]
    assert indexed(0, 32) == [0] * 32
    assert indexed(3, 8) == [lane // 8 * 8 + 3 for lane in range(32)]
    assert indexed(9, 8) == [lane // 8 * 8 + 1 for lane in range(32)]


@pytest.fixture(params=["reverse", "shuffled"])
def schedule(emulated, request):
    """Threads run between barriers in reverse, or in a random order, instead of by index."""
    emulated.set_schedule(request.param, 1234)
    yield request.param
    emulated.set_schedule("in_order")


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("n", ROW_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_kernels_do_not_depend_on_thread_order(emulated, schedule, n, dtype, norm):
    """A race (a thread reading what another wrote without a barrier between) would give
    other values in another order; the results must be bitwise the same in every order."""
    check_thread_order(emulated, schedule, n, dtype, norm, rows_for(n))


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_long_backward_does_not_depend_on_thread_order(emulated, schedule, norm):
    check_thread_order(emulated, schedule, 12289, torch.bfloat16, norm, LONG_BACKWARD_ROWS)


def check_thread_order(emulated, schedule, n, dtype, norm, rows):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n, generator=gen).to(dtype)
    weight = torch.randn(n, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if norm == "layer" else None
    grad_out = torch.randn(rows, n, generator=gen).to(dtype)
    ordered = emulated_results(emulated, x, (n,), weight, bias, grad_out, 1e-5, norm=norm)
    emulated.set_schedule("in_order")
    by_index = emulated_results(emulated, x, (n,), weight, bias, grad_out, 1e-5, norm=norm)
    for name, a, b in zip(("output", "grad_input", "grad_weight", "grad_bias"), ordered, by_index):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b), f"{name} differs under the {schedule} schedule"


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_staged_rows_do_not_depend_on_thread_order(emulated, schedule, dtype, norm):
    """The staged rows' tiles are copied in, read by rows and (backward) by columns,
    written in place and copied out, then reused by the block's next rows; the backward's
    column sums go through shared memory at the end: every step needs its barrier."""
    check_thread_order(emulated, schedule, 20, dtype, norm, STAGED_ROWS)


def test_emulator_schedules_expose_a_race(emulated):
    """The emulator's own check: a read racing with a write sees either value."""
    try:
        seen = set()
        for name in ("in_order", "reverse"):
            emulated.set_schedule(name)
            seen.add(emulated.racy_read())
        assert seen == {0, 1}
    finally:
        emulated.set_schedule("in_order")


def test_emulator_reports_divergent_barrier(emulated):
    with pytest.raises(RuntimeError, match="deadlock"):
        emulated.divergent_barrier()


def test_emulator_reports_divergent_shuffle(emulated):
    with pytest.raises(RuntimeError, match="different kinds or widths"):
        emulated.divergent_shuffle()


def test_emulator_reports_misaligned_vector_access(emulated):
    assert emulated.vector_load_at(4) == 5.0
    with pytest.raises(RuntimeError, match="misaligned address: a 16-byte access"):
        emulated.vector_load_at(1)

