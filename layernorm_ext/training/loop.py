"""The training loop: one run, or the fused and torch runs in lockstep, on one or more processes.

Every process seeds the global RNG, draws the same data and the same initialization, and
takes its share of each global batch from a ``DistributedSampler`` (one process is the
special case ``num_replicas=1``), so a run's global batches do not depend on how many
processes share them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from ..ops import has_cuda_kernels
from .checkpoint import (PathLike, checkpoint_config, load_checkpoint, restore_rng, run_state,
                         save_checkpoint)
from .config import NORM_NAMES, EpochResult, TrainConfig, check_config, resume_conflicts
from .data import Split, make_data
from .distributed import World, process_group, sum_over_processes
from .model import MLP, NORMS
from .progress import ProgressBar

COMPARE_NORMS = NORM_NAMES  # the fused run first
AUTOCAST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPTIMIZER_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}

EpochCallback = Callable[[dict[str, EpochResult]], None]


@dataclass
class _Run:
    norm: str
    module: MLP  # the plain model: checkpoints and evaluation
    model: nn.Module  # what training calls: the module, or its DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    history: list[EpochResult]

    def state(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "history": [dataclasses.asdict(r) for r in self.history]}

    def load(self, state: dict, lr: float) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # the resumed run's lr, which may differ from the saved one
            # load_state_dict takes per-parameter state of any shape; a wrong one would
            # fail at the first step.
            for param in group["params"]:
                for key, value in self.optimizer.state.get(param, {}).items():
                    if (isinstance(value, torch.Tensor) and value.dim() > 0
                            and value.shape != param.shape):
                        raise ValueError(f"optimizer state {key!r} of shape {list(value.shape)}"
                                         f" for a parameter of shape {list(param.shape)}")
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.history = [EpochResult(**r) for r in state["history"]]


def resolve_device(name: str, norms: Sequence[str] = ("fused",)) -> torch.device:
    """``auto`` is CUDA when it is available (and the fused kernels were built for it)."""
    cuda_usable = torch.cuda.is_available() and ("fused" not in norms or has_cuda_kernels())
    if name == "auto":
        return torch.device("cuda" if cuda_usable else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was requested, but torch.cuda.is_available() is False")
    return device


def autocast_factory(device: torch.device, dtype: str) -> Callable[[], ContextManager]:
    """Mixed precision as PyTorch does it: float32 weights, ops under ``torch.autocast``."""
    if dtype == "float32":
        return contextlib.nullcontext
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(AUTOCAST_DTYPES)}, got {dtype!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype])
    if caught:  # torch warns and turns autocast off where the device lacks the dtype
        raise ValueError(f"--dtype {dtype} on {device.type}: {caught[0].message}")
    return lambda: torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype])


def fit(config: TrainConfig, *, compare: bool = False, on_epoch: Optional[EpochCallback] = None,
        save: Optional[PathLike] = None, resume: Optional[PathLike] = None,
        progress: str = "off", ddp: bool = False) -> dict[str, list[EpochResult]]:
    """Trains ``config``'s run (both the fused and the torch run with ``compare``).

    Returns each run's full history by norm name ("fused", "torch"), the resumed epochs
    included. ``on_epoch`` gets each epoch's results by norm name (on rank 0 only with
    ``ddp``). ``save`` writes a checkpoint after every epoch; ``resume`` continues one up
    to ``config.epochs``. ``ddp`` trains with DistributedDataParallel in a torchrun job.
    """
    check_config(config)
    norms = COMPARE_NORMS if compare else (config.norm,)
    device = resolve_device(config.device, norms)
    with process_group(device.type) if ddp else contextlib.nullcontext(World()) as world:
        if world.distributed and device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
        return _fit(config, norms, device, world, on_epoch, save, resume, progress)


def train(config: TrainConfig,
          on_epoch: Optional[Callable[[EpochResult], None]] = None) -> list[EpochResult]:
    """Runs ``config``'s single run in this process; the seed fixes data and initialization."""
    callback = None if on_epoch is None else (lambda results: on_epoch(results[config.norm]))
    return fit(config, on_epoch=callback)[config.norm]


