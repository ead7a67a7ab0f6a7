"""Checkpoints: models, optimizers, grad scalers, history, epoch, RNG state and settings.

A checkpoint is a dict saved with ``torch.save`` and read back with ``weights_only=True``::

    {"format": 1, "epoch": <completed epochs>, "config": <TrainConfig as a dict>,
     "rng": {"torch": <CPU RNG state>, "cuda": <RNG state of the current GPU> or None},
     "runs": {"fused": {"model": <state_dict>, "optimizer": ..., "scaler": ... or None,
                        "history": [<EpochResult as a dict>, ...]},
              "torch": {...}}}          # "torch" too after a --compare run

``runs[...]["model"]`` is the MLP's state_dict; the fused and the torch LayerNorm share its
layout, so either loads into an MLP built with either class.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Union

import torch

from .config import NORM_NAMES, EpochResult, TrainConfig, config_from_dict

FORMAT = 1
PathLike = Union[str, "os.PathLike[str]"]


def save_checkpoint(path: PathLike, config: TrainConfig, epoch: int,
                    runs: dict[str, dict[str, Any]], device: torch.device) -> None:
    """Writes the checkpoint atomically: an interrupted save leaves the old file intact."""
    state = {
        "format": FORMAT,
        "epoch": epoch,
        "config": dataclasses.asdict(config),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        "runs": runs,
    }
    temporary = f"{os.fspath(path)}.tmp"
    torch.save(state, temporary)
    os.replace(temporary, path)


_KEYS = ("epoch", "config", "rng", "runs")
_EPOCH_FIELDS = {field.name for field in dataclasses.fields(EpochResult)}
_EPOCH_REQUIRED = {field.name for field in dataclasses.fields(EpochResult)
                   if field.default is dataclasses.MISSING}


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Reads a checkpoint onto the CPU (``load_state_dict`` moves tensors where they belong).

    Raises ValueError for anything but a checkpoint of this format, OSError when the file
    cannot be read."""
    not_ours = ValueError(f"{os.fspath(path)} is not a layernorm_ext.train checkpoint "
                          f"(format {FORMAT})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # unpickling fails in many ways on a file of another kind
        raise not_ours from error
    if (not isinstance(state, dict) or state.get("format") != FORMAT
            or not all(key in state for key in _KEYS)):
        raise not_ours
    damage = _layout_error(state)
    if damage is not None:
        raise ValueError(f"{os.fspath(path)} is a damaged layernorm_ext.train checkpoint: "
                         f"{damage}")
    return state


_RUN_KEYS = ("model", "optimizer", "scaler", "history")


def _layout_error(state: dict[str, Any]) -> Optional[str]:
    """What in a checkpoint's layout is not as save_checkpoint writes it, or None.

    Values are left to the code that uses them (a model's shapes to load_state_dict, the
    settings to check_config); this catches what would otherwise surface as a KeyError."""
    epoch, rng, runs = state["epoch"], state["rng"], state["runs"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return f"epoch is {epoch!r}, not a count of epochs"
    if not isinstance(state["config"], dict):
        return "config is not a dict"
    if (not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor)
            or not isinstance(rng.get("cuda"), (torch.Tensor, type(None)))):
        return "rng is not {'torch': tensor, 'cuda': tensor or None}"
    if not isinstance(runs, dict) or not runs:
        return "runs is not a non-empty dict"
    for norm, run in runs.items():
        if norm not in NORM_NAMES:
            return f"runs has {norm!r}, which is none of {', '.join(NORM_NAMES)}"
        missing = [key for key in _RUN_KEYS if not isinstance(run, dict) or key not in run]
        if missing:
            return f"the {norm!r} run lacks {', '.join(missing)}"
        if not (isinstance(run["history"], list)
                and all(isinstance(entry, dict) and _EPOCH_REQUIRED <= set(entry) <= _EPOCH_FIELDS
                        for entry in run["history"])):
            return f"the {norm!r} run's history is not a list of epoch results"
    return None


def checkpoint_config(state: dict[str, Any]) -> TrainConfig:
    return config_from_dict(state["config"])


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)


def run_state(state: dict[str, Any], norm: str, single_run: bool) -> Optional[dict[str, Any]]:
    """The saved run to resume ``norm`` from.

    A single run may switch LayerNorm class on resume (fused <-> torch): the state_dicts
    are interchangeable, so a one-run checkpoint resumes under either norm.
    """
    runs = state["runs"]
    if norm in runs:
        return runs[norm]
    if single_run and len(runs) == 1:
        return next(iter(runs.values()))
    return None
