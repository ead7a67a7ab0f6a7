"""What a training run is: its settings (``TrainConfig``) and its per-epoch numbers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

DATASETS = ("random", "digits")
OPTIMIZERS = ("sgd", "adam")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """Settings of one run. The defaults are the original document's run."""

    input_size: int = 10
    hidden_size: int = 20
    output_size: int = 2
    samples: int = 100
    epochs: int = 10
    lr: float = 0.01
    seed: int = 0
    norm: str = "fused"
    device: str = "cpu"
    batch_size: Optional[int] = None  # the global batch; None is one full batch per epoch
    optimizer: str = "sgd"
    dtype: str = "float32"  # anything else trains under torch.autocast with this dtype
    dataset: str = "random"


@dataclass
class EpochResult:
    epoch: int
    loss: float  # mean training loss over the epoch's samples
    accuracy: float  # training accuracy in [0, 1], from the same forward passes
    test_accuracy: Optional[float] = None  # on the held-out split, for data sets that have one


# The digits data set is a real task: mini-batches and Adam reach > 90% test accuracy
# in a few seconds on a CPU, where the document's full-batch SGD would barely move.
DIGITS_DEFAULTS = dict(input_size=64, hidden_size=64, output_size=10, samples=1797,
                       epochs=20, batch_size=64, optimizer="adam", lr=0.01)

# Settings a checkpoint's model, optimizer state and data depend on: resuming must keep them.
RESUME_FIXED = ("dataset", "input_size", "hidden_size", "output_size", "samples", "seed",
                "optimizer")


def defaults_for(dataset: str) -> TrainConfig:
    """The default settings for a data set: the document's run for ``random``."""
    if dataset == "digits":
        return TrainConfig(dataset="digits", **DIGITS_DEFAULTS)
    return TrainConfig(dataset=dataset)


def resume_conflicts(saved: TrainConfig, config: TrainConfig) -> list[str]:
    """The settings of ``config`` that a run saved with ``saved`` cannot resume under."""
    return [f"{name}={getattr(config, name)!r} (checkpoint: {getattr(saved, name)!r})"
            for name in RESUME_FIXED if getattr(saved, name) != getattr(config, name)]


def config_from_dict(values: dict) -> TrainConfig:
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})
