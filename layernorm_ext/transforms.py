"""``layer_norm`` and ``rms_norm`` under ``torch.func`` transforms and forward-mode AD.

The ops' own autograd is a hand-written C++ ``torch::autograd::Node`` per op
(csrc/layernorm_autograd.cpp, csrc/rms_norm_autograd.cpp): the cheapest per call, but
functorch transforms (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``) refuse
C++ autograd code (the nodes raise as a C++ Function would) and the nodes have no
forward-mode derivative. When one of those is active, ``layer_norm``
and ``rms_norm`` call :class:`NormFunction` instead: a Python ``autograd.Function`` with
``setup_context`` (what functorch requires), a ``jvp`` and a generated vmap rule. Its
forward is the same fused op, so vmap still maps onto the op's own batching rule. Under
``vmap`` alone (no gradient transform) the op is called as in plain eager: functorch keeps
autograd out of a vmap level, and the op's batching rule is cheaper than the Function.

Three cases are computed from differentiable ATen ops instead of the op: nested
forward-mode AD (``jacfwd(jacfwd(f))``, ``jvp`` of ``jvp``: torch runs an
autograd.Function's ``jvp`` with forward AD off, so the outer level's derivative of the
tangent would silently be zero, pytorch/pytorch#197867), transforms traced by
``torch.compile``, and gradients under ``torch.func.functionalize`` (it has no rule for
an autograd.Function).

The two norms differ only in their fused op and in whether rows are centered (LayerNorm
subtracts the row mean, RMSNorm does not); :class:`Norm` holds that, and every formula
below is written once for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as forward_ad

# Private torch names, read to route calls under transforms (README, "torch.func and
# forward-mode AD"): functorch's interpreter stack and its jvp nesting count here,
# torch._C._are_functorch_transforms_active and forward_ad._current_level below.
from torch._C._functorch import TransformType, get_interpreter_stack
from torch._functorch import eager_transforms

from . import _C  # noqa: F401  (loading the extension registers the operators)

__all__ = ["NormFunction", "Norm", "LAYER_NORM", "RMS_NORM", "transforms_active",
           "transformed_layer_norm", "transformed_rms_norm", "acc_dtype", "resolved_rms_eps",
           "composite_forward"]

_forward = torch.ops.layernorm_ext.forward.default
_rms_forward = torch.ops.layernorm_ext.rms_forward.default


def _layer_norm_op(input: torch.Tensor, normalized_shape: list[int],
                   weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float) -> torch.Tensor:
    return _forward(input, normalized_shape, weight, bias, eps)[0]


def _rms_norm_op(input: torch.Tensor, normalized_shape: list[int],
                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 eps: float) -> torch.Tensor:
    # bias is always None: RMSNorm has none (kept for one signature over both norms).
    return _rms_forward(input, normalized_shape, weight, eps)[0]


@dataclass(frozen=True)
class Norm:
    """What differs between the norms under transforms.

    ``fused_forward(input, normalized_shape, weight, bias, eps)`` returns the fused op's
    output; ``centered`` says whether rows are centered before scaling (LayerNorm), which
    adds a ``- mean(...)`` term to the reference formula, its backward and its tangent.
    """

    name: str
    fused_forward: Callable[..., torch.Tensor]
    centered: bool

    def center(self, t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return t - t.mean(dims, keepdim=True) if self.centered else t


LAYER_NORM = Norm("layer_norm", _layer_norm_op, centered=True)
RMS_NORM = Norm("rms_norm", _rms_norm_op, centered=False)


def transforms_active() -> bool:
    """True inside a ``torch.func`` transform or a ``forward_ad.dual_level()`` context.

    Dual tensors only carry a tangent while a dual level is open, so the level (the same
    module global that torch.compile guards on) tells whether forward AD may be in play.
    """
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def acc_dtype(input: torch.Tensor) -> torch.dtype:
    """The kernels' accumulation dtype, that of mean and rstd: float64 for float64 input,
    else float32."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def resolved_rms_eps(input: torch.Tensor, eps: Optional[float]) -> float:
    """RMSNorm's eps as the op resolves it (rms_norm_eps in csrc/layernorm.cpp): the given
    one, else torch's default, the machine epsilon of the accumulation dtype."""
    return torch.finfo(acc_dtype(input)).eps if eps is None else eps


