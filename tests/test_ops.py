"""The operators against torch.nn.functional.layer_norm: values, gradients, registration."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import layernorm_ext
from layernorm_ext import layer_norm
from layernorm_cases import (ATOL,  # the parity rule's slack
                             EXTENDED_PRECISION_AVAILABLE,
                             extended_precision_reference, reference_errors, subprocess_env)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_inputs(shape, normalized_shape, dtype, device, affine=(True, True), param_dtype=None,
                seed=0):
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    n = torch.Size(normalized_shape)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(device, dtype)
    w = (torch.randn(n, generator=g, dtype=torch.float64) + 1).to(device, param_dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(device, param_dtype)
    return x, (w if affine[0] else None), (b if affine[1] else None)


def forward_backward(fn, x, normalized_shape, w, b, grad_out, eps=1e-5):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(leaves[0], normalized_shape, leaves[1], leaves[2], eps)
    y.backward(grad_out)
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def to64(t):
    return None if t is None else t.detach().double()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 7, 20, 64, 768, 1000, 4096, 65537])
def test_parity_with_torch(device, dtype, D):
    rows = 3 if D > 10000 else 33
    x, w, b = make_inputs((rows, D), [D], dtype, device)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ours = forward_backward(layer_norm, x, [D], w, b, dy)
    theirs = forward_backward(F.layer_norm, x, [D], w, b, dy)
    slack = ATOL[dtype]
    if dtype == torch.float64 and EXTENDED_PRECISION_AVAILABLE:
        # torch's float64 result is only another float64 computation (at D = 1 it is
        # 2e-13 off the exact bias and zeros, which ours are).
        ref = [t.to(device) for t in extended_precision_reference(
            *(t.cpu() for t in (x, w, b, dy)), [D], 1e-5)]
    else:
        ref = forward_backward(F.layer_norm, to64(x), [D], to64(w), to64(b), to64(dy))
        if dtype == torch.float64:  # torch's own result as the reference: its error is ours
            slack = 1e-12
    for name, o, t, r in zip(["output", "grad_input", "grad_weight", "grad_bias"], ours, theirs, ref):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        err_ours = (o.double() - r).abs().max().item()
        err_torch = (t.double() - r).abs().max().item()
        scale = max(1.0, r.abs().max().item())
        assert err_ours <= 2 * err_torch + slack * scale, (
            f"{name}: error {err_ours:.3g} vs torch's {err_torch:.3g}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_input_with_fp32_params(device, dtype):
    """The output and dx as the parity test; the float32 parameter gradients are summed in
    float32 from the rows, so they are float32-accurate (torch's CPU kernel is ~1e-2 off)."""
    x, w, b = make_inputs((16, 96), [96], dtype, device, param_dtype=torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ours = forward_backward(layer_norm, x, [96], w, b, dy)
    theirs = forward_backward(F.layer_norm, x, [96], w, b, dy)
    ref = forward_backward(F.layer_norm, to64(x), [96], to64(w), to64(b), to64(dy))
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    assert not reference_errors(ours[:2], theirs[:2], ref[:2], dtype, ("output", "grad_input"))
    for name, o, r in zip(["grad_weight", "grad_bias"], ours[2:], ref[2:]):
        assert o.dtype == torch.float32, name
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(o.double(), r, rtol=0, atol=ATOL[torch.float32] * scale,
                                   msg=name)


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["affine", "weight_only", "bias_only", "none"])
@pytest.mark.parametrize("shape,normalized_shape", [((4, 9), [9]), ((2, 3, 4, 5), [4, 5])],
                         ids=["1d", "2d"])
def test_gradcheck(device, affine, shape, normalized_shape):
    x, w, b = make_inputs(shape, normalized_shape, torch.float64, device, affine)
    inputs = [t.requires_grad_() if t is not None else None for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda x, w, b: layer_norm(x, normalized_shape, w, b), inputs)


def test_gradcheck_non_contiguous(device):
    base, w, b = make_inputs((8, 6), [8], torch.float64, device)
    x = base.t().requires_grad_()  # (6, 8), strides (1, 6)
    assert not x.is_contiguous()
    assert torch.autograd.gradcheck(
        lambda x, w, b: layer_norm(x, [8], w, b), (x, w.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_non_contiguous_and_expanded_inputs(device, dtype):
    x, w, b = make_inputs((5, 16, 12), [12], dtype, device)
    views = {
        "transposed": x.transpose(0, 1),
        "sliced": x[:, ::2, :],
        "strided_last_dim": torch.cat([x, x], dim=-1)[..., ::2],
        "expanded": x[:1].expand(5, 16, 12),
    }
    for name, view in views.items():
        expected = F.layer_norm(view.contiguous(), [12], w, b)
        torch.testing.assert_close(layer_norm(view, [12], w, b), expected, msg=name)


def test_multi_dim_normalized_shape_and_leading_dims(device):
    x, w, b = make_inputs((2, 3, 4, 5, 6), [5, 6], torch.float32, device)
    out, mean, rstd = torch.ops.layernorm_ext.forward(x, [5, 6], w, b, 1e-5)
    torch.testing.assert_close(out, F.layer_norm(x, [5, 6], w, b))
    assert mean.shape == rstd.shape == (2, 3, 4)
    assert mean.dtype == rstd.dtype == torch.float32


@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 8), (0,)], ids=["rows0", "mid0", "flat0"])
def test_zero_size_batch(device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    n = shape[-1:]
    w = torch.ones(n, device=device, requires_grad=True)
    b = torch.zeros(n, device=device, requires_grad=True)
    y = layer_norm(x, n, w, b)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    expected_w = torch.zeros(n, device=device)
    torch.testing.assert_close(w.grad, expected_w)
    torch.testing.assert_close(b.grad, expected_w)


def test_empty_normalized_dims_match_torch(device):
    x = torch.randn(3, 0, device=device)
    out, mean, rstd = torch.ops.layernorm_ext.forward(x, [0], None, None, 1e-5)
    assert out.shape == (3, 0)
    assert torch.all(mean == 0) and torch.all(torch.isnan(rstd))  # as torch.native_layer_norm


def test_d_one_million(device):
    x, w, b = make_inputs((2, 1_000_000), [1_000_000], torch.float32, device)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    ours = forward_backward(layer_norm, x, [1_000_000], w, b, dy)
    theirs = forward_backward(F.layer_norm, x, [1_000_000], w, b, dy)
    ref = forward_backward(F.layer_norm, to64(x), [1_000_000], to64(w), to64(b), to64(dy))
    # The parity rule (float32 sums of a million terms: ours 2.2e-6 off at most on the CPU,
    # torch's 1.9e-6, 2026-12-06).
    assert not reference_errors(ours, theirs, ref, torch.float32)


@pytest.mark.parametrize("eps", [0.0, -1.0, 1e-12])
def test_eps_zero_and_negative_as_torch(device, eps):
    x = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [0.0, 0.0, 1e-3]], device=device)
    ours = layer_norm(x, [3], eps=eps)
    theirs = F.layer_norm(x, [3], eps=eps)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("eps", [True, np.float32(0.5), np.int64(2), np.bool_(True),
                                 torch.tensor(0.5), torch.tensor(2, dtype=torch.int32)],
                         ids=["bool", "numpy_float32", "numpy_int64", "numpy_bool",
                              "zero_dim_tensor", "zero_dim_int_tensor"])
