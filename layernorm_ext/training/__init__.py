"""The training tool behind ``python -m layernorm_ext.train``, as a library.

- :class:`TrainConfig`, :class:`EpochResult`: a run's settings and per-epoch numbers.
- :func:`train`: one run in this process (the document's run with the defaults).
- :func:`fit`: everything the command line does: fused vs torch comparison, checkpoints,
  progress bar, DistributedDataParallel under torchrun.
- :class:`MLP`, :func:`make_data`, :func:`plot_history`: the model, the data, the plots.
"""

from .checkpoint import checkpoint_config, load_checkpoint
from .config import DIGITS_DEFAULTS, EpochResult, TrainConfig, defaults_for
from .data import Data, Split, make_data
from .loop import COMPARE_NORMS, fit, resolve_device, train
from .model import MLP, NORMS
from .plot import plot_history

__all__ = ["COMPARE_NORMS", "DIGITS_DEFAULTS", "Data", "EpochResult", "MLP", "NORMS", "Split",
           "TrainConfig", "checkpoint_config", "defaults_for", "fit", "load_checkpoint",
           "make_data", "plot_history", "resolve_device", "train"]
