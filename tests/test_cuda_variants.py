"""CUDA-only cases: every kernel variant of csrc/cuda, at the edges of its range.

tests/test_ops.py runs the parity tests on every device; this file adds the cases that
only matter for the CUDA kernels' launch table (csrc/cuda/layernorm_cuda_config.h):
row lengths around each variant's limits with D % 8 != 0 (rows split into head, 16-byte
vectors and tail differently from row to row), tensors that are not 16-byte aligned
(scalar fallback), misaligned weight/bias (scalar parameter loads), float32 parameters
with half/bfloat16 input in every variant, missing weight/bias, many rows per backward
slot, and the forward's grid-stride loop. Skipped without a CUDA GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext
from layernorm_ext import layer_norm
from test_ops import ATOL, forward_backward, make_inputs, to64

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and layernorm_ext.has_cuda_kernels()),
    reason="needs a CUDA GPU and a CUDA build of layernorm_ext")

REDUCED = [torch.float16, torch.bfloat16]
# Row lengths at the edges of the launch table: forward registers, small slices (32
# bytes a thread) up to 256 fp32 / 512 2-byte elements, large slices (128 bytes) up to
# 8192 / 32768, fp32 huge slices (256 bytes) up to 16384, streaming beyond; backward
# registers (16/thread) up to 8192, registers (32/thread, the row read twice) up to
# 16384, streaming beyond. Odd lengths vary the
# row split per row.
EDGE_LENGTHS = [255, 256, 257, 511, 512, 513, 1001, 4099, 8191, 8192, 8193, 16383, 16384,
                16385, 32767, 32768, 32769]


def assert_close_to_reference(ours, x, w, b, dy, dtype, slack=1.0):
    """Each output within 2x torch's own error (plus ATOL) of the float64 reference."""
    D = x.shape[-1]
    theirs = forward_backward(F.layer_norm, x, [D], w, b, dy)
    ref = forward_backward(F.layer_norm, to64(x), [D], to64(w), to64(b), to64(dy))
    for name, o, t, r in zip(["output", "grad_input", "grad_weight", "grad_bias"], ours, theirs,
                             ref):
        if r is None:
            assert o is None, name
            continue
        assert o.dtype == t.dtype and o.shape == t.shape, name
        err_ours = (o.double() - r).abs().max().item()
        err_torch = (t.double() - r).abs().max().item()
        scale = max(1.0, r.abs().max().item())
        assert err_ours <= 2 * err_torch + slack * ATOL[dtype] * scale, (
            f"{name}: error {err_ours:.3g} vs torch's {err_torch:.3g}")


def random_grad(x, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g).to(x.device, x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32] + REDUCED, ids=str)
@pytest.mark.parametrize("D", EDGE_LENGTHS)
def test_variant_edges(dtype, D):
    rows = 37  # > 8 rows: every row offset modulo the vector width occurs
    x, w, b = make_inputs((rows, D), [D], dtype, "cuda", seed=D)
    dy = random_grad(x)
    ours = forward_backward(layer_norm, x, [D], w, b, dy)
    assert_close_to_reference(ours, x, w, b, dy, dtype)


def offset_view(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of t whose first element is `offset` elements past an aligned one."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 == (offset * t.element_size()) % 16
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + REDUCED, ids=str)
@pytest.mark.parametrize("D", [7, 64, 1000, 4096, 20000])
def test_misaligned_input_takes_scalar_path(dtype, D):
    x, w, b = make_inputs((9, D), [D], dtype, "cuda", seed=3)
    x = offset_view(x, 1)
    dy = offset_view(random_grad(x), 3)
    ours = forward_backward(layer_norm, x, [D], w, b, dy)
    assert_close_to_reference(ours, x, w, b, dy, dtype)