@pytest.mark.parametrize("ours,theirs", [(layer_norm, F.layer_norm),
                                         (layernorm_ext.rms_norm, F.rms_norm)],
                         ids=["layer_norm", "rms_norm"])
def test_eps_of_any_type_torch_takes_for_a_float(device, eps, ours, theirs):
    """eps as torch's parser reads a float, and its value used (an eps of 0.5 or 2 moves
    every output of rows with variance ~1)."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(device)
    expected = theirs(x, (8,), eps=eps)
    assert not torch.allclose(expected, theirs(x, (8,), eps=1e-5))
    torch.testing.assert_close(ours(x, (8,), eps=eps), expected)


@pytest.mark.parametrize("ours,theirs", [(layer_norm, F.layer_norm),
                                         (layernorm_ext.rms_norm, F.rms_norm)],
                         ids=["layer_norm", "rms_norm"])
def test_eps_a_symbolic_int_as_torch(device, ours, theirs):
    """eps from a symbolic size (make_fx's symbolic tracing), as torch's parser takes it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(3, 8, device=device)
    graph = make_fx(lambda x: ours(x, (8,), eps=x.shape[0]), tracing_mode="symbolic")(x)
    torch.testing.assert_close(graph(x), theirs(x, (8,), eps=3.0))


def test_nan_and_inf_propagate(device):
    x = torch.randn(3, 16, device=device)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    ours = layer_norm(x, [16])
    theirs = F.layer_norm(x, [16])
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    torch.testing.assert_close(ours[2], theirs[2])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_param_grads_bitwise_reproducible(device, dtype):
    x, w, b = make_inputs((300, 257), [257], dtype, device)
    dy = torch.randn_like(x)
    first = forward_backward(layer_norm, x, [257], w, b, dy)
    second = forward_backward(layer_norm, x, [257], w, b, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_opcheck(device):
    x, w, b = make_inputs((6, 4, 10), [4, 10], torch.float32, device)
    out, mean, rstd = torch.ops.layernorm_ext.forward(x, [4, 10], w, b, 1e-5)
    forward_samples = [
        (x.requires_grad_(), [4, 10], w.requires_grad_(), b.requires_grad_(), 1e-5),
        (x.detach(), [10], None, None, 1e-6),
        (x.detach().bfloat16(), [10], torch.ones(10, device=device), None, 1e-5),
    ]
    for args in forward_samples:
        torch.library.opcheck(torch.ops.layernorm_ext.forward.default, args)
    dy = torch.randn_like(out)
    # bfloat16 input, float32 parameters: the parameter gradients are float32.
    x16, w32 = x.detach().bfloat16(), w.detach()
    _, mean16, rstd16 = torch.ops.layernorm_ext.forward(x16, [4, 10], w32, None, 1e-5)
    backward_samples = [
        (dy, x.detach(), [4, 10], mean, rstd, w.detach(), b.detach()),
        (dy, x.detach(), [4, 10], mean, rstd, None, None),
        (dy.bfloat16(), x16, [4, 10], mean16, rstd16, w32, None),
    ]
    for args in backward_samples:
        torch.library.opcheck(torch.ops.layernorm_ext.backward.default, args)


def randomized(norm: torch.nn.Module) -> torch.nn.Module:
    """``norm`` with random parameters (not ones and zeros, which a path that dropped
    them would also give)."""
    with torch.no_grad():
        for param in norm.parameters():
            param.copy_(torch.randn_like(param))
    return norm


def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16),
                                randomized(layernorm_ext.LayerNorm(16, eps=0.1)),
                                torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 8, device=device)
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled_out = compiled(x)
    compiled_out.sum().backward()
    torch.testing.assert_close(compiled_out, eager_out)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_cuda_kernels_built_when_expected():
    """CI sets LAYERNORM_EXT_EXPECT_CUDA=1: there a missing CUDA build is a failure."""
    if os.environ.get("LAYERNORM_EXT_EXPECT_CUDA") != "1" and not layernorm_ext.has_cuda_kernels():
        pytest.skip("CPU-only build, and CUDA kernels were not expected")
    assert layernorm_ext.has_cuda_kernels()
    for op in ("forward", "backward"):
        table = torch._C._dispatch_dump(f"layernorm_ext::{op}")
        cuda_lines = [line for line in table.splitlines() if line.startswith("CUDA:")]
        assert cuda_lines and "layernorm_cuda.cu" in cuda_lines[0], table


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["affine", "weight_only", "bias_only", "none"])
def test_gradgradcheck(device, affine):
    x, w, b = make_inputs((3, 4, 5), [4, 5], torch.float64, device, affine)
    present = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(*tensors):
        it = iter(tensors)
        return layer_norm(next(it), [4, 5], next(it) if w is not None else None,
                          next(it) if b is not None else None)

    assert torch.autograd.gradgradcheck(fn, present)


