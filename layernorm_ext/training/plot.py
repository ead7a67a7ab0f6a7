"""Loss and accuracy curves of one run, or of the fused and torch runs side by side."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Union

from .config import EpochResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LINE_STYLES = ("-", "--", ":", "-.")  # the torch curve dashed over the fused one


def plot_history(histories: Mapping[str, Sequence[EpochResult]],
                 path: Union[str, "os.PathLike[str]"]) -> "Figure":
    """Draws loss (left) and accuracy (right) per epoch into ``path`` (e.g. a .png).

    ``histories`` maps a run's name ("fused", "torch") to its per-epoch results. Returns
    the matplotlib Figure.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("--plot needs matplotlib (pip install matplotlib)") from error

    # Figure without pyplot: no global backend state, no display needed.
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for (name, history), style in zip(histories.items(), LINE_STYLES):
        epochs = [r.epoch for r in history]
        loss_axes.plot(epochs, [r.loss for r in history], style, marker=".",
                       label=f"{name} LayerNorm")
        accuracy_axes.plot(epochs, [100 * r.accuracy for r in history], style, marker=".",
                           label=f"{name} train")
        if history and all(r.test_accuracy is not None for r in history):
            accuracy_axes.plot(epochs, [100 * r.test_accuracy for r in history], style,
                               marker="x", label=f"{name} test")
    loss_axes.set(title="Training loss", xlabel="epoch", ylabel="cross-entropy loss")
    accuracy_axes.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.savefig(path)
    return figure