@pytest.mark.parametrize("dtype", [torch.float32] + REDUCED, ids=str)
@pytest.mark.parametrize("D", [20, 768, 1001, 8193, 20000])
def test_misaligned_weight_and_bias(dtype, D):
    x, w, b = make_inputs((11, D), [D], dtype, "cuda", seed=4)
    w, b = offset_view(w, 1), offset_view(b, 2)
    dy = random_grad(x)
    ours = forward_backward(layer_norm, x, [D], w, b, dy)
    assert_close_to_reference(ours, x, w, b, dy, dtype)


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("D", [20, 1001, 4096, 8193, 16385])
def test_reduced_input_with_fp32_params_every_variant(dtype, D):
    x, w, b = make_inputs((13, D), [D], dtype, "cuda", param_dtype=torch.float32, seed=5)
    dy = random_grad(x)
    y, dx, dw, db = forward_backward(layer_norm, x, [D], w, b, dy)
    assert y.dtype == dx.dtype == dtype and dw.dtype == db.dtype == torch.float32
    ref = forward_backward(F.layer_norm, to64(x), [D], to64(w), to64(b), to64(dy))
    # The same bounds as test_ops.test_reduced_input_with_fp32_params (torch CUDA has no
    # kernel for this dtype mix to compare with).
    torch.testing.assert_close(y.double(), ref[0], atol=ATOL[dtype] * 4, rtol=0)
    torch.testing.assert_close(dx.double(), ref[1], atol=ATOL[dtype] * 4, rtol=1e-2)
    # The float32 gradients at float32's bound, as test_ops (the input dtype's bound let a
    # sum rounded to bfloat16 pass).
    for name, o, r in (("grad_weight", dw, ref[2]), ("grad_bias", db, ref[3])):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(o.double(), r, rtol=0, atol=ATOL[torch.float32] * scale,
                                   msg=name)


@pytest.mark.parametrize("affine", [(True, False), (False, True), (False, False)],
                         ids=["weight_only", "bias_only", "none"])
@pytest.mark.parametrize("D", [20, 1001, 8193, 16385])
def test_missing_parameters(affine, D):
    x, w, b = make_inputs((10, D), [D], torch.bfloat16, "cuda", affine, seed=6)
    dy = random_grad(x)
    ours = forward_backward(layer_norm, x, [D], w, b, dy)
    assert_close_to_reference(ours, x, w, b, dy, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [8, 100, 1000, 6000, 9000])