def test_backward_op_called_directly_is_not_silently_differentiable(device):
    x = torch.randn(4, 8, device=device)
    out, mean, rstd = torch.ops.layernorm_ext.forward(x, [8], None, None, 1e-5)
    dy = torch.randn_like(out).requires_grad_()
    grad_input = torch.ops.layernorm_ext.backward(dy, x, [8], mean, rstd, None, None)[0]
    with pytest.raises(RuntimeError, match="not implemented"):
        grad_input.sum().backward()


@pytest.mark.parametrize("batched", ["input", "input_dim1", "weight", "all"])
def test_vmap_matches_torch(device, batched):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, generator=g).to(device)
    w = torch.randn(16, generator=g).to(device)
    b = torch.randn(16, generator=g).to(device)
    ws, bs = torch.randn(3, 16, generator=g).to(device), torch.randn(3, 16, generator=g).to(device)
    # eps 0.1, not the default: the batching rule must pass the caller's on.
    ours = lambda x, w, b: layer_norm(x, [16], w, b, 0.1)  # noqa: E731
    theirs = lambda x, w, b: F.layer_norm(x, [16], w, b, 0.1)  # noqa: E731
    args, in_dims = {
        "input": ((x, w, b), (0, None, None)),
        "input_dim1": ((x.transpose(0, 1), w, b), (1, None, None)),
        "weight": ((x[0], ws, None), (None, 0, None)),
        "all": ((x, ws, bs), (0, 0, 0)),
    }[batched]
    torch.testing.assert_close(torch.func.vmap(ours, in_dims)(*args),
                               torch.func.vmap(theirs, in_dims)(*args))


