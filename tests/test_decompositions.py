"""Core ATen decompositions (layernorm_ext/decompositions.py): a program exported with the
package's table holds no layernorm_ext op; LayerNorm with parameters of the input's dtype
becomes aten.native_layer_norm; and the decomposed program gives the ops' outputs and
statistics, at another batch size than the traced one too."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch.export import Dim, default_decompositions

import layernorm_ext
from layernorm_cases import ATOL

NORMALIZED_SHAPE = [4, 8]
EPS = 0.1  # not the default: a decomposition that drops the caller's eps fails

DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64),
               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


class NormOps(torch.nn.Module):
    """Both forward ops with every output, so that the statistics are checked too."""

    def __init__(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 rms_eps: Optional[float]):
        super().__init__()
        self.weight = None if weight is None else torch.nn.Parameter(weight)
        self.bias = None if bias is None else torch.nn.Parameter(bias)
        self.rms_eps = rms_eps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (*torch.ops.layernorm_ext.forward(x, NORMALIZED_SHAPE, self.weight, self.bias,
                                                 EPS),
                *torch.ops.layernorm_ext.rms_forward(x, NORMALIZED_SHAPE, self.weight,
                                                     self.rms_eps))


def decomposed(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    table = default_decompositions()
    table.update(layernorm_ext.decompositions.decomposition_table())
    batch = Dim("batch", min=1, max=64)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)
                               ).run_decompositions(table)


# Rows of 1e-4: their mean square (1e-8) is below RMSNorm's default eps (1.2e-7), so a
# decomposition that resolves that default wrongly is far off.
@pytest.mark.parametrize("scale", [1.0, 1e-4], ids=["unit", "tiny"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: "-".join(str(d)[6:] for d in p))
@pytest.mark.parametrize("rms_eps", [None, EPS], ids=["rms_default_eps", "rms_eps"])
def test_decomposed_program_gives_the_ops_results(device, dtypes, affine, rms_eps, scale):
    x_dtype, param_dtype = dtypes
    if not affine and param_dtype != x_dtype:
        pytest.skip("no parameters: one dtype")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(NORMALIZED_SHAPE, generator=gen).to(param_dtype) if affine else None
    bias = torch.randn(NORMALIZED_SHAPE, generator=gen).to(param_dtype) if affine else None
    model = NormOps(weight, bias, rms_eps).to(device)
    program = decomposed(model, torch.randn(3, 5, *NORMALIZED_SHAPE).to(device, x_dtype))

    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "layernorm_ext" in str(t)], targets
    uniform = param_dtype == x_dtype
    assert (torch.ops.aten.native_layer_norm.default in targets) == uniform, targets

    x = ((torch.randn(7, 5, *NORMALIZED_SHAPE, generator=gen) + 0.5) * scale).to(device, x_dtype)
    with torch.no_grad():
        expected = model(x)
        got = program.module()(x)
    for out, ref in zip(got, expected):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        # Statistics of a half input: native_layer_norm rounds them to its dtype on the CPU.
        # The bound scales with the values: rstd of the tiny rows is ~1e4.
        bound = ATOL[x_dtype] * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(out, ref, rtol=0, atol=bound)


@pytest.mark.parametrize("norm", [layernorm_ext.LayerNorm, layernorm_ext.RMSNorm])
def test_modules_on_a_1d_channels_last_and_4d_input(device, norm):
    """The public modules, on a 1-D input (statistics without leading dims) and on a
    channels_last input (the output contiguous, as the op's)."""
    table = default_decompositions()
    table.update(layernorm_ext.decompositions.decomposition_table())
    module = norm(8, eps=EPS).to(device)
    for x in (torch.randn(8, device=device),
              torch.randn(2, 3, 4, 8, device=device).to(memory_format=torch.channels_last)):
        program = torch.export.export(module, (x,)).run_decompositions(table)
        with torch.no_grad():
            got, expected = program.module()(x), module(x)
        assert got.is_contiguous() and expected.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL[torch.float32])


class NormsOfLastDim(torch.nn.Module):
    def forward(self, x, weight, bias):
        shape = x.shape[-1:]
        return (*torch.ops.layernorm_ext.forward(x, shape, weight, bias, EPS),
                *torch.ops.layernorm_ext.rms_forward(x, shape, weight, None))


def test_a_dynamic_hidden_size_stays_dynamic_through_the_table(device):
    # normalized_shape from the input's dynamic last dim (SymInt[] schemas): the decomposed
    # program runs at other hidden sizes than the traced one.
    table = default_decompositions()
    table.update(layernorm_ext.decompositions.decomposition_table())
    hidden = Dim("hidden")
    dims = ({0: Dim("batch"), 1: hidden}, {0: hidden}, {0: hidden})

    def args(rows, cols):
        return tuple(torch.randn(shape, device=device) for shape in ((rows, cols), (cols,),
                                                                     (cols,)))

    program = torch.export.export(NormsOfLastDim(), args(3, 16),
                                  dynamic_shapes=dims).run_decompositions(table)
    for rows, cols in ((5, 40), (2, 9)):
        inputs = args(rows, cols)
        with torch.no_grad():
            for out, ref in zip(program.module()(*inputs), NormsOfLastDim()(*inputs)):
                torch.testing.assert_close(out, ref, rtol=0, atol=ATOL[torch.float32])
