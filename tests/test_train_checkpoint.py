"""--save / --resume: checkpoints that continue a run exactly, across LayerNorm classes."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

import layernorm_ext
from layernorm_ext.training import MLP, checkpoint_config, fit, load_checkpoint
from test_train import cli_error, run_cli

def without_total(line: str) -> str:
    """'Epoch [4/6], Loss: ...' -> 'Epoch [4], Loss: ...': a resumed run's total differs."""
    return re.sub(r"^Epoch \[(\d+)/\d+\]", r"Epoch [\1]", line)


RUN = ("--samples", "40", "--batch-size", "10", "--optimizer", "adam")  # shuffled mini-batches


def test_resumed_run_continues_exactly_where_it_stopped(capsys, tmp_path):
    straight = tmp_path / "straight.pt"
    checkpoint = tmp_path / "run.pt"
    full = run_cli(capsys, *RUN, "--epochs", "6", "--save", str(straight))
    first = run_cli(capsys, *RUN, "--epochs", "3", "--save", str(checkpoint))
    assert load_checkpoint(checkpoint)["epoch"] == 3
    # The settings come from the checkpoint; only --epochs changes.
    rest = run_cli(capsys, "--resume", str(checkpoint), "--epochs", "6", "--save",
                   str(checkpoint))
    assert rest[0] == f"Resumed from {checkpoint} at epoch 3"
    assert [without_total(line) for line in first[:3] + rest[1:4]] == [
        without_total(line) for line in full[:6]]
    resumed, expected = load_checkpoint(checkpoint), load_checkpoint(straight)
    assert resumed["epoch"] == 6
    assert resumed["runs"]["fused"]["history"] == expected["runs"]["fused"]["history"]
    for name, tensor in expected["runs"]["fused"]["model"].items():
        assert torch.equal(resumed["runs"]["fused"]["model"][name], tensor), name


def test_checkpoint_holds_model_optimizer_epoch_rng_and_settings(capsys, tmp_path):
    path = tmp_path / "run.pt"
    run_cli(capsys, *RUN, "--epochs", "2", "--save", str(path))
    state = load_checkpoint(path)
    assert state["epoch"] == 2
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())  # the run's final state
    assert state["config"]["batch_size"] == 10 and state["config"]["optimizer"] == "adam"
    run = state["runs"]["fused"]
    assert run["optimizer"]["state"][0]["step"] == 8  # 2 epochs of 4 steps
    assert [r["epoch"] for r in run["history"]] == [1, 2]


@pytest.mark.parametrize("saved_norm, other_class", [("fused", nn.LayerNorm),
                                                     ("torch", layernorm_ext.LayerNorm)])
def test_saved_model_loads_into_the_mlp_with_the_other_layernorm(capsys, tmp_path, saved_norm,
                                                                 other_class):
    path = tmp_path / "run.pt"
    run_cli(capsys, "--epochs", "2", "--norm", saved_norm, "--save", str(path))
    state_dict = load_checkpoint(path)["runs"][saved_norm]["model"]
    saved_class = layernorm_ext.LayerNorm if saved_norm == "fused" else nn.LayerNorm
    saved, other = MLP(10, 20, 2, saved_class), MLP(10, 20, 2, other_class)
    saved.load_state_dict(state_dict, strict=True)
    other.load_state_dict(state_dict, strict=True)
    x = torch.randn(8, 10)
    torch.testing.assert_close(other(x), saved(x), atol=1e-6, rtol=1e-6)


def test_resume_may_switch_the_layernorm_class(capsys, tmp_path):
    path = tmp_path / "run.pt"
    full = run_cli(capsys, *RUN, "--epochs", "4", "--save", str(tmp_path / "full.pt"))
    run_cli(capsys, *RUN, "--epochs", "2", "--save", str(path))
    rest = run_cli(capsys, "--resume", str(path), "--epochs", "4", "--norm", "torch",
                   "--save", str(path))
    assert rest[1:3] == full[2:4]
    switched = load_checkpoint(path)["runs"]["torch"]["history"]
    straight = load_checkpoint(tmp_path / "full.pt")["runs"]["fused"]["history"]
    for a, b in zip(switched, straight):
        assert abs(a["loss"] - b["loss"]) <= 1e-6


