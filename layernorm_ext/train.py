"""The original document's example: an MLP with LayerNorm trained with SGD.

``python -m layernorm_ext.train`` builds ``fc1 -> LayerNorm -> ReLU -> fc2`` (input 10,
hidden 20, output 2), trains it on 100 random samples with CrossEntropyLoss and SGD
(lr 0.01) for 10 full-batch epochs, and prints one line per epoch:
``Epoch [i/10], Loss: x.xxxx, Accuracy: yy.yy%``. The LayerNorm is
``layernorm_ext.LayerNorm`` (``--norm torch`` uses ``torch.nn.LayerNorm`` instead).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .modules import LayerNorm

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


@dataclass
class EpochResult:
    epoch: int
    loss: float
    accuracy: float  # in [0, 1]


@dataclass
class TrainConfig:
    input_size: int = 10
    hidden_size: int = 20
    output_size: int = 2
    samples: int = 100
    epochs: int = 10
    lr: float = 0.01
    seed: int = 0
    norm: str = "fused"
    device: str = "cpu"


def format_epoch(result: EpochResult, epochs: int) -> str:
    """The document's line: 'Epoch [i/N], Loss: x.xxxx, Accuracy: yy.yy%'."""
    return "Epoch [{}/{}], Loss: {:.4f}, Accuracy: {:.2f}%".format(
        result.epoch, epochs, result.loss, result.accuracy * 100)


def train(config: TrainConfig,
          on_epoch: Optional[Callable[[EpochResult], None]] = None) -> list[EpochResult]:
    """Runs the document's training loop; the seed fixes data and initialization."""
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    x_train = torch.randn((config.samples, config.input_size))
    y_train = torch.randint(0, config.output_size, (config.samples,))
    model = MLP(config.input_size, config.hidden_size, config.output_size,
                NORMS[config.norm])
    model.to(device)
    x_train, y_train = x_train.to(device), y_train.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)

    results = []
    for epoch in range(config.epochs):
        outputs = model(x_train)
        loss = criterion(outputs, y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _, predicted = torch.max(outputs.data, 1)
        correct = (predicted == y_train).sum().item()
        result = EpochResult(epoch + 1, loss.item(), correct / y_train.size(0))
        results.append(result)
        if on_epoch is not None:
            on_epoch(result)
    return results


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m layernorm_ext.train",
        description="Train the document's MLP (fc1 -> LayerNorm -> ReLU -> fc2) with the "
                    "fused LayerNorm and print loss and accuracy per epoch.")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed for data and initialization (default: %(default)s)")
    parser.add_argument("--norm", choices=sorted(NORMS), default=defaults.norm,
                        help="fused: layernorm_ext.LayerNorm; torch: torch.nn.LayerNorm "
                             "(default: %(default)s)")
    parser.add_argument("--device", default=defaults.device, help="default: %(default)s")
    args = parser.parse_args(argv)
    return TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, norm=args.norm,
                       device=args.device)


def main(argv: Optional[Sequence[str]] = None) -> None:
    config = parse_args(argv)
    train(config, on_epoch=lambda r: print(format_epoch(r, config.epochs), flush=True))


if __name__ == "__main__":
    main()
