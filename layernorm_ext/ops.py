"""The Python side of the ``torch.ops.layernorm_ext`` operators.

The schemas, the CPU/CUDA kernels and the autograd formula are registered in C++
(``csrc/``); this module adds the fake (meta) kernels used by ``torch.compile`` and
export, and ``layer_norm``, the functional entry point with ``F.layer_norm``'s signature;
then the same for RMSNorm (``rms_forward``/``rms_backward``, ``rms_norm``).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch.autograd import forward_ad
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _C  # loading the extension registers the operators
from .sharding import register_if_dtensor
from .transforms import (acc_dtype, transformed_layer_norm, transformed_rms_norm,
                         transforms_active)

__all__ = ["layer_norm", "rms_norm", "has_cuda_kernels", "cpu_kernels_isa",
           "cpu_stream_threshold"]

_forward = torch.ops.layernorm_ext.forward.default
_backward = torch.ops.layernorm_ext.backward.default

_ShapeLike = Union[int, Sequence[int], torch.Size]


# The CPU kernels read LAYERNORM_EXT_STREAM_BYTES (a tuning knob) once, now: a value they
# ignore is a Python warning here, where the same warning from an op would reach stderr only.
if _stream_warning := _C.stream_threshold_warning():
    warnings.warn(_stream_warning)

# Read before the CPU-only stub below is registered for the CUDA key.
_BUILT_WITH_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key(_forward.name(), "CUDA")


def has_cuda_kernels() -> bool:
    """True when this build of the extension contains the CUDA kernels."""
    return _BUILT_WITH_CUDA


def cpu_kernels_isa() -> str:
    """The instruction set of the CPU kernels this process runs: ``"AVX512"``, ``"AVX2"``
    or ``"DEFAULT"`` (the baseline build). It is the best this CPU has within ATen's CPU
    capability (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY``
    lowers); AVX2 and AVX-512 also need F16C and BMI2, which a virtual CPU may hide."""
    return _C.cpu_kernels_isa()


def cpu_stream_threshold() -> int:
    """The size in bytes from which the CPU kernels write their output (y, or dx) with
    non-temporal stores, past the cache: the last-level cache's size, at most 64 MiB (a
    virtual machine lists its host's cache; 32 MiB when the size is unknown), or
    ``LAYERNORM_EXT_STREAM_BYTES`` when that is set to a whole number of bytes. Smaller
    outputs stay cached for the next op."""
    return _C.stream_threshold_bytes()


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


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _scalar_type_name(dtype: torch.dtype) -> str:
    """dtype as the C++ checks print it (c10's ScalarType name: "Long" for torch.int64)."""
    return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


def _check_fake_inputs(input, normalized_shape, weight, bias, norm: str = "layer",
                       dtype_pairs: bool = True) -> None:
    """check_norm_inputs of csrc/layernorm_checks.cpp, for fake and meta tensors.

    The real kernels run the C++ checks; fake tensors never reach them, so shape
    inference (torch.compile, export, meta tensors) repeats them, in the same order and
    with the same messages: what the kernels refuse fails at trace time, not at run time.
    ``norm`` is "layer" or "rms" (torch words rms_norm's shape messages apart).
    ``dtype_pairs=False`` leaves out which parameter dtypes go with the input's, for a
    caller whose tensors autocast may still cast before they reach the op.
    """
    shape = list(normalized_shape)
    if not shape:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., "
                           f"containing at least one element, but got normalized_shape = {shape}")
    # torch's order: the parameters' shapes, then the input's, then the dtypes.
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and list(param.shape) != shape:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, but "
                               f"got {name} of shape {list(param.shape)} and normalized_shape "
                               f"= {shape}")
    if norm == "rms" and input.dim() < len(shape):
        raise ValueError(f"Input tensor must have at least {len(shape)} dimensions, but got "
                         f"{input.dim()}")
    if input.dim() < len(shape) or list(input.shape[input.dim() - len(shape):]) != shape:
        sizes = ", ".join(str(s) for s in shape)
        raise RuntimeError(f"Given normalized_shape={shape}, expected input with shape "
                           f"[*{', ' if norm == 'layer' else ''}{sizes}], but got input of size"
                           f"{list(input.shape)}")
    if norm == "rms" and input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(
            f"\"rms_norm\" not implemented for '{_scalar_type_name(input.dtype)}'")
    _check_floating(input, "input")
    reduced_input = input.dtype in (torch.float16, torch.bfloat16)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        _check_same_device(input, param)
        _check_floating(param, name)
        pairs = param.dtype == input.dtype or (reduced_input and param.dtype == torch.float32)
        if dtype_pairs and not pairs:
            raise RuntimeError(f"mixed dtype: expected {name} to have the input's dtype "
                               f"({_scalar_type_name(input.dtype)})"
                               f"{' or float32' if reduced_input else ''}, but got "
                               f"{_scalar_type_name(param.dtype)}")
    if dtype_pairs and weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise RuntimeError("mixed dtype: expected weight and bias to have the same dtype, but "
                           f"got {_scalar_type_name(weight.dtype)} and "
                           f"{_scalar_type_name(bias.dtype)}")


