"""``python -m layernorm_ext.train``: the original document's run, and a small training tool.

With no arguments it is the document's example: ``fc1 -> LayerNorm -> ReLU -> fc2``
(input 10, hidden 20, output 2) trained on 100 random samples with CrossEntropyLoss and
SGD (lr 0.01) for 10 full-batch epochs on the CPU with ``layernorm_ext.LayerNorm``,
printing one line per epoch: ``Epoch [i/10], Loss: x.xxxx, Accuracy: yy.yy%``.

The options change the model, data (``--dataset digits``: a real task with a held-out
split), optimizer, batch size, device and precision; ``--compare`` trains the fused and
the ``torch.nn.LayerNorm`` model side by side; ``--save``/``--resume`` checkpoint;
``--plot`` draws the curves; ``--ddp`` trains with DistributedDataParallel under torchrun.
The library behind it is :mod:`layernorm_ext.training`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, Optional

from .training import (COMPARE_NORMS, MLP, NORMS, EpochResult, TrainConfig, checkpoint_config,
                       defaults_for, fit, load_checkpoint, plot_history, resolve_device, train)
from .training.config import (DATASETS, DTYPES, OPTIMIZERS, SEED_RANGE, check_config,
                               resume_conflicts)
from .training.data import check_data_available, check_data_config, train_samples
from .training.distributed import check_torchrun_environment, is_main_process
from .training.loop import autocast_factory, check_resume, local_batch_size
from .training.plot import check_plot_path
from .training.progress import PROGRESS_MODES, check_progress_mode

__all__ = ["MLP", "NORMS", "TrainConfig", "EpochResult", "train", "format_epoch",
           "format_comparison", "parse_args", "main"]

EXAMPLES = """examples:
  python -m layernorm_ext.train                          # the document's run
  python -m layernorm_ext.train --compare                # fused vs torch.nn.LayerNorm
  python -m layernorm_ext.train --dataset digits --plot digits.png
  python -m layernorm_ext.train --epochs 5 --save run.pt && \\
      python -m layernorm_ext.train --resume run.pt --epochs 10
  torchrun --nproc_per_node=2 -m layernorm_ext.train --ddp --batch-size 20
"""


@dataclass
class CliOptions:
    """A parsed command line: the run's settings and what to do around it."""

    config: TrainConfig
    compare: bool = False
    save: Optional[str] = None
    resume: Optional[str] = None
    resumed_epoch: int = 0
    plot: Optional[str] = None
    progress: str = "auto"
    ddp: bool = False
    device_from_checkpoint: bool = False  # --resume set the device, not the command line