def test_export_contains_the_op_and_runs(device):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), layernorm_ext.LayerNorm(16),
                                torch.nn.ReLU()).to(device)
    x = torch.randn(5, 8, device=device)
    exported = torch.export.export(model, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.layernorm_ext.forward.default in targets
    torch.testing.assert_close(exported.module()(x), model(x))


def _load_in_fresh_processes(load: str, cwd) -> None:
    """Runs the script `load` in two fresh processes: with `import layernorm_ext` first it
    must pass, without it fail naming layernorm_ext (its ops are registered by the import)."""
    import subprocess
    import sys

    script = "import sys, torch\nif sys.argv[1] == 'import': import layernorm_ext\n" + load
    # TMPDIR: aoti_load_package unpacks into a temp dir it never removes; keep it in cwd.
    env = subprocess_env(TMPDIR=str(cwd))
    run = [subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env) for how in ("import", "no import")]
    assert run[0].returncode == 0, run[0].stderr
    assert run[1].returncode != 0 and "layernorm_ext" in run[1].stderr, run[1].stderr


def test_a_saved_program_loads_where_layernorm_ext_is_imported(device, tmp_path):
    """torch.export.save, then torch.export.load in a fresh process: the program calls the
    op by name, which `import layernorm_ext` registers (as the README says)."""
    model = torch.nn.Sequential(layernorm_ext.LayerNorm(16), torch.nn.ReLU()).to(device)
    x = torch.randn(5, 16, device=device)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "program.pt2")
    torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    _load_in_fresh_processes(
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"program = torch.export.load({str(tmp_path / 'program.pt2')!r})\n"
        "torch.testing.assert_close(program.module()(io['x']), io['y'])\n", tmp_path)


@pytest.mark.slow
def test_an_aot_inductor_package_runs_where_layernorm_ext_is_imported(tmp_path):
    """An AOTInductor package of an exported model with a dynamic batch dim, loaded with
    aoti_load_package in a fresh process, runs the op by name (through the package's proxy
    executor) at another batch size, bitwise as eager. CPU only: compiling the package
    takes ~25 s on 2 cores, time a GPU check does not have."""
    model = torch.nn.Sequential(layernorm_ext.LayerNorm(16), torch.nn.ReLU())
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(model, (torch.randn(5, 16),),
                                   dynamic_shapes=({0: batch},))
    assert torch.ops.layernorm_ext.forward.default in [
        node.target for node in exported.graph.nodes if node.op == "call_function"]
    package = torch._inductor.aoti_compile_and_package(
        exported, package_path=str(tmp_path / "model.pt2"))
    x = torch.randn(9, 16)
    torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    _load_in_fresh_processes(
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"model = torch._inductor.aoti_load_package({package!r})\n"
        "assert torch.equal(model(io['x']), io['y'])\n", tmp_path)