def _check_fake_backward_inputs(grad_out, input, mean, rstd, normalized_shape) -> None:
    """check_layer_norm_backward_inputs of csrc/layernorm_checks.cpp (mean is None for
    RMSNorm), after _check_fake_inputs, as in the C++."""
    if grad_out.shape != input.shape:
        raise RuntimeError(f"Expected grad_out of shape {list(input.shape)}, but got "
                           f"{list(grad_out.shape)}")
    if grad_out.dtype != input.dtype:
        raise RuntimeError(f"Expected grad_out of dtype {_scalar_type_name(input.dtype)}, but "
                           f"got {_scalar_type_name(grad_out.dtype)}")
    _check_same_device(input, grad_out, mean, rstd)
    # math.prod, not Size.numel(): that guards symbolic sizes to their values, and under
    # torch.compile each new batch size or sequence length compiled anew.
    rows = math.prod(input.shape[: input.dim() - len(normalized_shape)])
    stats = acc_dtype(input)
    for stat in (mean, rstd):
        if stat is not None and (stat.numel() != rows or stat.dtype != stats):
            raise RuntimeError(f"Expected mean and rstd with {rows} elements of dtype "
                               f"{_scalar_type_name(stats)}, but got {stat.numel()} elements "
                               f"of dtype {_scalar_type_name(stat.dtype)}")