def _int_at_least(least: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")
_class_count = _int_at_least(2, "at least 2 (classes)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be in [-2**63, 2**64 - 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line. Unset options are absent from the namespace (SUPPRESS), so the
    defaults can come from the data set (``--dataset digits``) or from ``--resume``."""
    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m layernorm_ext.train", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        description="Train the document's MLP (fc1 -> LayerNorm -> ReLU -> fc2) with the\n"
                    "fused LayerNorm and print loss and accuracy per epoch. With --resume,\n"
                    "unset options keep the checkpoint's values.")
    data = parser.add_argument_group("model and data")
    data.add_argument("--dataset", choices=DATASETS,
                      help="random: the document's random samples; digits: scikit-learn's "
                           "bundled 8x8 digit images, 20%% held out for testing, with defaults "
                           "--hidden-size 64 --epochs 20 --batch-size 64 --optimizer adam "
                           "--lr 0.01 (default: random)")
    data.add_argument("--input-size", type=_positive_int,
                      help=f"features per sample (default: {d.input_size}; digits: 64)")
    data.add_argument("--hidden-size", type=_positive_int,
                      help=f"width of fc1 and the LayerNorm (default: {d.hidden_size})")
    data.add_argument("--output-size", type=_class_count,
                      help=f"classes (default: {d.output_size}; digits: 10)")
    data.add_argument("--samples", type=_positive_int,
                      help=f"samples in the data set (default: {d.samples}; digits: all 1797)")
    data.add_argument("--norm", choices=sorted(NORMS),
                      help="fused: layernorm_ext.LayerNorm; torch: torch.nn.LayerNorm "
                           f"(default: {d.norm})")
    run = parser.add_argument_group("training")
    run.add_argument("--epochs", type=_non_negative_int, help=f"default: {d.epochs}")
    run.add_argument("--batch-size", type=_positive_int,
                     help="global batch size, shared by all processes with --ddp "
                          "(default: the full data set, as in the document)")
    run.add_argument("--lr", type=_positive_float, help=f"learning rate (default: {d.lr})")
    run.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default: {d.optimizer}")
    run.add_argument("--seed", type=_seed, help=f"seed for data and initialization "
                                              f"(default: {d.seed})")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"),
                     help=f"auto: CUDA when available (default: {d.device})")
    run.add_argument("--dtype", choices=DTYPES,
                     help="bfloat16/float16 train under torch.autocast with float32 weights "
                          "(float16 with a GradScaler) (default: float32)")
    tool = parser.add_argument_group("tool")
    tool.add_argument("--compare", action="store_true",
                      help="train the fused and a torch.nn.LayerNorm model from the same "
                           "initialization and batches, side by side (excludes --norm)")
    tool.add_argument("--save", metavar="PATH",
                      help="write a checkpoint (models, optimizers, epoch, RNG) every epoch")
    tool.add_argument("--resume", metavar="PATH", help="continue a checkpoint to --epochs")
    tool.add_argument("--plot", metavar="PATH.png", help="draw loss and accuracy curves")
    tool.add_argument("--progress", choices=PROGRESS_MODES,
                      help="progress bar on stderr; auto: on a terminal, for runs longer "
                           "than 2 s (default: auto)")
    tool.add_argument("--ddp", action="store_true",
                      help="DistributedDataParallel in a torchrun job (gloo on CPU, nccl on "
                           "CUDA); logs from rank 0")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> CliOptions:
    """Parses and checks the command line; errors exit with argparse's usage message."""
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    tool_fields = {f.name for f in dataclasses.fields(CliOptions)} - {"config"}
    options = CliOptions(TrainConfig(), **{k: values.pop(k) for k in tool_fields & set(values)})
    if options.compare and "norm" in values:
        parser.error("--compare trains both norms; drop --norm")

    if options.resume is not None:
        try:
            state = load_checkpoint(options.resume)
        except (OSError, ValueError, RuntimeError) as error:  # the message names the file
            parser.error(f"--resume: {error}")
        saved = checkpoint_config(state)
        options.resumed_epoch = state["epoch"]
        options.config = dataclasses.replace(saved, **values)
        conflicts = resume_conflicts(saved, options.config)
        if conflicts:
            parser.error(f"--resume {options.resume}: these settings cannot change on resume: "
                         + ", ".join(conflicts))
        if not options.compare and "norm" not in values and len(state["runs"]) > 1:
            options.compare = True  # a --compare checkpoint continues as one
        options.device_from_checkpoint = "device" not in values
    else:
        options.config = dataclasses.replace(defaults_for(values.get("dataset", "random")),
                                             **values)
    _check(parser, options)
    if options.resume is not None:
        try:
            check_resume(options.resume, state, options.config,
                         COMPARE_NORMS if options.compare else (options.config.norm,))
        except ValueError as error:
            parser.error(f"--resume {error}")
    return options


def _check(parser: argparse.ArgumentParser, options: CliOptions) -> None:
    """Fails before training on what would fail during it."""
    config = options.config
    try:
        check_config(config)
        check_data_config(config)
        check_data_available(config)
        check_progress_mode(options.progress)
        try:
            device = resolve_device(config.device, COMPARE_NORMS if options.compare else
                                    (config.norm,))
        except RuntimeError as error:
            if options.device_from_checkpoint:
                raise RuntimeError(f"{error} (the checkpoint's device; --device cpu resumes "
                                   "on the CPU)") from None
            raise
        autocast_factory(device, config.dtype)
        if options.ddp:
            check_torchrun_environment()
    except (TypeError, ValueError, RuntimeError, ImportError) as error:
        parser.error(str(error))
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if options.ddp else 1
    try:
        local_batch_size(config.batch_size, train_samples(config), world_size)
    except ValueError as error:
        parser.error(str(error))
    # (option, as given, the file it ends up in, the file written first)
    targets = []
    if options.save is not None:  # a checkpoint goes to PATH.tmp, then is renamed PATH
        targets.append(("--save", options.save, options.save, f"{options.save}.tmp"))
    if options.plot is not None:
        try:
            # the file matplotlib writes: PATH, or PATH.png for a name without a suffix
            written = check_plot_path(options.plot)
        except (ImportError, ValueError) as error:
            parser.error(f"--plot {options.plot}: {error}")
        targets.append(("--plot", options.plot, written, written))
    for option, path, final, first in targets:
        if os.path.isdir(path) or os.path.isdir(final) or not os.path.basename(path):
            where = "" if final == path else f" (it writes {final})"
            parser.error(f"{option} {path!r}{where}: a folder; give a file name")
        if not os.path.isdir(os.path.dirname(os.path.abspath(final))):
            parser.error(f"{option} {path}: the folder does not exist")
        # Tried now, not found out after the training; by the one process of a --ddp
        # job that writes (the others would race it to create and remove the probe).
        if is_main_process():
            existed = os.path.exists(first)
            try:
                with open(first, "ab"):
                    pass
            except OSError as error:
                parser.error(f"{option} {path}: cannot write {first}: {error.strerror}")
            if not existed:
                os.remove(first)


def _columns(result: EpochResult) -> str:
    text = "Loss: {:.4f}, Accuracy: {:.2f}%".format(result.loss, result.accuracy * 100)
    if result.test_accuracy is not None:
        text += ", Test Accuracy: {:.2f}%".format(result.test_accuracy * 100)
    return text


def format_epoch(result: EpochResult, epochs: int) -> str:
    """The document's line: 'Epoch [i/N], Loss: x.xxxx, Accuracy: yy.yy%' (and the test
    accuracy for data sets with a held-out split)."""
    return "Epoch [{}/{}], {}".format(result.epoch, epochs, _columns(result))


def format_comparison(results: Mapping[str, EpochResult], epochs: int) -> str:
    """One epoch of the fused and torch runs side by side, with their loss difference."""
    fused, reference = results["fused"], results["torch"]
    return "Epoch [{}/{}], fused {} | torch {} | loss difference: {:.2e}".format(
        fused.epoch, epochs, _columns(fused), _columns(reference),
        abs(fused.loss - reference.loss))


def _summary(options: CliOptions, histories: Mapping[str, list[EpochResult]]) -> list[str]:
    lines = []
    if options.compare and histories["fused"]:
        differences = [(abs(f.loss - t.loss), f.epoch)
                       for f, t in zip(histories["fused"], histories["torch"])]
        largest, epoch = max(differences)
        lines.append(f"Largest loss difference, fused vs torch: {largest:.2e} (epoch {epoch})")
    for norm, history in histories.items():
        if history and history[-1].test_accuracy is not None:
            label = f" ({norm} LayerNorm)" if options.compare else ""
            lines.append(f"Test accuracy{label}: {history[-1].test_accuracy * 100:.2f}% "
                         f"on the held-out split")
    if options.save is not None and options.resumed_epoch < options.config.epochs:
        lines.append(f"Saved checkpoint to {options.save} (epoch {options.config.epochs})")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m layernorm_ext.train [options]``; ``--help`` lists the options."""
    options = parse_args(argv)
    config = options.config
    main_process = is_main_process()
    if options.resume is not None and main_process:
        print(f"Resumed from {options.resume} at epoch {options.resumed_epoch}", flush=True)
        if options.resumed_epoch >= config.epochs:
            print(f"Nothing to train: the checkpoint is at epoch {options.resumed_epoch}; "
                  f"ask for more with --epochs", flush=True)

    def print_epoch(results: Mapping[str, EpochResult]) -> None:
        if options.compare:
            print(format_comparison(results, config.epochs), flush=True)
        else:
            print(format_epoch(results[config.norm], config.epochs), flush=True)

    histories = fit(config, compare=options.compare, on_epoch=print_epoch, save=options.save,
                    resume=options.resume, progress=options.progress, ddp=options.ddp)
    if not main_process:
        return
    for line in _summary(options, histories):
        print(line)
    if options.plot is not None:
        plot_history(histories, options.plot)
        print(f"Saved plot to {check_plot_path(options.plot)}")


if __name__ == "__main__":
    main()
