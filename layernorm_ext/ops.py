"""The Python side of the ``torch.ops.layernorm_ext`` operators.

The schemas, the CPU/CUDA kernels and the autograd formula are registered in C++
(``csrc/``); this module adds the fake (meta) kernels used by ``torch.compile`` and
export, and ``layer_norm``, the functional entry point with ``F.layer_norm``'s signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from . import _C  # noqa: F401  (loading the extension registers the operators)

__all__ = ["layer_norm", "has_cuda_kernels"]

_forward = torch.ops.layernorm_ext.forward.default
_backward = torch.ops.layernorm_ext.backward.default

_ShapeLike = Union[int, Sequence[int], torch.Size]


# Read before the CPU-only stub below is registered for the CUDA key.
_BUILT_WITH_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key(_forward.name(), "CUDA")


def has_cuda_kernels() -> bool:
    """True when this build of the extension contains the CUDA kernels."""
    return _BUILT_WITH_CUDA


def _stats_dtype(input: torch.Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _param_dtype(input: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor]) -> torch.dtype:
    for param in (weight, bias):
        if param is not None:
            return param.dtype
    return input.dtype


def _check_same_device(input: torch.Tensor, *others: Optional[torch.Tensor]) -> None:
    # The dispatcher routes a mix of devices to the highest-priority key (a meta weight
    # with a CPU input lands here), so the fake kernels repeat the C++ device check.
    for other in others:
        if other is not None and other.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two "
                f"devices, {input.device} and {other.device}!")


@torch.library.register_fake("layernorm_ext::forward")
def _forward_fake(input, normalized_shape, weight, bias, eps):
    _check_same_device(input, weight, bias)
    stats_shape = input.shape[: input.dim() - len(normalized_shape)]
    output = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    mean = input.new_empty(stats_shape, dtype=_stats_dtype(input))
    rstd = input.new_empty(stats_shape, dtype=_stats_dtype(input))
    return output, mean, rstd


@torch.library.register_fake("layernorm_ext::backward")
def _backward_fake(grad_out, input, normalized_shape, mean, rstd, weight, bias):
    _check_same_device(input, grad_out, mean, rstd, weight, bias)
    param_dtype = _param_dtype(input, weight, bias)
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    grad_weight = input.new_empty(normalized_shape, dtype=param_dtype)
    grad_bias = input.new_empty(normalized_shape, dtype=param_dtype)
    return grad_input, grad_weight, grad_bias


@torch.library.register_vmap("layernorm_ext::forward")
def _forward_vmap(info, in_dims, input, normalized_shape, weight, bias, eps):
    """vmap maps onto the op itself: the batch dim becomes one more leading dim.

    Per-sample weight/bias (batched parameters) are applied after an unweighted call,
    with the batch dim broadcast over the leading dims.
    """
    input_dim, _, weight_dim, bias_dim, _ = in_dims
    if input_dim is None:
        input = input.expand(info.batch_size, *input.shape)
    else:
        input = input.movedim(input_dim, 0)
    if weight_dim is None and bias_dim is None:
        return _forward(input, normalized_shape, weight, bias, eps), (0, 0, 0)

    output, mean, rstd = _forward(input, normalized_shape, None, None, eps)
    # [B, *normalized_shape] -> [B, 1 (per leading dim), *normalized_shape]
    ones = (1,) * (input.dim() - 1 - len(normalized_shape))

    def per_sample(param, dim):
        if param is None:
            return None
        if dim is None:
            return param
        return param.movedim(dim, 0).reshape(param.shape[dim], *ones, *normalized_shape)

    w, b = per_sample(weight, weight_dim), per_sample(bias, bias_dim)
    param_dtype = _param_dtype(input, weight, bias)
    output = output.to(param_dtype)
    if w is not None:
        output = output * w
    if b is not None:
        output = output + b
    return (output.to(input.dtype), mean, rstd), (0, 0, 0)


if not _BUILT_WITH_CUDA:
    # A CPU-only build: say so instead of the dispatcher's generic "no kernel" error.
    def _no_cuda(*args, **kwargs):
        raise RuntimeError(
            "layernorm_ext was built without CUDA kernels, so it cannot run on a CUDA tensor. "
            "Rebuild it where a CUDA toolkit and a CUDA build of torch are present "
            "(and LAYERNORM_EXT_CPU_ONLY is unset).")

    for _op in ("forward", "backward"):
        torch.library.impl(f"layernorm_ext::{_op}", "CUDA")(_no_cuda)


def _as_shape(normalized_shape: _ShapeLike) -> list[int]:
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    return list(normalized_shape)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Fused layer normalization over the trailing ``normalized_shape`` dims of ``input``.

    Same signature and semantics as :func:`torch.nn.functional.layer_norm`:
    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance,
    computed in one pass over the data by the CPU or CUDA kernel of
    ``torch.ops.layernorm_ext.forward``. float32, float64, float16 and bfloat16 inputs
    are supported; float16/bfloat16 inputs may take float32 ``weight``/``bias``, and the
    output then keeps the input's dtype.
    """
    return _forward(input, _as_shape(normalized_shape), weight, bias, eps)[0]