def test_many_rows_per_backward_slot_bitwise_reproducible(dtype, D):
    rows = 5000 if D <= 1000 else 1200  # backward slots then hold up to ~20 rows each
    x, w, b = make_inputs((rows, D), [D], dtype, "cuda", seed=7)
    dy = random_grad(x)
    first = forward_backward(layer_norm, x, [D], w, b, dy)
    assert_close_to_reference(first, x, w, b, dy, dtype, slack=4.0)
    second = forward_backward(layer_norm, x, [D], w, b, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_forward_grid_stride_over_many_rows():
    # The forward grid is one wave of resident blocks (layernorm_cuda.cu, resident_blocks);
    # D = 4 runs a thread per row, 128 rows a block, so each block's grid-stride loop takes
    # hundreds of row groups here, and the last group is partial.
    rows = (1 << 19) * 16 + 5
    x = torch.randn(rows, 4, device="cuda", dtype=torch.float16)
    out = layer_norm(x, [4])
    torch.testing.assert_close(out, F.layer_norm(x, [4]), atol=2e-3, rtol=0)


# Which kernel the launch table picks (csrc/cuda/layernorm_cuda_config.h).
EXPECTED_KERNELS = [
    (torch.bfloat16, 20, "forward_staged_rows_kernel", "backward_staged_rows_kernel"),
    (torch.float32, 32, "forward_staged_rows_kernel", "backward_staged_rows_kernel"),
    (torch.float32, 64, "forward_registers_kernel", "backward_registers_kernel"),
    (torch.bfloat16, 1000, "forward_registers_kernel", "backward_registers_kernel"),
    (torch.bfloat16, 12000, "forward_registers_kernel", "backward_registers_kernel"),
    (torch.float32, 12000, "forward_registers_kernel", "backward_registers_kernel"),
    (torch.float16, 20000, "forward_registers_kernel",
     "backward_row_means_kernel+backward_columns_kernel"),
    (torch.float32, 20000, "forward_streaming_kernel",
     "backward_row_means_kernel+backward_columns_kernel"),
    (torch.float64, 64, "forward_streaming_kernel",
     "backward_row_means_kernel+backward_columns_kernel"),
]


@pytest.mark.parametrize("dtype,D,forward_kernel,backward_kernel", EXPECTED_KERNELS,
                         ids=[f"{str(d)[6:]}-{n}" for d, n, _, _ in EXPECTED_KERNELS])
def test_launch_table_picks_expected_kernels(dtype, D, forward_kernel, backward_kernel):
    x, w, b = make_inputs((8, D), [D], dtype, "cuda", seed=8)
    x.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        layer_norm(x, [D], w, b).sum().backward()
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    if "layernorm_ext" not in names:
        pytest.skip("the profiler recorded no CUDA kernels (CUPTI unavailable?)")
    assert all(k in names for k in [forward_kernel, *backward_kernel.split("+")]), names
    assert "finalize_param_grads_kernel" in names, names


# --- RMSNorm: the same kernels with the Norm::kRms flag, through every variant ------------

RMS_LAYOUTS = ["aligned", "misaligned_input", "misaligned_weight"]


@pytest.mark.parametrize("layout", RMS_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + REDUCED, ids=str)
@pytest.mark.parametrize("D", [7, 255, 257, 1001, 4099, 8193, 16385, 20000])
def test_rms_variant_edges(layout, dtype, D):
    from test_rms_norm import assert_within_torch_error, reference
    from test_rms_norm import forward_backward as rms_forward_backward

    x, w, _ = make_inputs((37, D), [D], dtype, "cuda", seed=D)
    dy = random_grad(x)
    if layout == "misaligned_input":
        x, dy = offset_view(x, 1), offset_view(dy, 3)
    elif layout == "misaligned_weight":
        w = offset_view(w, 1)
    ours = rms_forward_backward(layernorm_ext.rms_norm, x, [D], w, dy)
    theirs = rms_forward_backward(F.rms_norm, x, [D], w, dy)
    assert_within_torch_error(ours, theirs, reference(x, [D], w, dy, None), dtype)


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("D", [20, 1001, 8193, 16385])
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
def test_rms_reduced_input_fp32_weight_and_no_weight(dtype, D, with_weight):
    from test_rms_norm import assert_within_torch_error, reference
    from test_rms_norm import forward_backward as rms_forward_backward

    x, w, _ = make_inputs((13, D), [D], dtype, "cuda", param_dtype=torch.float32, seed=5)
    w = w if with_weight else None
    dy = random_grad(x)
    ours = rms_forward_backward(layernorm_ext.rms_norm, x, [D], w, dy)
    theirs = rms_forward_backward(F.rms_norm, x, [D], w, dy)
    assert_within_torch_error(ours, theirs, reference(x, [D], w, dy, None), dtype)


@pytest.mark.parametrize("D", [100, 6000, 9000])
def test_rms_many_rows_per_backward_slot_bitwise_reproducible(D):
    from test_rms_norm import forward_backward as rms_forward_backward

    rows = 5000 if D <= 1000 else 1200
    x, w, _ = make_inputs((rows, D), [D], torch.bfloat16, "cuda", seed=7)
    dy = random_grad(x)
    first = rms_forward_backward(layernorm_ext.rms_norm, x, [D], w, dy)
    second = rms_forward_backward(layernorm_ext.rms_norm, x, [D], w, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    ref = rms_forward_backward(F.rms_norm, to64(x), [D], to64(w), to64(dy),
                               torch.finfo(torch.float32).eps)
    for o, r in zip(first, ref):
        torch.testing.assert_close(o.double(), r, atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 20), (torch.float32, 768),
                                     (torch.bfloat16, 4099), (torch.float32, 20000)],
                         ids=["bf16-20-staged", "fp32-768", "bf16-4099", "fp32-20000-streaming"])
def test_cuda_graph_capture_and_replay(norm, dtype, D):
    """Forward and backward captured in a CUDA graph (torch.compile's reduce-overhead
    mode, inference servers) and replayed on new data: bitwise the eager result. Nothing
    in the host path may synchronize or query what capture forbids."""
    def loss_grads(x, w, b, dy):
        y = (layer_norm(x, [D], w, b) if norm == "layer"
             else layernorm_ext.rms_norm(x, [D], w))
        y.backward(dy)
        return y

    x, w, b = make_inputs((37, D), [D], dtype, "cuda", seed=3)
    dy = random_grad(x)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up calls off the capture, as torch's docs do
        for _ in range(2):
            loss_grads(*leaves, dy)
    torch.cuda.current_stream().wait_stream(side)
    for leaf in leaves:
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = loss_grads(*leaves, dy)

    new_x, _, _ = make_inputs((37, D), [D], dtype, "cuda", seed=4)
    new_dy = random_grad(new_x, seed=5)
    with torch.no_grad():
        leaves[0].copy_(new_x)
        dy.copy_(new_dy)
    graph.replay()
    fresh = [t.detach().requires_grad_() for t in (new_x, w, b)]
    expected_y = loss_grads(*fresh, new_dy)
    torch.cuda.synchronize()
    assert torch.equal(static_y, expected_y)
    for leaf, expected in zip(leaves, fresh):
        assert (leaf.grad is None) == (expected.grad is None)
        if expected.grad is not None:
            assert torch.equal(leaf.grad, expected.grad)