def test_torch_compile_dynamic_shapes(device):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16),
                                randomized(layernorm_ext.LayerNorm(16, eps=0.1))).to(device)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for batch in (3, 7, 11):
        x = torch.randn(batch, 2, 8, device=device)
        torch.testing.assert_close(compiled(x), model(x))


NORMS = {"layer": (layer_norm, F.layer_norm), "rms": (layernorm_ext.rms_norm, F.rms_norm)}
MODULES = {"layer": (layernorm_ext.LayerNorm, torch.nn.LayerNorm),
           "rms": (layernorm_ext.RMSNorm, torch.nn.RMSNorm)}


@pytest.mark.parametrize("norm", MODULES)
def test_training_under_torch_compile_over_changing_lengths_compiles_as_torch(device, norm):
    """A model trained under torch.compile (automatic dynamic shapes) on batches of
    changing sequence length: as many graphs as with torch's module. (The backward's fake
    once guarded every leading size, so each length compiled anew until the recompile
    limit sent the model back to eager.)"""
    counters = torch._dynamo.utils.counters
    graphs = []
    for module in MODULES[norm]:
        torch._dynamo.reset()
        counters.clear()
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), module(32),
                                    torch.nn.Linear(32, 4)).to(device)
        compiled = torch.compile(model, backend="aot_eager")
        for length in (5, 7, 9, 11):
            compiled(torch.randn(2, length, 16, device=device)).sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[0] == graphs[1]


@pytest.mark.parametrize("norm", NORMS)
def test_a_symbolic_normalized_shape_stays_symbolic(device, norm):
    """normalized_shape taken from the input's size: one graph for every batch and hidden
    size under torch.compile(dynamic=True), forward and backward, and torch.export with a
    dynamic hidden dim, strict and not, as torch's layer_norm and rms_norm."""
    ours, theirs = NORMS[norm]

    def f(x, weight):
        return ours(x, x.shape[-1:], weight)

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    for batch, hidden in ((3, 8), (5, 16), (7, 24)):
        x = torch.randn(batch, hidden, device=device, requires_grad=True)
        weight = torch.randn(hidden, device=device, requires_grad=True)
        got = compiled(x, weight)
        got_grads = torch.autograd.grad(got.square().sum(), (x, weight))
        want = theirs(x, (hidden,), weight)
        want_grads = torch.autograd.grad(want.square().sum(), (x, weight))
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w)
    assert counters["stats"]["unique_graphs"] == 1

    class Model(torch.nn.Module):
        def forward(self, x, weight):
            return f(x, weight)

    hidden = torch.export.Dim("hidden")
    dims = {"x": {0: torch.export.Dim("batch"), 1: hidden}, "weight": {0: hidden}}
    for strict in (True, False):
        program = torch.export.export(Model(), (torch.randn(3, 16, device=device),
                                                torch.randn(16, device=device)),
                                      dynamic_shapes=dims, strict=strict)
        x, weight = torch.randn(5, 40, device=device), torch.randn(40, device=device)
        torch.testing.assert_close(program.module()(x, weight), theirs(x, (40,), weight))


@pytest.mark.parametrize("norm", NORMS)
def test_a_size_past_int64_raises_under_torch_compile_as_in_eager(device, norm):
    # normalized_shape's int64 bounds are checked in Python (the op's parser raises a
    # RuntimeError): traced by Dynamo too, a size past them raises eager's TypeError.
    ours, theirs = NORMS[norm]
    x = torch.randn(3, 4, device=device)
    for call in (ours, torch.compile(ours, backend="eager")):
        torch._dynamo.reset()
        with pytest.raises(TypeError, match="at pos 0 does not fit in int64"):
            call(x, (2**70,))
    # dynamic=True traces the size as a symbol: eager's TypeError where Dynamo hands the
    # call back to Python (torch 2.14), else the error torch's own function gets (2.11:
    # the fake kernel's shape error, a TorchRuntimeError).
    torch._dynamo.reset()
    with pytest.raises(Exception) as torchs:
        torch.compile(theirs, backend="eager", dynamic=True)(x, (2**70,))
    torch._dynamo.reset()
    with pytest.raises((TypeError, type(torchs.value))) as raised:
        torch.compile(ours, backend="eager", dynamic=True)(x, (2**70,))
    if raised.type is TypeError:
        assert "at pos 0 does not fit in int64" in str(raised.value)


