"""ONNX export (layernorm_ext/onnx.py): models holding the fused norms, exported by
torch.onnx with the package's translation table and run by ONNX Runtime, give the eager
model's outputs. CPU only: an ONNX graph does not depend on the device it was traced on."""

from __future__ import annotations

import warnings

import pytest
import torch

import layernorm_ext

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

# Absolute tolerance against the eager model, per dtype (ONNX Runtime sums in its own order).
ATOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3}


def _export(model, example, dynamic_shapes=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False,
            custom_translation_table=layernorm_ext.onnx.translation_table())
    return program, ort.InferenceSession(program.model_proto.SerializeToString())


def _run(session, x):
    return [torch.from_numpy(out) for out in
            session.run(None, {session.get_inputs()[0].name: x.numpy()})]


def _assert_matches(session, model, x):
    expected = model(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    outputs = _run(session, x)
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref.detach(), rtol=0, atol=ATOL[x.dtype])


MODELS = {
    "mlp": lambda: torch.nn.Sequential(torch.nn.Linear(10, 20), layernorm_ext.LayerNorm(20),
                                       torch.nn.ReLU(), layernorm_ext.RMSNorm(20)),
    "no_affine_two_dims": lambda: torch.nn.Sequential(
        layernorm_ext.LayerNorm([4, 5], elementwise_affine=False),
        layernorm_ext.RMSNorm([4, 5], elementwise_affine=False)),
    "no_bias": lambda: torch.nn.Sequential(layernorm_ext.LayerNorm(10, bias=False),
                                           layernorm_ext.RMSNorm(10, eps=1e-3)),
}
INPUT_SHAPES = {"mlp": (6, 10), "no_affine_two_dims": (2, 3, 4, 5), "no_bias": (3, 7, 10)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_exported_model_gives_the_eager_outputs(name, dtype):
    torch.manual_seed(0)
    model = MODELS[name]().eval().to(dtype)
    for p in model.parameters():  # weights away from 1 and biases away from 0
        torch.nn.init.normal_(p, mean=0.5)
    x = torch.randn(INPUT_SHAPES[name]).to(dtype) * 3 + 1
    program, session = _export(model, x)
    op_types = {node.op_type for node in program.model.graph}
    assert "LayerNormalization" in op_types
    _assert_matches(session, model, x)


def test_exported_model_takes_a_dynamic_batch():
    torch.manual_seed(0)
    model = MODELS["mlp"]().eval()
    _, session = _export(model, torch.randn(4, 10), dynamic_shapes=({0: torch.export.Dim("b")},))
    for batch in (1, 4, 9):
        _assert_matches(session, model, torch.randn(batch, 10))


class _NormsOfLastDim(torch.nn.Module):
    def forward(self, x):
        return (layernorm_ext.layer_norm(x, x.shape[-1:])
                + layernorm_ext.rms_norm(x, x.shape[-1:]))


def test_exported_model_takes_a_dynamic_hidden_size():
    # normalized_shape from the input's dynamic last dim stays symbolic (SymInt[] schemas).
    model = _NormsOfLastDim()
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("hidden")},)
    _, session = _export(model, torch.randn(4, 10), dynamic_shapes=dims)
    for shape in ((3, 10), (5, 33)):
        _assert_matches(session, model, torch.randn(shape))


class _Ops(torch.nn.Module):
    """Returns every output of the forward ops: the statistics' shapes and values too."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 8))
        self.bias = torch.nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        ops = torch.ops.layernorm_ext
        return (*ops.forward(x, [3, 8], self.weight, self.bias, 1e-5),
                *ops.rms_forward(x, [8], None, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_exported_ops_give_the_statistics_too(dtype):
    torch.manual_seed(0)
    model = _Ops().eval()
    x = torch.randn(2, 5, 3, 8).to(dtype)
    if dtype == torch.float16:  # statistics stay float32, the output takes x's dtype
        model.weight.data, model.bias.data = model.weight.data.half(), model.bias.data.half()
    _, session = _export(model, x)
    outputs, expected = _run(session, x), model(x)
    assert [o.dtype for o in outputs] == [e.dtype for e in expected]
    for out, ref in zip(outputs, expected):
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref.detach(), rtol=0, atol=ATOL[dtype] * 2)



@pytest.mark.parametrize("dtype, eps", [(torch.float64, None), (torch.float32, 1e-12)],
                         ids=["float64-default-eps", "float32-eps-1e-12"])
def test_rms_norm_keeps_a_tiny_eps_for_rows_of_zeros(dtype, eps):
    # An eps under 1e-8 must survive the exporter's optimizer: without it a row of zeros
    # gives 0/0 = NaN, where eager gives zeros.
    model = torch.nn.Sequential(layernorm_ext.RMSNorm(6, eps=eps)).eval().to(dtype)
    x = torch.randn(3, 6, dtype=dtype)
    x[1] = 0
    _, session = _export(model, x)
    _assert_matches(session, model, x)
