"""--dataset digits: a real task with a held-out split, and --plot."""

from __future__ import annotations

import re

import pytest

from layernorm_ext.training import EpochResult, fit, defaults_for, plot_history
from test_train import cli_error, epoch_lines, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_digits_reaches_over_90_percent_on_the_held_out_split(capsys):
    lines = run_cli(capsys, "--dataset", "digits")
    matches = epoch_lines(lines)
    assert len(matches) == 20  # the digits defaults
    assert all(m.group(5) is not None for m in matches)  # every epoch reports test accuracy
    final = re.fullmatch(r"Test accuracy: (\d+\.\d\d)% on the held-out split", lines[-1])
    assert final and float(final.group(1)) == float(matches[-1].group(5))
    assert float(final.group(1)) > 90.0


def test_digits_data_set_shape_is_fixed(capsys):
    assert "needs input_size=64 and output_size=10" in cli_error(
        capsys, "--dataset", "digits", "--input-size", "10")
    assert "samples must be in [2, 1797]" in cli_error(
        capsys, "--dataset", "digits", "--samples", "5000")


def test_plot_writes_a_png(capsys, tmp_path):
    path = tmp_path / "curves.png"
    lines = run_cli(capsys, "--epochs", "3", "--plot", str(path))
    assert lines[-1] == f"Saved plot to {path}"
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_path_is_checked_before_training_and_reported_as_written(capsys, tmp_path):
    """matplotlib adds .png to a name without a suffix: the line says so; a suffix it
    cannot write, or a folder, is refused before any epoch runs."""
    lines = run_cli(capsys, "--epochs", "1", "--plot", str(tmp_path / "curves"))
    assert lines[-1] == f"Saved plot to {tmp_path / 'curves.png'}"
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "cannot write .xyz files" in cli_error(capsys, "--plot", str(tmp_path / "run.xyz"))
    assert "a folder" in cli_error(capsys, "--plot", str(tmp_path))
    assert "a folder" in cli_error(capsys, "--save", str(tmp_path))


def test_plot_draws_each_runs_curves(tmp_path):
    config = defaults_for("digits")
    config.epochs, config.samples = 2, 300
    histories = fit(config, compare=True)
    figure = plot_history(histories, tmp_path / "compare.png")
    loss_axes, accuracy_axes = figure.axes
    labels = [line.get_label() for line in loss_axes.get_lines()]
    assert labels == ["fused LayerNorm", "torch LayerNorm"]
    for line, norm in zip(loss_axes.get_lines(), ("fused", "torch")):
        assert list(line.get_ydata()) == [r.loss for r in histories[norm]]
    assert [line.get_label() for line in accuracy_axes.get_lines()] == [
        "fused train", "fused test", "torch train", "torch test"]
    assert list(accuracy_axes.get_lines()[1].get_ydata()) == [
        100 * r.test_accuracy for r in histories["fused"]]
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_of_a_run_without_test_split_has_no_test_curve(tmp_path):
    history = [EpochResult(1, 0.7, 0.5), EpochResult(2, 0.6, 0.55)]
    figure = plot_history({"fused": history}, tmp_path / "one.png")
    assert [line.get_label() for line in figure.axes[1].get_lines()] == ["fused train"]
    assert list(figure.axes[1].get_lines()[0].get_ydata()) == pytest.approx([50.0, 55.0])
