"""The data sets: the document's random samples, and scikit-learn's bundled digits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import TrainConfig

DIGITS_FEATURES = 64  # 8x8 images
DIGITS_CLASSES = 10
DIGITS_SAMPLES = 1797
TEST_FRACTION = 0.2


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Data:
    train: Split
    test: Optional[Split] = None  # the held-out split, when the data set has one


def make_data(config: TrainConfig) -> Data:
    """The data of ``config.dataset``, drawn from the global RNG (seed it first)."""
    check_data_config(config)
    if config.dataset == "digits":
        return digits_data(config.samples)
    return random_data(config.samples, config.input_size, config.output_size)


def train_samples(config: TrainConfig) -> int:
    """How many of ``config.samples`` the training split holds."""
    if config.dataset == "digits":
        return config.samples - _test_samples(config.samples)
    return config.samples


def _test_samples(samples: int) -> int:
    return max(1, round(samples * TEST_FRACTION))


def check_data_config(config: TrainConfig) -> None:
    """Raises ValueError when ``config``'s sizes do not fit its data set."""
    if config.dataset not in ("random", "digits"):
        raise ValueError(f"unknown dataset {config.dataset!r}; expected 'random' or 'digits'")
    if config.dataset == "random":
        return
    if (config.input_size, config.output_size) != (DIGITS_FEATURES, DIGITS_CLASSES):
        raise ValueError(
            f"the digits data set has {DIGITS_FEATURES} features and {DIGITS_CLASSES} classes, "
            f"so it needs input_size={DIGITS_FEATURES} and output_size={DIGITS_CLASSES} "
            f"(got {config.input_size} and {config.output_size})")
    if not 2 <= config.samples <= DIGITS_SAMPLES:
        raise ValueError(f"the digits data set has {DIGITS_SAMPLES} samples; "
                         f"samples must be in [2, {DIGITS_SAMPLES}] (got {config.samples})")


def check_data_available(config: TrainConfig) -> None:
    """Raises ImportError when ``config``'s data set needs a package that is missing."""
    if config.dataset == "digits":
        _load_digits_function()


def _load_digits_function():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("--dataset digits needs scikit-learn (pip install scikit-learn)") \
            from error
    return load_digits


def random_data(samples: int, input_size: int, output_size: int) -> Data:
    """The document's data: standard normal features, uniform labels, no test split."""
    x = torch.randn((samples, input_size))
    y = torch.randint(0, output_size, (samples,))
    return Data(Split(x, y))


def digits_data(samples: int = DIGITS_SAMPLES) -> Data:
    """``samples`` of the 1797 8x8 digit images that ship with scikit-learn, 20% held out."""
    digits = _load_digits_function()()  # read from files inside the package: no download
    x = torch.from_numpy(digits.data).float() / 16.0  # pixel intensities are 0..16
    y = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(y))[:samples]
    n_test = _test_samples(samples)
    test, train = order[:n_test], order[n_test:]
    return Data(Split(x[train], y[train]), Split(x[test], y[test]))
