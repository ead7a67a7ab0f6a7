"""What a training run is: its settings (``TrainConfig``) and its per-epoch numbers."""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Optional

import torch

DATASETS = ("random", "digits")
OPTIMIZERS = ("sgd", "adam")
DTYPES = ("float32", "bfloat16", "float16")
NORM_NAMES = ("fused", "torch")
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.manual_seed takes


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


def check_config(config: TrainConfig) -> None:
    """Raises TypeError or ValueError, naming the setting, for a config no run can use
    (``fit`` checks its config first, so a bad one fails before any training)."""
    def whole(name: str, value: object, least: int) -> None:
        # any integer (numpy's too, by __index__), but not a bool
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if operator.index(value) < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")

    for name in ("input_size", "hidden_size", "samples"):
        whole(name, getattr(config, name), 1)
    whole("output_size", config.output_size, 2)  # classes: one class leaves nothing to learn
    whole("epochs", config.epochs, 0)
    if config.batch_size is not None:
        whole("batch_size", config.batch_size, 1)
    whole("seed", config.seed, SEED_RANGE[0])
    if operator.index(config.seed) > SEED_RANGE[1]:
        raise ValueError(f"seed must be at most 2**64 - 1, got {config.seed}")
    if isinstance(config.lr, bool) or not isinstance(config.lr, numbers.Real):
        raise TypeError(f"lr must be a float, got {type(config.lr).__name__} {config.lr!r}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {config.lr}")
    for name, choices in (("dataset", DATASETS), ("norm", NORM_NAMES),
                          ("optimizer", OPTIMIZERS), ("dtype", DTYPES)):
        if getattr(config, name) not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, "
                             f"got {getattr(config, name)!r}")
    if not isinstance(config.device, (str, torch.device)):
        raise TypeError(f"device must be a str ('auto', 'cpu', 'cuda', 'cuda:1', ...) or a "
                        f"torch.device, got {type(config.device).__name__} {config.device!r}")


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