def _check_floating(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(f"layernorm_ext: {name} must be float32, float64, float16 or "
                                  f"bfloat16, but got {_scalar_type_name(tensor.dtype)}")


@torch.library.register_fake("layernorm_ext::forward")
def _forward_fake(input, normalized_shape, weight, bias, eps):
    _check_fake_inputs(input, normalized_shape, weight, bias)
    stats_shape = input.shape[: input.dim() - len(normalized_shape)]
    output = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    mean = input.new_empty(stats_shape, dtype=acc_dtype(input))
    rstd = input.new_empty(stats_shape, dtype=acc_dtype(input))
    return output, mean, rstd


@torch.library.register_fake("layernorm_ext::backward")
def _backward_fake(grad_out, input, normalized_shape, mean, rstd, weight, bias):
    _check_fake_inputs(input, normalized_shape, weight, bias)
    _check_fake_backward_inputs(grad_out, input, mean, rstd, normalized_shape)
    param_dtype = _param_dtype(input, weight, bias)
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    grad_weight = input.new_empty(normalized_shape, dtype=param_dtype)
    grad_bias = input.new_empty(normalized_shape, dtype=param_dtype)
    return grad_input, grad_weight, grad_bias


@torch.library.register_vmap("layernorm_ext::forward")
def _forward_vmap(info, in_dims, input, normalized_shape, weight, bias, eps):
    """vmap maps onto the op itself: the batch dim becomes one more leading dim.

    Per-sample weight/bias (batched parameters) are applied after an unweighted call,
    with the batch dim broadcast over the leading dims, and the result rounded once.
    """
    input_dim, _, weight_dim, bias_dim, _ = in_dims
    if input_dim is None:
        input = input.expand(info.batch_size, *input.shape)
    else:
        input = input.movedim(input_dim, 0)
    if weight_dim is None and bias_dim is None:
        return _forward(input, normalized_shape, weight, bias, eps), (0, 0, 0)
    # What a loop of unbatched calls would refuse (a dtype pair above all), refused here
    # too with its message: one call on no rows, with one sample of each parameter.
    _forward(input.narrow(0, 0, 0), normalized_shape, _one_sample(weight, weight_dim),
             _one_sample(bias, bias_dim), eps)

    # Normalized in the kernels' accumulation type, the weight and bias applied there,
    # and rounded to the input's dtype once, as the unbatched kernel does.
    output, mean, rstd = _forward(_in_accumulation_type(input), normalized_shape, None, None,
                                  eps)
    # [B, *normalized_shape] -> [B, 1 (per leading dim), *normalized_shape]
    ones = (1,) * (input.dim() - 1 - len(normalized_shape))

    def per_sample(param, dim):
        if param is None:
            return None
        if dim is None:
            return param
        return param.movedim(dim, 0).reshape(param.shape[dim], *ones, *normalized_shape)

    w, b = per_sample(weight, weight_dim), per_sample(bias, bias_dim)
    output = _apply_per_sample(output, w, b)
    return (output.to(input.dtype), mean, rstd), (0, 0, 0)


def _one_sample(param: Optional[torch.Tensor], dim: Optional[int]) -> Optional[torch.Tensor]:
    """A stand-in for one sample of a (maybe batched) parameter: its shape, dtype, device."""
    if param is None or dim is None:
        return param
    return param.new_empty(param.shape[:dim] + param.shape[dim + 1:])


def _in_accumulation_type(input: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 input as float32 (what the kernels compute in), else input."""
    return input.float() if input.dtype in (torch.float16, torch.bfloat16) else input


def _apply_per_sample(output: torch.Tensor, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """output * weight + bias in output's dtype, or a wider parameter's."""
    dtype = output.dtype
    for param in (weight, bias):
        if param is not None:
            dtype = torch.promote_types(dtype, param.dtype)
    output = output.to(dtype)
    if weight is not None:
        output = output * weight.to(dtype)
    if bias is not None:
        output = output + bias.to(dtype)
    return output


if not _BUILT_WITH_CUDA:
    # A CPU-only build: say so instead of the dispatcher's generic "no kernel" error.
    def _no_cuda(*args, **kwargs):
        raise RuntimeError(
            "layernorm_ext was built without CUDA kernels, so it cannot run on a CUDA tensor. "
            "Rebuild it where a CUDA toolkit and a CUDA build of torch are present "
            "(and LAYERNORM_EXT_CPU_ONLY is unset).")

    for _op in ("forward", "backward"):
        torch.library.impl(f"layernorm_ext::{_op}", "CUDA")(_no_cuda)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_PLAIN_SHAPE_TYPES = (tuple, list, torch.Size)


_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined in Python


def _type_name(value: object) -> str:
    """The type's name as torch's messages print it (tp_name: "numpy.int64", "Tensor")."""
    cls = type(value)
    if cls.__flags__ & _HEAP_TYPE or cls.__module__ == "builtins":
        return cls.__name__
    return f"{cls.__module__}.{cls.__name__}"


def _type_error(argument: str, position: int, expected: str, value: object,
                function: str = "layer_norm") -> TypeError:
    # torch's argument parser words it so; `except TypeError` works as with F.layer_norm.
    return TypeError(f"{function}(): argument '{argument}' (position {position}) must be "
                     f"{expected}, not {_type_name(value)}")


def _as_index(size: object) -> object:
    """size as an int when torch's parser would take it as one (numpy integers, 0-dim
    integer tensors: anything with __index__ but bool), else size unchanged."""
    if isinstance(size, (bool, int, torch.SymInt, float)) or not hasattr(type(size), "__index__"):
        return size
    if isinstance(size, torch.Tensor) and size.dtype == torch.bool:
        # torch's parser refuses a bool tensor as a size, where __index__ takes it as 0/1:
        # let it raise its own error (a shape parsed on the meta device allocates nothing).
        torch.empty([size], device="meta")
    try:
        return operator.index(size)
    except TypeError:  # e.g. a float tensor
        return size


def _past_int64(size: int) -> bool:
    """Whether size is outside int64. Traced by Dynamo, a symbolic size is an int too, and a
    plain comparison would guard it to int64's bounds (torch.export then refuses a dynamic
    hidden dim): there the answer is what is known without a guard, exact for a constant."""
    if not torch.compiler.is_compiling():
        return not _INT64_MIN <= size <= _INT64_MAX
    # Loaded by then; imported at the top it would add ~0.35 s to `import layernorm_ext`.
    known = torch.fx.experimental.symbolic_shapes.statically_known_true
    return known(size < _INT64_MIN) or known(size > _INT64_MAX)


def _as_shape(normalized_shape: _ShapeLike, function: str = "layer_norm") -> Sequence[int]:
    """normalized_shape as a sequence of ints; an int is taken as (int,), as nn.LayerNorm does."""
    # The usual case, a tuple/list/Size of plain ints, returned as it is: this function
    # runs on every call, and at the seed's 100x20 a call takes only ~5 us.
    if type(normalized_shape) in _PLAIN_SHAPE_TYPES:
        for size in normalized_shape:
            if type(size) is not int or _past_int64(size):
                break
        else:
            # The op parses a torch.Size ~0.7 us slower than a tuple of the same ints.
            return tuple(normalized_shape) if type(normalized_shape) is torch.Size \
                else normalized_shape
    if isinstance(normalized_shape, (int, torch.SymInt)) and not isinstance(normalized_shape, bool):
        return [normalized_shape]
    if not isinstance(normalized_shape, (list, tuple, torch.Size)):
        raise _type_error("normalized_shape", 2, "tuple of ints", normalized_shape, function)
    sizes = []
    for pos, size in enumerate(normalized_shape):
        size = _as_index(size)
        if isinstance(size, bool) or not isinstance(size, (int, torch.SymInt)):
            raise TypeError(f"{function}(): argument 'normalized_shape' (position 2) must be "
                            f"tuple of ints, but found element of type {_type_name(size)} "
                            f"at pos {pos}")
        if isinstance(size, int) and _past_int64(size):
            raise _int64_error(size, pos, function)
        sizes.append(size)
    return sizes


def _int64_error(size: int, pos: int, function: str) -> TypeError:
    return TypeError(f"{function}(): argument 'normalized_shape' (position 2): {size} at pos "
                     f"{pos} does not fit in int64")


def _check_sizes_fit_int64(sizes: Sequence[int], function: str) -> None:
    """After the op refused a call: torch's TypeError for a size outside int64. Under
    torch.compile(dynamic=True) such a size can be traced as a symbol (which _as_shape checks
    without a guard) and reach the op. A plain comparison here: the call fails anyway."""
    for pos, size in enumerate(sizes):
        if isinstance(size, int) and not _INT64_MIN <= size <= _INT64_MAX:
            raise _int64_error(size, pos, function)


def _as_eps(eps: object, position: int, function: str) -> Union[float, torch.SymFloat]:
    """eps as the float the op takes, from whatever torch's argument parser takes for a
    float: Python and numpy numbers (bool included; a numpy complex one's real part, with
    numpy's warning), symbolic ints and floats, and 0-dim tensors that do not require
    grad (a complex one only without an imaginary part)."""
    if isinstance(eps, torch.SymFloat):
        return eps
    if isinstance(eps, torch.SymInt):
        return torch.sym_float(eps)
    if isinstance(eps, (float, int)):  # bool is an int
        return float(eps)
    if type(eps).__module__ == "numpy":
        import numpy  # the value is numpy's, so numpy is there

        if isinstance(eps, (numpy.number, numpy.bool_)):
            return float(eps)
    if isinstance(eps, torch.Tensor) and eps.dim() == 0 and not eps.requires_grad:
        value = eps.item()
        if isinstance(value, complex):
            if value.imag != 0:
                raise RuntimeError("value cannot be converted to type double without overflow")
            value = value.real
        return float(value)
    raise _type_error("eps", position, "float", eps, function)


def _check_argument_types(input: object, weight: object, bias: object,
                          eps: object) -> Union[float, torch.SymFloat]:
    """torch's argument checks of layer_norm's tensors; returns eps as a float (_as_eps)."""
    if not isinstance(input, torch.Tensor):
        raise _type_error("input", 1, "Tensor", input)
    for name, position, param in (("weight", 3, weight), ("bias", 4, bias)):
        if param is not None and not isinstance(param, torch.Tensor):
            raise _type_error(name, position, "Tensor", param)
    return _as_eps(eps, 5, "layer_norm")


def _on_jagged_values(input: torch.Tensor, normalized_shape: list[int], function: str,
                      normalize) -> torch.Tensor:
    """``normalize(values)`` of a jagged nested tensor normalized over regular trailing dims:
    its values are the rows. The result is a view over the same offsets, so it keeps the
    ragged size symbol and combines with the input (residual connections)."""
    # RuntimeErrors, as torch's layer_norm and rms_norm raise for nested input they refuse.
    if input.layout != torch.jagged:
        raise RuntimeError(f"layernorm_ext.{function}: nested tensors need layout=torch.jagged")
    if len(normalized_shape) > input.dim() - 1 - input._ragged_idx:
        raise RuntimeError(f"layernorm_ext.{function}: normalized_shape must not include the "
                           "ragged dimension of a nested tensor")
    from torch.nested._internal.nested_tensor import nested_view_from_values_offsets_lengths

    return nested_view_from_values_offsets_lengths(normalize(input.values()), input.offsets(),
                                                   input.lengths(),
                                                   ragged_idx=input._ragged_idx)


def _overridden(*tensors: object) -> bool:
    """Whether __torch_function__ (of an argument or an active mode) takes the call."""
    if torch._C._is_torch_function_mode_enabled():
        return True
    # Dynamo folds has_torch_function_* from the arguments alone, without the modes (asked
    # above), and traces subclasses' __torch_function__ itself. Asked last: a plain call
    # pays two C checks, no Python one.
    return has_torch_function_variadic(*tensors) and not torch.compiler.is_compiling()


def _given(*tensors: object) -> tuple:
    """The arguments that are not None: the "relevant args" for handle_torch_function.
    (torch 2.11's Dynamo cannot trace its hasattr(type(None), ...) under a mode.)"""
    return tuple(t for t in tensors if t is not None)


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
    output then keeps the input's dtype. ``normalized_shape`` may also be a single int
    (as for ``nn.LayerNorm``), and jagged nested tensors are normalized row by row.
    It works under ``torch.func`` transforms (``grad``, ``vjp``, ``jvp``, ``jacrev``,
    ``jacfwd``, ``hessian``, ``vmap``) and ``torch.autograd.forward_ad``.
    """
    if forward_ad._current_level < 0 and not torch.compiler.is_compiling():
        # The common eager call, whole in C (csrc/python_module.cpp says which calls it
        # takes): ~3 us at the seed's 100x20, where the way below costs ~2.5 us more.
        # For any other it returns NotImplemented. Dynamo traces the way below.
        output = _C.forward_output(input, normalized_shape, weight, bias, eps)
        if output is not NotImplemented:
            return output
    if _overridden(input, weight, bias):
        # As F.layer_norm: tensor-likes and modes that override torch functions (an FX
        # Proxy in torch.fx.symbolic_trace, a TorchFunctionMode) get the call.
        return handle_torch_function(layer_norm, _given(input, weight, bias), input,
                                     normalized_shape, weight=weight, bias=bias, eps=eps)
    shape = _as_shape(normalized_shape)
    if type(input) is torch.Tensor and type(eps) is float and not input.is_nested:
        # The op parses weight and bias itself; only if it refuses them do the checks
        # below run, to raise torch's own error (they cost ~0.3 us a call).
        if not transforms_active():
            try:
                return _forward(input, shape, weight, bias, eps)[0]
            except (TypeError, RuntimeError):
                _check_sizes_fit_int64(shape, "layer_norm")
                _check_argument_types(input, weight, bias, eps)
                raise
    eps = _check_argument_types(input, weight, bias, eps)
    if input.is_nested:
        if input.layout == torch.strided:  # the older nested layout: torch's own kernel
            # (torch.layer_norm, not F.layer_norm: that may be this function, patched in)
            return torch.layer_norm(input, shape, weight, bias, eps)
        return _on_jagged_values(input, shape, "layer_norm",
                                 lambda values: layer_norm(values, shape, weight, bias, eps))
    if transforms_active():
        # torch.func / forward AD: the op's C++ autograd node supports neither. The op's
        # checks run here, as the autograd.Function only gets the number of normalized dims;
        # but not the dtype pairs, which the op checks after CUDA autocast's casts.
        _check_fake_inputs(input, shape, weight, bias, dtype_pairs=False)
        return transformed_layer_norm(input, shape, weight, bias, eps)
    register_if_dtensor(input, weight, bias)  # not on the fast path: a DTensor is a subclass
    return _forward(input, shape, weight, bias, eps)[0]


# ---------------------------------------------------------------------------------------
# RMSNorm: torch.ops.layernorm_ext.rms_forward / rms_backward, the same kernels as
# LayerNorm with the Norm::kRms template flag (csrc/layernorm_math.h).

_rms_forward = torch.ops.layernorm_ext.rms_forward.default


@torch.library.register_fake("layernorm_ext::rms_forward")
def _rms_forward_fake(input, normalized_shape, weight, eps):
    _check_fake_inputs(input, normalized_shape, weight, None, "rms")
    stats_shape = input.shape[: input.dim() - len(normalized_shape)]
    output = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    return output, input.new_empty(stats_shape, dtype=acc_dtype(input))


@torch.library.register_fake("layernorm_ext::rms_backward")
def _rms_backward_fake(grad_out, input, normalized_shape, rstd, weight):
    _check_fake_inputs(input, normalized_shape, weight, None, "rms")
    _check_fake_backward_inputs(grad_out, input, None, rstd, normalized_shape)
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    grad_weight = input.new_empty(normalized_shape, dtype=_param_dtype(input, weight, None))
    return grad_input, grad_weight


@torch.library.register_vmap("layernorm_ext::rms_forward")
def _rms_forward_vmap(info, in_dims, input, normalized_shape, weight, eps):
    """As LayerNorm's rule: the batch dim becomes one more leading dim of the op's input; a
    per-sample weight is checked as an unbatched call would, then applied after an
    unweighted call, rounded once."""
    input_dim, _, weight_dim, _ = in_dims
    if input_dim is None:
        input = input.expand(info.batch_size, *input.shape)
    else:
        input = input.movedim(input_dim, 0)
    if weight_dim is None:
        return _rms_forward(input, normalized_shape, weight, eps), (0, 0)
    _rms_forward(input.narrow(0, 0, 0), normalized_shape, _one_sample(weight, weight_dim), eps)
    # (eps=None: float32's machine epsilon for float16/bfloat16 input and its float32 copy)
    output, rstd = _rms_forward(_in_accumulation_type(input), normalized_shape, None, eps)
    ones = (1,) * (input.dim() - 1 - len(normalized_shape))
    w = weight.movedim(weight_dim, 0).reshape(weight.shape[weight_dim], *ones, *normalized_shape)
    return (_apply_per_sample(output, w, None).to(input.dtype), rstd), (0, 0)


if not _BUILT_WITH_CUDA:
    for _op in ("rms_forward", "rms_backward"):
        torch.library.impl(f"layernorm_ext::{_op}", "CUDA")(_no_cuda)


def _is_kernel_dtype(dtype: torch.dtype) -> bool:
    """Whether the kernels take values of this dtype (float8 and complex they do not)."""
    # Written for TorchScript too, as the two below.
    return (dtype == torch.float32 or dtype == torch.float64 or dtype == torch.float16
            or dtype == torch.bfloat16)


def _kernel_weight(input: torch.Tensor, weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """weight in a dtype the kernels pair with input's (input's own, or float32 for
    float16/bfloat16 input).

    torch's rms_norm takes a weight of any of the kernels' dtypes and returns the input's
    dtype; the cast is differentiable, so weight.grad still comes back in weight's dtype.
    Other weights (integer, bool, complex, float8) go through unchanged, for the op's
    checks to reject.
    """
    # Written for TorchScript too (RMSNorm.forward calls it when scripted).
    if weight is None or weight.dtype == input.dtype or not _is_kernel_dtype(weight.dtype):
        return weight
    if input.dtype == torch.float16 or input.dtype == torch.bfloat16:
        return weight if weight.dtype == torch.float32 else weight.to(torch.float32)
    if input.dtype == torch.float32 or input.dtype == torch.float64:
        return weight.to(input.dtype)
    return weight


def rms_norm(
    input: torch.Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
) -> torch.Tensor:
    """Fused root mean square normalization over the trailing ``normalized_shape`` dims.

    Same signature and semantics as :func:`torch.nn.functional.rms_norm`:
    ``y = x / sqrt(mean(x^2) + eps) * weight``, where ``eps=None`` means torch's default,
    the machine epsilon of the computation type (``torch.finfo(torch.float32).eps`` for
    float32/float16/bfloat16 input, ``torch.finfo(torch.float64).eps`` for float64).
    Computed by the LayerNorm kernels of this package compiled for RMSNorm
    (``torch.ops.layernorm_ext.rms_forward``). The output has the input's dtype; ``weight``
    may be float32, float64, float16 or bfloat16 whatever the input's, as with torch
    (float16/bfloat16 input with float32 weight runs natively, other mixes cast the
    weight). Complex input and integer, bool, complex or float8 weights, which the kernels
    do not take, go to torch's own rms_norm (which refuses float8 weights).
    ``normalized_shape`` may also be an int, and jagged nested tensors are normalized row
    by row. It works under ``torch.func`` transforms and ``torch.autograd.forward_ad`` as
    :func:`layer_norm` does.
    """
    if forward_ad._current_level < 0 and not torch.compiler.is_compiling():
        output = _C.rms_forward_output(input, normalized_shape, weight, eps)  # as layer_norm's
        if output is not NotImplemented:
            return output
    if _overridden(input, weight):  # as layer_norm; NestedTensor's handler wants a list
        return handle_torch_function(rms_norm, _given(input, weight), input,
                                     _as_shape(normalized_shape, "rms_norm"),
                                     weight=weight, eps=eps)
    shape = _as_shape(normalized_shape, "rms_norm")
    if not isinstance(input, torch.Tensor):
        raise _type_error("input", 1, "Tensor", input, "rms_norm")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise _type_error("weight", 3, "Tensor", weight, "rms_norm")
    if eps is not None:
        eps = _as_eps(eps, 4, "rms_norm")
    if input.is_nested:
        return _on_jagged_values(input, shape, "rms_norm",
                                 lambda values: rms_norm(values, shape, weight, eps))
    kernel_weight = _kernel_weight(input, weight)
    if transforms_active():
        if _torch_computes_only(input, weight):
            return torch.rms_norm(input, shape, weight, eps)
        # As in layer_norm: the op's checks run here, for the autograd.Function.
        weight = kernel_weight
        _check_fake_inputs(input, shape, weight, None, "rms", dtype_pairs=False)
        return transformed_rms_norm(input, shape, weight, eps)
    if type(input) is not torch.Tensor:  # as layer_norm's: not for plain tensors' calls
        register_if_dtensor(input, kernel_weight)
    try:
        return _rms_forward(input, shape, kernel_weight, eps)[0]
    except RuntimeError as error:  # checked only then: the checks cost ~0.4 us a call
        _check_sizes_fit_int64(shape, "rms_norm")
        if isinstance(error, NotImplementedError) and _torch_computes_only(input, weight):
            return torch.rms_norm(input, shape, weight, eps)
        raise


def _torch_computes_only(input: torch.Tensor, weight: Optional[torch.Tensor]) -> bool:
    """Whether torch's composite rms_norm computes (or refuses, in its own words) what the
    kernels do not take: complex input, or an integer, bool, complex or float8 weight."""
    return input.is_complex() or (weight is not None and not _is_kernel_dtype(weight.dtype))
