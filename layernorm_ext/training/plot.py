"""Loss and accuracy curves of one run, or of the fused and torch runs side by side."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Union

from .config import EpochResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LINE_STYLES = ("-", "--", ":", "-.")  # the torch curve dashed over the fused one


def check_plot_path(path: Union[str, "os.PathLike[str]"]) -> str:
    """The file :func:`plot_history` writes for ``path``: matplotlib adds its default
    format's suffix (.png) to a name without one. Raises ImportError without matplotlib
    and ValueError for a suffix it cannot write, so a run can fail before it trains."""
    try:
        from matplotlib import rcParams
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as error:
        raise ImportError("--plot needs matplotlib (pip install matplotlib)") from error
    name = os.fspath(path)
    suffix = os.path.splitext(name)[1][1:].lower()
    if not suffix:
        return f"{name}.{rcParams['savefig.format']}"
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(f"matplotlib cannot write .{suffix} files (it writes "
                         f"{', '.join('.' + f for f in sorted(formats))})")
    return name


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
