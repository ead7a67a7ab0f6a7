"""Core ATen decompositions of the fused norms, for backends that take only core ATen.

``ExportedProgram.run_decompositions`` keeps ``layernorm_ext::forward`` and
``layernorm_ext::rms_forward`` as they are: they are custom ops with their own kernels,
which a backend that takes only core ATen ops (ExecuTorch, a compiler of exported
programs) does not know. This table rewrites them::

    table = torch.export.default_decompositions()
    table.update(layernorm_ext.decompositions.decomposition_table())
    exported = torch.export.export(model, (x,)).run_decompositions(table)

LayerNorm becomes ``aten.native_layer_norm``, the core op backends match, when the weight
and bias have the input's dtype; with float32 parameters on a float16/bfloat16 input
(which torch's CUDA kernel refuses) and for RMSNorm, which core ATen lacks, it becomes the
ops of the formula, computed in float32 (float64 for float64) and rounded once, as the
kernels do. The outputs keep the ops' layout: a contiguous output (also from a
channels_last input), and mean and rstd over the input's leading dims, in the ops' dtype.
The table holds the forward ops only: an exported program has no backward.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .transforms import LAYER_NORM, RMS_NORM, acc_dtype, composite_forward, resolved_rms_eps

__all__ = ["decomposition_table"]


def decomposition_table() -> dict[Any, Callable[..., Any]]:
    """Decompositions of the fused norms' forward ops into core ATen ops, to add to the
    table given to :meth:`torch.export.ExportedProgram.run_decompositions`."""
    return {
        torch.ops.layernorm_ext.forward.default: _layer_norm,
        torch.ops.layernorm_ext.rms_forward.default: _rms_norm,
    }


def _statistic(value: torch.Tensor, input: torch.Tensor, num_normalized_dims: int
               ) -> torch.Tensor:
    """A per-row statistic in the ops' layout: the input's leading dims, acc_dtype."""
    rows = input.shape[: input.dim() - num_normalized_dims]
    return value.reshape(rows).to(acc_dtype(input))


def _layer_norm(input: torch.Tensor, normalized_shape: list[int],
                weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """layernorm_ext::forward -> (output, mean, rstd)."""
    dims = len(normalized_shape)
    if all(p is None or p.dtype == input.dtype for p in (weight, bias)):
        output, mean, rstd = torch.ops.aten.native_layer_norm.default(
            input, normalized_shape, weight, bias, eps)
    else:
        output, rstd = composite_forward(LAYER_NORM, input, dims, weight, bias, eps)
        mean = input.to(acc_dtype(input)).mean(tuple(range(-dims, 0)))
    return output.contiguous(), _statistic(mean, input, dims), _statistic(rstd, input, dims)


def _rms_norm(input: torch.Tensor, normalized_shape: list[int],
              weight: Optional[torch.Tensor] = None, eps: Optional[float] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """layernorm_ext::rms_forward -> (output, rstd)."""
    dims = len(normalized_shape)
    output, rstd = composite_forward(RMS_NORM, input, dims, weight, None,
                                     resolved_rms_eps(input, eps))
    return output.contiguous(), _statistic(rstd, input, dims)