def test_import_loads_no_module_beyond_torch_and_its_own(tmp_path):
    # `import layernorm_ext` after `import torch` adds only the package's own modules: the
    # tracing helpers ops.py uses under torch.compile (torch.fx.experimental.symbolic_shapes,
    # sympy) would add ~0.35 s to every import.
    import json
    import subprocess
    import sys

    script = ("import json, sys, torch\nbefore = set(sys.modules)\nimport layernorm_ext\n"
              "print(json.dumps(sorted(set(sys.modules) - before)))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=subprocess_env(), check=True)
    added = json.loads(run.stdout)
    assert "layernorm_ext" in added
    assert [name for name in added if name.split(".")[0] != "layernorm_ext"] == []


@pytest.mark.parametrize("grads", ["none", "input", "weight", "bias", "no_grad", "inference"])
def test_autograd_recorded_exactly_when_torch_records_it(device, grads):
    # The forward skips its autograd Function when nothing needs a gradient
    # (csrc/autograd_common.h); every other combination must still build the graph.
    x = torch.randn(6, 8, device=device)
    weight, bias = torch.randn(8, device=device), torch.randn(8, device=device)
    leaf = {"input": x, "weight": weight, "bias": bias}.get(grads)
    if leaf is not None:
        leaf.requires_grad_()
    if grads == "no_grad":
        x.requires_grad_()
    mode = {"no_grad": torch.no_grad(), "inference": torch.inference_mode()}
    with mode.get(grads, torch.enable_grad()):
        ours = layer_norm(x, [8], weight, bias)
        theirs = F.layer_norm(x, [8], weight, bias)
    assert (ours.grad_fn is None) == (theirs.grad_fn is None), grads
    torch.testing.assert_close(ours, theirs)
    if leaf is not None:
        grad_out = torch.randn_like(ours)
        (ours_grad,) = torch.autograd.grad(ours, leaf, grad_out)
        (theirs_grad,) = torch.autograd.grad(theirs, leaf, grad_out)
        torch.testing.assert_close(ours_grad, theirs_grad)


def test_op_called_directly_with_a_tangent_raises(device):
    # Not silently dropped by the no-grad fast path: the op's C++ autograd node has no jvp
    # (layer_norm() routes forward AD to a Python Function instead).
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(4, 8, device=device)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            torch.ops.layernorm_ext.forward(dual, [8], None, None, 1e-5)


@pytest.mark.parametrize("size", ["numpy_int64", "numpy_int32", "int_tensor"])
def test_normalized_shape_elements_with_index_as_torch(device, size):
    # torch's parser takes anything with __index__ (but bool) as an int.
    import numpy as np

    element = {"numpy_int64": np.int64(8), "numpy_int32": np.int32(8),
               "int_tensor": torch.tensor(8)}[size]
    x = torch.randn(3, 8, device=device)
    torch.testing.assert_close(layer_norm(x, (element,)), F.layer_norm(x, (element,)))
    torch.testing.assert_close(layernorm_ext.rms_norm(x, [element]), F.rms_norm(x, [element]))


# (our function, torch's, the module class) per norm, for the __torch_function__ tests.
OVERRIDABLE = {
    "layer_norm": (layer_norm, F.layer_norm, layernorm_ext.LayerNorm),
    "rms_norm": (layernorm_ext.rms_norm, F.rms_norm, layernorm_ext.RMSNorm),
}


@pytest.mark.parametrize("norm", OVERRIDABLE)
def test_fx_symbolic_trace_records_the_function(device, norm):
    # torch.fx.symbolic_trace (feature extractors, FX quantization) passes Proxies, which
    # override torch functions: the call is recorded, as F.layer_norm's is, and the traced
    # module computes what the model does.
    ours, _, module = OVERRIDABLE[norm]
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), module(16), torch.nn.ReLU()).to(device)
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets == [ours]
    x = torch.randn(4, 8, device=device)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("norm", OVERRIDABLE)
