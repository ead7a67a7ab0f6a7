"""``LayerNorm`` and ``RMSNorm``: ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` running the
fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from .ops import _kernel_weight, _torch_computes_only, layer_norm, rms_norm


class LayerNorm(nn.LayerNorm):
    """Drop-in replacement for :class:`torch.nn.LayerNorm` using the fused kernels.

    It is an ``nn.LayerNorm`` in every other respect: the same constructor
    ``LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
    device=None, dtype=None)``, the same attributes and parameters (``weight``,
    ``bias``; ``bias`` is None when ``bias=False``), ``reset_parameters()``,
    ``extra_repr()`` and state_dict layout, so checkpoints move between the two classes
    and ``isinstance(m, nn.LayerNorm)`` stays true.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            # TorchScript compiles only this branch; it cannot compile layer_norm's Python.
            return torch.ops.layernorm_ext.forward(input, list(self.normalized_shape),
                                                   self.weight, self.bias, self.eps)[0]
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """Drop-in replacement for :class:`torch.nn.RMSNorm` using the fused kernels.

    It is an ``nn.RMSNorm`` in every other respect: the same constructor
    ``RMSNorm(normalized_shape, eps=None, elementwise_affine=True, device=None,
    dtype=None)`` (``eps=None``: torch's default, see :func:`layernorm_ext.rms_norm`),
    the same ``weight`` parameter (None without ``elementwise_affine``),
    ``reset_parameters()``, ``extra_repr()`` and state_dict layout, so checkpoints move
    between the two classes and ``isinstance(m, nn.RMSNorm)`` stays true.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            # As LayerNorm's, with rms_norm's cast of a weight the kernels don't pair with x,
            # and its hand-off to torch of what the kernels don't take.
            if _torch_computes_only(x, self.weight):
                return torch.rms_norm(x, list(self.normalized_shape), self.weight, self.eps)
            return torch.ops.layernorm_ext.rms_forward(x, list(self.normalized_shape),
                                                       _kernel_weight(x, self.weight),
                                                       self.eps)[0]
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)