def test_resume_with_compare(capsys, tmp_path):
    path = tmp_path / "run.pt"
    full = run_cli(capsys, "--compare", "--epochs", "4")
    run_cli(capsys, "--compare", "--epochs", "2", "--save", str(path))
    assert set(load_checkpoint(path)["runs"]) == {"fused", "torch"}
    rest = run_cli(capsys, "--resume", str(path), "--compare", "--epochs", "4")
    assert rest[1:3] == full[2:4]
    # Without --compare (and --norm) the comparison continues too: unset options keep the
    # checkpoint's values. It trained the fused run alone, and its save dropped the other.
    run_cli(capsys, "--compare", "--epochs", "2", "--save", str(path))
    rest = run_cli(capsys, "--resume", str(path), "--epochs", "4", "--save", str(path))
    assert rest[1:3] == full[2:4]
    assert set(load_checkpoint(path)["runs"]) == {"fused", "torch"}
    # A one-run checkpoint has no torch run to compare with.
    run_cli(capsys, "--epochs", "2", "--save", str(path))
    assert "has no saved 'torch' run (it has: fused)" in cli_error(
        capsys, "--resume", str(path), "--compare", "--epochs", "4")


def test_resume_refuses_settings_the_checkpoint_depends_on(capsys, tmp_path):
    path = tmp_path / "run.pt"
    run_cli(capsys, "--epochs", "1", "--save", str(path))
    error = cli_error(capsys, "--resume", str(path), "--hidden-size", "8")
    assert "hidden_size=8 (checkpoint: 20)" in error
    assert "optimizer='adam'" in cli_error(capsys, "--resume", str(path), "--optimizer", "adam")


def test_resume_of_a_finished_run_trains_nothing(capsys, tmp_path):
    path = tmp_path / "run.pt"
    run_cli(capsys, "--epochs", "2", "--save", str(path))
    lines = run_cli(capsys, "--resume", str(path))
    assert lines == [f"Resumed from {path} at epoch 2",
                     "Nothing to train: the checkpoint is at epoch 2; ask for more with --epochs"]


def test_resume_of_something_else_is_refused(capsys, tmp_path):
    path = tmp_path / "not-a-checkpoint.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    assert "is not a layernorm_ext.train checkpoint" in cli_error(capsys, "--resume", str(path))
    assert "No such file" in cli_error(capsys, "--resume", str(tmp_path / "missing.pt"))
    # Files torch.load cannot read, or a dict of the format without the run's state: a
    # usage error too, not a traceback.
    (tmp_path / "text.pt").write_text("epoch 3\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"format": 1, "epoch": 2}, tmp_path / "partial.pt")
    for name in ("text.pt", "empty.pt", "partial.pt"):
        message = cli_error(capsys, "--resume", str(tmp_path / name))
        assert "is not a layernorm_ext.train checkpoint" in message, name


@pytest.mark.parametrize("damage, message", [
    (lambda s: s["runs"]["fused"].pop("model"), "the 'fused' run lacks model"),
    (lambda s: s["runs"].update(other={}), "runs has 'other'"),
    (lambda s: s["runs"].clear(), "runs is not a non-empty dict"),
    (lambda s: s.update(epoch=-1), "epoch is -1"),
    (lambda s: s.update(epoch=2.0), "epoch is 2.0"),
    (lambda s: s["rng"].pop("torch"), "rng is not"),
    (lambda s: s["runs"]["fused"]["history"][0].pop("loss"), "history is not a list"),
    # Layouts that load_checkpoint accepts and the models or optimizers do not:
    (lambda s: s["runs"]["fused"]["model"].pop("fc1.weight"), "Missing key(s)"),
    (lambda s: s["config"].update(hidden_size=7), "size mismatch for fc1.weight"),
    (lambda s: s["runs"]["fused"]["optimizer"]["param_groups"].clear(),
     "different number of parameter groups"),
])
def test_a_damaged_checkpoint_is_a_usage_error(capsys, tmp_path, damage, message):
    """Each raised a KeyError or RuntimeError traceback, some only after the data was made."""
    path = tmp_path / "run.pt"
    run_cli(capsys, "--epochs", "1", "--save", str(path))
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    error = cli_error(capsys, "--resume", str(path), "--epochs", "2")
    assert message in error
    # fit() raises the same as a ValueError.
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(dataclasses.replace(checkpoint_config(torch.load(path, weights_only=True)),
                                epochs=2), resume=path)


def test_optimizer_state_of_the_wrong_shape_is_a_usage_error(capsys, tmp_path):
    """Optimizer.load_state_dict takes it; the first step then raised a traceback."""
    path = tmp_path / "run.pt"
    run_cli(capsys, "--epochs", "1", "--optimizer", "adam", "--save", str(path))
    state = torch.load(path, weights_only=True)
    first = next(iter(state["runs"]["fused"]["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3)
    torch.save(state, path)
    assert "optimizer state 'exp_avg' of shape [3]" in cli_error(capsys, "--resume", str(path),
                                                                  "--epochs", "2")