def test_torch_function_modes_and_subclasses_get_the_call(device, norm):
    # As with torch's norms: an active TorchFunctionMode sees the call (and may replace
    # it), and a tensor subclass with __torch_function__ gets its type back.
    ours, theirs, _ = OVERRIDABLE[norm]
    x = torch.randn(3, 16, device=device)
    weight = torch.randn(16, device=device)

    class Recorder(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(func)
            if func is ours:
                return "replaced"
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        assert ours(x, [16], weight) == "replaced"
    assert recorder.calls == [ours]

    class Tagged(torch.Tensor):
        pass

    for args in ((x.as_subclass(Tagged), [16], weight), (x, [16], weight.as_subclass(Tagged))):
        out, expected = ours(*args), theirs(*args)
        assert type(out) is type(expected) is Tagged
        torch.testing.assert_close(out.as_subclass(torch.Tensor),
                                   expected.as_subclass(torch.Tensor))


@pytest.mark.parametrize("norm", OVERRIDABLE)
def test_torch_function_under_torch_compile_as_in_eager(device, norm):
    # Dynamo decides __torch_function__ from the arguments only: a mode active around a
    # compiled call must still get it, and a subclass must compile with fullgraph=True.
    ours, theirs, _ = OVERRIDABLE[norm]
    x = torch.randn(3, 16, device=device)

    class Replace(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is ours:
                return args[0] * 0 + 42
            return func(*args, **(kwargs or {}))

    torch._dynamo.reset()
    compiled = torch.compile(lambda t: ours(t, [16]), backend="eager", fullgraph=True)
    with Replace():
        assert bool((compiled(x) == 42).all())

    class Tagged(torch.Tensor):
        pass

    torch._dynamo.reset()
    out = compiled(x.as_subclass(Tagged))
    assert type(out) is Tagged
    torch.testing.assert_close(out.as_subclass(torch.Tensor), theirs(x, [16]))
    torch._dynamo.reset()


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_nested_input_normalized_over_its_ragged_dim_is_refused(device, norm):
    """torch's exception class (layer_norm: a RuntimeError, whose message names the
    expected shape, where ours names the ragged dimension; rms_norm: torch's ValueError,
    from NestedTensor's __torch_function__, which takes the call)."""
    x = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)], layout=torch.jagged,
                                   device=device)
    ours, theirs = NORMS[norm]
    with pytest.raises(Exception) as torch_error:
        theirs(x, [2, 8])
    with pytest.raises(torch_error.type, match="ragged dim") as error:
        ours(x, [2, 8])
    assert error.type is torch_error.type


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
def test_nested_input_as_torch(device, layout):
    """Jagged nested tensors go through the kernels row by row, as F.layer_norm, gradients
    included. The older strided layout goes to torch's own layer_norm (which takes it and
    raised here before): that half checks the routing, not our kernels."""
    def nested():
        g = torch.Generator().manual_seed(0)
        return torch.nested.nested_tensor(
            [torch.randn(2, 8, generator=g), torch.randn(3, 8, generator=g)], layout=layout,
            device=device, requires_grad=True)

    results = []
    for fn in (layer_norm, F.layer_norm):
        x = nested()
        w = torch.linspace(0.5, 2, 8, device=device, requires_grad=True)
        b = torch.linspace(-1, 1, 8, device=device, requires_grad=True)
        y = fn(x, [8], w, b, 0.1)  # not the default eps, which a dropped one would be
        assert y.is_nested and y.layout == layout
        (y.values() if layout == torch.jagged else y.to_padded_tensor(0.0)).pow(2).sum().backward()
        results.append([t.detach() for t in (*y.unbind(), *x.grad.unbind(), w.grad, b.grad)])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)