def _fit(config: TrainConfig, norms: Sequence[str], device: torch.device, world: World,
         on_epoch: Optional[EpochCallback], save: Optional[PathLike],
         resume: Optional[PathLike], progress: str) -> dict[str, list[EpochResult]]:
    autocast = autocast_factory(device, config.dtype)
    torch.manual_seed(config.seed)
    data = make_data(config)
    runs = _build_runs(config, norms, device, world)
    start_epoch = _resume(resume, config, runs, device) if resume is not None else 0
    train_split = data.train.to(device)
    test_split = None if data.test is None else data.test.to(device)

    samples = len(train_split.y)
    local_batch = local_batch_size(config.batch_size, samples, world.size)
    if samples % world.size and world.is_main:
        warnings.warn(f"{samples} training samples do not split evenly over {world.size} "
                      "processes: DistributedSampler repeats some, so the losses differ "
                      "slightly from a single-process run")
    # A full batch needs no shuffling, which keeps the document's run bit for bit.
    sampler = DistributedSampler(range(samples), num_replicas=world.size, rank=world.rank,
                                 shuffle=local_batch is not None, seed=config.seed)
    steps_per_epoch = len(range(0, sampler.num_samples, local_batch or sampler.num_samples))
    bar = ProgressBar(max(0, config.epochs - start_epoch) * steps_per_epoch,
                      progress if world.is_main else "off")
    criterion = nn.CrossEntropyLoss()
    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            indices = torch.tensor(list(sampler), device=device)
            # Per run: sum of loss * batch size, correct predictions, samples (exact in fp64).
            totals = torch.zeros(len(runs), 3, dtype=torch.float64, device=device)
            for batch in indices.split(local_batch or len(indices)):
                x, y = train_split.x[batch], train_split.y[batch]
                for i, run in enumerate(runs):
                    totals[i] += _train_step(run, x, y, criterion, autocast)
                bar.update()
            sum_over_processes(totals, world)
            results = {}
            for run, (loss_sum, correct, count) in zip(runs, totals.tolist()):
                test_accuracy = None if test_split is None else _accuracy(run.module, test_split,
                                                                          autocast)
                results[run.norm] = EpochResult(epoch + 1, loss_sum / count, correct / count,
                                                test_accuracy)
                run.history.append(results[run.norm])
            if world.is_main:
                if on_epoch is not None:
                    with bar.printing():
                        on_epoch(results)
                if save is not None:
                    save_checkpoint(save, config, epoch + 1,
                                    {run.norm: run.state() for run in runs}, device)
    finally:
        bar.close()
    return {run.norm: run.history for run in runs}


def _build_runs(config: TrainConfig, norms: Sequence[str], device: torch.device,
                world: World) -> list[_Run]:
    modules = [MLP(config.input_size, config.hidden_size, config.output_size, NORMS[norms[0]])]
    for norm in norms[1:]:
        # Same initialization as the first model; building it must not advance the RNG.
        with torch.random.fork_rng(devices=[]):
            other = MLP(config.input_size, config.hidden_size, config.output_size, NORMS[norm])
        other.load_state_dict(modules[0].state_dict())
        modules.append(other)

    runs = []
    for norm, module in zip(norms, modules):
        module.to(device)
        model = module
        if world.distributed:
            model = DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = OPTIMIZER_CLASSES[config.optimizer](module.parameters(), lr=config.lr)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        scaler = torch.amp.GradScaler(device.type) if config.dtype == "float16" else None
        runs.append(_Run(norm, module, model, optimizer, scaler, []))
    return runs


def _resume(path: PathLike, config: TrainConfig, runs: list[_Run],
            device: torch.device) -> int:
    state = load_checkpoint(path)
    conflicts = resume_conflicts(checkpoint_config(state), config)
    if conflicts:
        raise ValueError(f"cannot resume {path} with different settings: {', '.join(conflicts)}")
    _load_runs(path, state, config, runs)
    restore_rng(state, device)
    return state["epoch"]


def check_resume(path: PathLike, state: dict, config: TrainConfig, norms: Sequence[str]) -> None:
    """Raises ValueError where ``state`` (read from ``path``) cannot resume ``config``'s runs
    of ``norms``: loads it into models and optimizers built on the CPU, as fit() would."""
    with torch.random.fork_rng(devices=[]):
        runs = _build_runs(config, norms, torch.device("cpu"), World())
    _load_runs(path, state, config, runs)


def _load_runs(path: PathLike, state: dict, config: TrainConfig, runs: list[_Run]) -> None:
    for run in runs:
        saved = run_state(state, run.norm, single_run=len(runs) == 1)
        if saved is None:
            raise ValueError(f"{path} has no saved {run.norm!r} run "
                             f"(it has: {', '.join(sorted(state['runs']))})")
        try:
            run.load(saved, config.lr)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            # A model or optimizer state that does not fit the settings saved beside it.
            raise ValueError(f"{path}: the saved {run.norm!r} run does not load: "
                             f"{error}") from error


def local_batch_size(batch_size: Optional[int], samples: int, processes: int) -> Optional[int]:
    """Each of ``processes``' share of the global batch over ``samples`` training samples;
    None for one full batch per epoch (also for a batch of all the samples or more).
    Raises ValueError for a smaller batch that does not split evenly."""
    if batch_size is None or batch_size >= samples:
        return None
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size % processes:
        raise ValueError(f"the batch size {batch_size} must be divisible by the number of "
                         f"processes ({processes})")
    return batch_size // processes


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module,
                autocast: Callable[[], ContextManager]) -> torch.Tensor:
    """One optimizer step; returns (loss * batch size, correct predictions, batch size)."""
    with autocast():
        outputs = run.model(x)
        loss = criterion(outputs, y)
    run.optimizer.zero_grad()
    if run.scaler is None:
        loss.backward()
        run.optimizer.step()
    else:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    correct = (outputs.detach().argmax(dim=1) == y).sum()
    count = torch.tensor(len(y), dtype=torch.float64, device=y.device)
    return torch.stack([loss.detach().double() * count, correct.double(), count])


@torch.no_grad()
def _accuracy(module: nn.Module, split: Split, autocast: Callable[[], ContextManager]) -> float:
    module.eval()
    try:
        with autocast():
            predicted = module(split.x).argmax(dim=1)
    finally:
        module.train()
    return (predicted == split.y).sum().item() / len(split.y)
