"""DTensor sharding rules for the ``torch.ops.layernorm_ext`` operators.

The kernels normalize rows, so a DTensor input may be sharded along any of its leading
(row) dims: each rank normalizes its own rows, weight and bias are replicated, and the
parameter gradients of the backward are partial sums over the ranks (``Partial()``),
which DTensor adds up when they are redistributed. An input sharded along a normalized
dim is first redistributed by DTensor (to ``Replicate()``), as for torch's own
layer_norm when no rule fits.

The rules are registered on import when ``torch.distributed.tensor`` is already
imported, else the first time :func:`layer_norm` or :func:`rms_norm` sees a DTensor
(importing it takes about a second, too much for every import of this package). Under
``torch.compile(fullgraph=True)`` that first time cannot be traced: call
:func:`register` before compiling (or import ``torch.distributed.tensor`` first).
"""

from __future__ import annotations

import sys
import threading

import torch

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Registers the operators' DTensor sharding rules (once; later calls do nothing)."""
    global _registered
    with _lock:
        if not _registered:
            _register()
            _registered = True


def register_if_dtensor(*tensors: object) -> None:
    """Registers the rules when one of ``tensors`` is a DTensor."""
    if _registered:
        return
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is None:  # no DTensor can exist yet
        return
    if any(isinstance(t, dtensor_module.DTensor) for t in tensors):
        register()


def _register() -> None:
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    ops = torch.ops.layernorm_ext

    def row_dims(input, normalized_shape) -> range:
        return range(input.ndim - len(normalized_shape))

    def replicated(*params) -> list:
        return [None if param is None else Replicate() for param in params]

    # Each rule: (output placements, input placements) pairs; None for a non-tensor or
    # absent argument. All replicated always fits; then one pair a row dim.
    @register_sharding(ops.forward.default)
    def forward_rule(input, normalized_shape, weight, bias, eps):
        params = replicated(weight, bias)
        return [([Replicate()] * 3, [Replicate(), None, *params, None])] + [
            ([Shard(dim)] * 3, [Shard(dim), None, *params, None])
            for dim in row_dims(input, normalized_shape)]

    @register_sharding(ops.backward.default)
    def backward_rule(grad_out, input, normalized_shape, mean, rstd, weight, bias):
        params = replicated(weight, bias)
        return [([Replicate()] * 3, [Replicate()] * 2 + [None] + [Replicate()] * 2 + params)] + [
            ([Shard(dim), Partial(), Partial()], [Shard(dim)] * 2 + [None] + [Shard(dim)] * 2
             + params)
            for dim in row_dims(input, normalized_shape)]

    @register_sharding(ops.rms_forward.default)
    def rms_forward_rule(input, normalized_shape, weight, eps):
        params = replicated(weight)
        return [([Replicate()] * 2, [Replicate(), None, *params, None])] + [
            ([Shard(dim)] * 2, [Shard(dim), None, *params, None])
            for dim in row_dims(input, normalized_shape)]

    @register_sharding(ops.rms_backward.default)
    def rms_backward_rule(grad_out, input, normalized_shape, rstd, weight):
        params = replicated(weight)
        return [([Replicate()] * 2, [Replicate()] * 2 + [None, Replicate()] + params)] + [
            ([Shard(dim), Partial()], [Shard(dim)] * 2 + [None, Shard(dim)] + params)
            for dim in row_dims(input, normalized_shape)]
