"""``LayerNorm``: ``torch.nn.LayerNorm`` running the fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from .ops import layer_norm


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
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
