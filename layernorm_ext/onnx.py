"""ONNX export of models holding the fused norms.

torch.onnx's exporter (``dynamo=True``) knows ATen ops, not ``layernorm_ext::forward`` or
``layernorm_ext::rms_forward``; this module tells it how to write them in ONNX::

    torch.onnx.export(model, (x,), dynamo=True,
                      custom_translation_table=layernorm_ext.onnx.translation_table())

LayerNorm becomes ONNX's ``LayerNormalization``, RMSNorm the ops of its formula
(``RMSNormalization`` is opset 23); both are built from opset-18 ops, so the models are
at least opset 18. float16 and bfloat16 inputs are normalized in float32, with float32
statistics, and the output rounded once to the input's dtype, as the kernels do. float64
LayerNorm exports its output only: ONNX's LayerNormalization has no float64 statistics,
so a model that returns them does not load in ONNX Runtime. Needs ``onnxscript``, which
torch.onnx's exporter needs too.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """The ``custom_translation_table`` for :func:`torch.onnx.export` that writes the fused
    norms' forward ops in ONNX."""
    return {
        torch.ops.layernorm_ext.forward.default: _layer_norm,
        torch.ops.layernorm_ext.rms_forward.default: _rms_norm,
    }


def _compute_type(input: Any) -> Any:
    """The ONNX type a norm of ``input`` computes in: float32 for 16-bit floats."""
    from onnxscript import ir

    half = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    return ir.DataType.FLOAT if input.dtype in half else input.dtype


def _cast(value: Any, to: Any) -> Any:
    from onnxscript import opset18 as op

    return value if value is None or value.dtype == to else op.Cast(value, to=to)


def _normalized_axes(normalized_shape: list[int]) -> list[int]:
    # At least one: the ops' checks (and torch's) refuse an empty normalized_shape.
    return list(range(-len(normalized_shape), 0))


def _layer_norm(input: Any, normalized_shape: list[int], weight: Optional[Any] = None,
                bias: Optional[Any] = None, eps: float = 1e-5) -> tuple[Any, Any, Any]:
    """layernorm_ext::forward -> (output, mean, rstd), the statistics over leading dims."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    axes = _normalized_axes(normalized_shape)
    compute = _compute_type(input)
    if weight is None:  # LayerNormalization requires a scale
        weight = op.Expand(op.Constant(value=ir.tensor(1.0, dtype=compute)),
                           op.Shape(input, start=axes[0]))
    output, mean, rstd = op.LayerNormalization(
        _cast(input, compute), _cast(weight, compute), _cast(bias, compute), axis=axes[0],
        epsilon=eps, stash_type=compute)
    # ONNX keeps the normalized dims as 1s in the statistics; the op drops them.
    normalized_dims = op.Constant(value_ints=axes)
    return (_cast(output, input.dtype), op.Squeeze(mean, normalized_dims),
            op.Squeeze(rstd, normalized_dims))


def _rms_norm(input: Any, normalized_shape: list[int], weight: Optional[Any] = None,
              eps: Optional[float] = None) -> tuple[Any, Any]:
    """layernorm_ext::rms_forward -> (output, rstd), rstd over leading dims."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    axes = _normalized_axes(normalized_shape)
    compute = _compute_type(input)
    if eps is None:  # torch's default: the machine epsilon of the computation type
        eps = torch.finfo(torch.float64 if compute == ir.DataType.DOUBLE else torch.float32).eps
    x = _cast(input, compute)
    normalized_dims = op.Constant(value_ints=axes)
    mean_square = op.ReduceMean(op.Mul(x, x), normalized_dims, keepdims=1)
    # Sum, not Add: onnxscript's optimizer drops an Add of a constant within 1e-8 of 0
    # (float64's default eps), and a row of zeros would then give NaN.
    rstd = op.Reciprocal(op.Sqrt(op.Sum(mean_square, op.Constant(
        value=ir.tensor(eps, dtype=compute)))))
    output = op.Mul(x, rstd)
    if weight is not None:
        output = op.Mul(output, _cast(weight, compute))
    return _cast(output, input.dtype), op.Squeeze(rstd, normalized_dims)