def _normalize(norm: Norm, input: torch.Tensor, dims: tuple[int, ...], eps: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(xhat, rstd) in the accumulation dtype, from differentiable ops.

    The statistics are recomputed rather than taken from the op's (non-differentiable)
    mean/rstd outputs, so that higher derivatives see their dependence on the input.
    """
    centered = norm.center(input.to(acc_dtype(input)), dims)
    rstd = (centered.square().mean(dims, keepdim=True) + eps).rsqrt()
    return centered * rstd, rstd


def _normalized_dims(input: torch.Tensor, num_normalized_dims: int) -> tuple[int, ...]:
    return tuple(range(input.dim() - num_normalized_dims, input.dim()))


def _sum_over_rows(t: torch.Tensor, num_normalized_dims: int) -> torch.Tensor:
    # sum(()) would reduce every dim, so an input without leading dims is returned as is.
    row_dims = tuple(range(t.dim() - num_normalized_dims))
    return t.sum(row_dims) if row_dims else t


def _differentiable_backward(norm: Norm, grad_out: torch.Tensor, input: torch.Tensor,
                             num_normalized_dims: int, weight: Optional[torch.Tensor],
                             param_dtype: torch.dtype, eps: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias) from differentiable ops (double backward)."""
    dims = _normalized_dims(input, num_normalized_dims)
    xhat, rstd = _normalize(norm, input, dims, eps)
    dy = grad_out.to(xhat.dtype)
    g = dy * weight.to(xhat.dtype) if weight is not None else dy
    grad_input = rstd * (norm.center(g, dims) - xhat * (g * xhat).mean(dims, keepdim=True))
    grad_weight = _sum_over_rows(dy * xhat, len(dims))
    grad_bias = _sum_over_rows(dy, len(dims))
    return grad_input.to(input.dtype), grad_weight.to(param_dtype), grad_bias.to(param_dtype)


class NormFunction(torch.autograd.Function):
    """A norm's fused forward op with autograd that functorch can transform.

    ``backward`` is computed from differentiable ops rather than by the fused backward
    kernel: every functorch gradient transform differentiates with ``create_graph=True``,
    so the backward must itself be differentiable (and batchable by vmap) here. Plain eager
    training never comes here and keeps the fused kernels. ``jvp`` is the norm's tangent,
    with ``xhat = center(x) * rstd`` (``center`` subtracts the row mean for LayerNorm and
    is the identity for RMSNorm)::

        dxhat = rstd * (center(dx) - xhat * mean(dx * xhat))
        dy    = dxhat * weight + xhat * dweight + dbias

    It returns the output only (vmap's generated rules cannot pass the gradient of a
    non-differentiable mean/rstd output) and takes the number of normalized trailing dims
    rather than ``normalized_shape`` (they need every non-tensor argument to be a single
    pytree leaf; under vmap the sizes are read from the per-sample input). The caller checks
    that ``normalized_shape`` matches the input and resolves RMSNorm's ``eps=None``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, num_normalized_dims, weight, bias, eps, norm):
        normalized_shape = list(input.shape[input.dim() - num_normalized_dims:])
        return norm.fused_forward(input, normalized_shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, num_normalized_dims, weight, bias, eps, norm = inputs
        ctx.save_for_backward(input, weight)
        ctx.save_for_forward(input, weight)
        ctx.num_normalized_dims = num_normalized_dims
        ctx.eps = eps
        ctx.norm = norm
        ctx.param_dtype = next((p.dtype for p in (weight, bias) if p is not None), input.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = _differentiable_backward(
            ctx.norm, grad_out, input, ctx.num_normalized_dims, weight, ctx.param_dtype,
            ctx.eps)
        needs = ctx.needs_input_grad
        return (grad_input if needs[0] else None, None, grad_weight if needs[2] else None,
                grad_bias if needs[3] else None, None, None)

    @staticmethod
    def jvp(ctx, input_t, _num_normalized_dims_t, weight_t, bias_t, _eps_t, _norm_t):
        input, weight = ctx.saved_tensors
        dims = _normalized_dims(input, ctx.num_normalized_dims)
        xhat, rstd = _normalize(ctx.norm, input, dims, ctx.eps)
        acc = xhat.dtype
        if input_t is not None:
            dx = input_t.to(acc)
            dxhat = rstd * (ctx.norm.center(dx, dims)
                            - xhat * (dx * xhat).mean(dims, keepdim=True))
            output_t = dxhat * weight.to(acc) if weight is not None else dxhat
        else:
            output_t = torch.zeros_like(xhat)
        if weight_t is not None:
            output_t = output_t + xhat * weight_t.to(acc)
        if bias_t is not None:
            output_t = output_t + bias_t.to(acc)
        return output_t.to(input.dtype)


def _nested_forward_ad() -> bool:
    """More than one forward-mode AD level is open.

    Only functorch nests them (forward_ad has a single dual level, which the outermost
    torch.func.jvp opens itself). functorch counts its open jvp transforms in a module
    global, which torch.compile can read (it cannot walk the interpreter stack).
    """
    return eager_transforms.JVP_NESTING > 1


def _transform_active(*kinds: TransformType) -> bool:
    """A functorch transform of one of these kinds is active (Grad and Jvp: grad/vjp/jvp
    and the jacobians built on them; Functionalize: it has no rule for an
    autograd.Function)."""
    return any(interpreter.key() in kinds for interpreter in get_interpreter_stack() or [])


def composite_forward(norm: Norm, input: torch.Tensor, num_normalized_dims: int,
                      weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, rstd) of the norm from differentiable ATen ops, computed in the kernels'
    accumulation dtype; rstd keeps the normalized dims, as size 1."""
    xhat, rstd = _normalize(norm, input, _normalized_dims(input, num_normalized_dims), eps)
    output = xhat * weight.to(xhat.dtype) if weight is not None else xhat
    output = output + bias.to(xhat.dtype) if bias is not None else output
    return output.to(input.dtype), rstd


def _composite_norm(norm: Norm, input: torch.Tensor, num_normalized_dims: int,
                    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    eps: float) -> torch.Tensor:
    return composite_forward(norm, input, num_normalized_dims, weight, bias, eps)[0]


def _transformed_norm(norm: Norm, input: torch.Tensor, normalized_shape: list[int],
                      weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      eps: float) -> torch.Tensor:
    num_normalized_dims = len(normalized_shape)
    # torch.compile cannot trace the op's call from inside a functorch transform (it runs
    # the autograd.Function's forward at the transform's level, where the op's C++ node
    # is refused), nor walk functorch's interpreter stack; the differentiable ops
    # compile, and Inductor fuses them.
    if torch.compiler.is_compiling() or _nested_forward_ad():
        return _composite_norm(norm, input, num_normalized_dims, weight, bias, eps)
    if forward_ad._current_level < 0 and not _transform_active(TransformType.Grad,
                                                                TransformType.Jvp):
        return norm.fused_forward(input, normalized_shape, weight, bias, eps)
    if _transform_active(TransformType.Functionalize):
        return _composite_norm(norm, input, num_normalized_dims, weight, bias, eps)
    return NormFunction.apply(input, num_normalized_dims, weight, bias, eps, norm)


def transformed_layer_norm(input: torch.Tensor, normalized_shape: list[int],
                           weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           eps: float) -> torch.Tensor:
    """layer_norm while :func:`transforms_active`; the arguments are already checked."""
    return _transformed_norm(LAYER_NORM, input, normalized_shape, weight, bias, eps)


def transformed_rms_norm(input: torch.Tensor, normalized_shape: list[int],
                         weight: Optional[torch.Tensor], eps: Optional[float]
                         ) -> torch.Tensor:
    """rms_norm while :func:`transforms_active`; the arguments are already checked (weight
    already in a dtype the kernels pair with input's)."""
    # The differentiable formulas need eps as a number.
    return _transformed_norm(RMS_NORM, input, normalized_shape, weight, None,
                             resolved_rms_eps(input, eps))
