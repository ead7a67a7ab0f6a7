"""The document's model: ``fc1 -> LayerNorm -> ReLU -> fc2``."""

from __future__ import annotations

import torch
from torch import nn

from ..modules import LayerNorm

NORMS: dict[str, type[nn.LayerNorm]] = {"fused": LayerNorm, "torch": nn.LayerNorm}


class MLP(nn.Module):
    """fc1 -> LayerNorm -> ReLU -> fc2, as in the document; `norm` picks the LayerNorm class."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int,
                 norm: type[nn.LayerNorm] = LayerNorm) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.norm1 = norm(hidden_size)
        self.fc2 = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.norm1(x)
        x = torch.relu(x)
        return self.fc2(x)
