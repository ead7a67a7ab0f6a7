"""Each option of ``python -m layernorm_ext.train``, asserted on what it prints or writes."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from layernorm_ext.train import TrainConfig, main, parse_args, train
from layernorm_ext.training import fit, load_checkpoint
from layernorm_ext.training.data import make_data, train_samples
from test_train import DOCUMENT_FIRST_LINE, cli_error, epoch_lines, run_cli


def test_no_arguments_prints_the_documents_lines(capsys):
    lines = run_cli(capsys)
    assert len(lines) == 10
    assert lines[0] == DOCUMENT_FIRST_LINE
    assert [m.group(3) for m in epoch_lines(lines)] == [
        f"{r.loss:.4f}" for r in train(TrainConfig())]


def test_sizes_samples_and_epochs(capsys, tmp_path):
    path = tmp_path / "run.pt"
    lines = run_cli(capsys, "--epochs", "3", "--input-size", "7", "--hidden-size", "5",
                    "--output-size", "3", "--samples", "30", "--save", str(path))
    matches = epoch_lines(lines)
    assert [(m.group(1), m.group(2)) for m in matches] == [("1", "3"), ("2", "3"), ("3", "3")]
    for m in matches:  # accuracies are multiples of 1/30
        correct = float(m.group(4)) * 30 / 100
        assert abs(correct - round(correct)) < 0.01
    model = load_checkpoint(path)["runs"]["fused"]["model"]
    assert model["fc1.weight"].shape == (5, 7)
    assert model["norm1.weight"].shape == (5,)
    assert model["fc2.weight"].shape == (3, 5)


def test_batch_size_is_the_number_of_samples_per_step(capsys, tmp_path):
    path = tmp_path / "run.pt"
    common = ("--epochs", "2", "--samples", "40", "--optimizer", "adam")
    lines = run_cli(capsys, *common, "--batch-size", "8", "--save", str(path))
    # Adam counts its steps: 5 batches of 8 per epoch.
    assert load_checkpoint(path)["runs"]["fused"]["optimizer"]["state"][0]["step"] == 10
    full = run_cli(capsys, *common)
    assert run_cli(capsys, *common, "--batch-size", "40") == full
    assert run_cli(capsys, *common, "--batch-size", "1000") == full
    assert epoch_lines(lines)[1].group(3) != epoch_lines(full)[1].group(3)


def test_lr(capsys, tmp_path):
    path = tmp_path / "run.pt"
    lines = run_cli(capsys, "--lr", "0.5", "--epochs", "3", "--save", str(path))
    assert load_checkpoint(path)["runs"]["fused"]["optimizer"]["param_groups"][0]["lr"] == 0.5
    default = run_cli(capsys, "--epochs", "3")
    assert lines[0] == default[0]  # the first loss is measured before the first step
    assert lines[1:] != default[1:]
    drop = float(epoch_lines(lines)[0].group(3)) - float(epoch_lines(lines)[2].group(3))
    default_drop = float(epoch_lines(default)[0].group(3)) - float(epoch_lines(default)[2].group(3))
    assert drop > 10 * default_drop


def test_optimizer(capsys, tmp_path):
    path = tmp_path / "run.pt"
    lines = run_cli(capsys, "--optimizer", "adam", "--epochs", "3", "--save", str(path))
    state = load_checkpoint(path)["runs"]["fused"]["optimizer"]["state"][0]
    assert {"exp_avg", "exp_avg_sq"} <= set(state)
    assert lines[1:] != run_cli(capsys, "--epochs", "3")[1:]
    assert "invalid choice" in cli_error(capsys, "--optimizer", "lbfgs")


def test_seed(capsys):
    lines = run_cli(capsys, "--seed", "1")
    assert lines != run_cli(capsys)
    assert [m.group(3) for m in epoch_lines(lines)] == [
        f"{r.loss:.4f}" for r in train(TrainConfig(seed=1))]


def test_norm_torch_prints_the_same_run(capsys):
    assert run_cli(capsys, "--norm", "torch") == run_cli(capsys, "--norm", "fused")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_device_without_cuda(capsys):
    assert run_cli(capsys, "--device", "auto", "--epochs", "2") == run_cli(
        capsys, "--device", "cpu", "--epochs", "2")
    assert "torch.cuda.is_available() is False" in cli_error(capsys, "--device", "cuda")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_trains_under_autocast_with_float32_weights(capsys, tmp_path, dtype):
    path = tmp_path / "run.pt"
    lines = run_cli(capsys, "--dtype", dtype, "--epochs", "3", "--save", str(path))
    assert len(epoch_lines(lines)) == 3
    state = load_checkpoint(path)
    run = state["runs"]["fused"]
    assert all(t.dtype == torch.float32 for t in run["model"].values())
    assert (run["scaler"] is not None) == (dtype == "float16")  # loss scaling for float16
    reference = train(TrainConfig(epochs=3))
    for saved, exact in zip(run["history"], reference):
        # Lower-precision matmuls: close to the float32 run, but not the same numbers.
        assert saved["loss"] != exact.loss
        assert abs(saved["loss"] - exact.loss) < 1e-2


def test_compare_prints_both_runs_side_by_side(capsys):
    lines = run_cli(capsys, "--compare")
    assert len(lines) == 11
    documents = run_cli(capsys)
    for i, (line, document_line) in enumerate(zip(lines, documents), start=1):
        prefix, fused, torch_columns, difference = (
            line.split(", ", 1)[0], *line.split(", ", 1)[1].split(" | "))
        assert prefix == f"Epoch [{i}/10]"
        assert fused == "fused " + document_line.split(", ", 1)[1]
        assert torch_columns.startswith("torch Loss: ")
        assert float(difference.removeprefix("loss difference: ")) <= 1e-6
    assert lines[-1].startswith("Largest loss difference, fused vs torch: ")
    assert float(lines[-1].split(": ")[1].split(" ")[0]) <= 1e-6
    assert "drop --norm" in cli_error(capsys, "--compare", "--norm", "torch")


def test_progress_bar_goes_to_stderr_and_leaves_the_lines_alone(capsys):
    quiet = run_cli(capsys, "--epochs", "3", "--samples", "20", "--batch-size", "5")
    main(["--epochs", "3", "--samples", "20", "--batch-size", "5", "--progress", "on"])
    captured = capsys.readouterr()
    assert captured.out.splitlines() == quiet
    assert "12/12" in captured.err  # 3 epochs of 4 steps
    # auto: no bar when stderr is not a terminal (as here).
    main(["--epochs", "3", "--progress", "auto"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args, message", [
    (("--batch-size", "0"), "must be a positive integer"),
    (("--epochs", "-1"), "must be a non-negative integer"),
    (("--lr", "0"), "must be a positive finite number, got 0.0"),
    (("--dtype", "float64"), "invalid choice"),
    (("--save", "/nonexistent-folder/run.pt"), "the folder does not exist"),
    (("--plot", "/nonexistent-folder/run.png"), "the folder does not exist"),
    # found by a breaker helper: tracebacks, or a run trained to NaN with exit status 0
    (("--lr", "inf"), "must be a positive finite number"),
    (("--lr", "abc"), "must be a positive number, got 'abc'"),
    (("--epochs", "x"), "must be a non-negative integer, got 'x'"),
    (("--seed", str(2 ** 64)), "must be in [-2**63, 2**64 - 1]"),
    (("--output-size", "1"), "must be at least 2 (classes)"),
    (("--save", "run-folder/"), "a folder; give a file name"),
    (("--save", ""), "a folder; give a file name"),
    (("--save", "/proc/run.pt"), "cannot write /proc/run.pt.tmp"),
    (("--plot", "/proc/run.png"), "cannot write /proc/run.png"),
])
def test_bad_options_are_refused(capsys, args, message):
    assert message in cli_error(capsys, *args)


def test_plot_paths_are_judged_by_the_file_matplotlib_writes(capsys, tmp_path):
    """A name without a suffix is written as NAME.png: that file decides too (it was
    found to be a folder only after the training)."""
    (tmp_path / "out.png").mkdir()
    assert "(it writes " in cli_error(capsys, "--plot", str(tmp_path / "out"))


def test_fit_takes_numpy_numbers_and_a_torch_device():
    import numpy as np
    config = TrainConfig(hidden_size=np.int64(8), seed=np.int64(1), lr=np.float32(0.01),
                         epochs=1, device=torch.device("cpu"))
    assert len(fit(config)["fused"]) == 1


def test_missing_packages_are_refused_before_training(capsys, monkeypatch):
    """--dataset digits without scikit-learn, --progress on without tqdm: were tracebacks
    from inside the training."""
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn... raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert "needs scikit-learn" in cli_error(capsys, "--dataset", "digits")
    assert "needs tqdm" in cli_error(capsys, "--progress", "on")


@pytest.mark.parametrize("change, error", [
    (dict(lr=float("nan")), ValueError), (dict(lr=float("inf")), ValueError),
    (dict(lr="0.1"), TypeError), (dict(samples=0), ValueError), (dict(epochs=2.0), TypeError),
    (dict(batch_size=0), ValueError), (dict(hidden_size=0), ValueError),
    (dict(output_size=1), ValueError), (dict(norm="bogus"), ValueError),
    (dict(optimizer="rmsprop"), ValueError), (dict(seed=2 ** 64), ValueError),
])
def test_fit_refuses_a_config_no_run_can_use(change, error):
    """The library checked little: nan lr trained to NaN, samples=0 failed in range(),
    a bad norm name raised KeyError."""
    with pytest.raises(error, match=next(iter(change))):
        fit(dataclasses.replace(TrainConfig(), **change))


def test_ddp_outside_torchrun_says_how_to_start_it(capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert "torchrun --nproc_per_node=2" in cli_error(capsys, "--ddp")


def test_ddp_batch_size_must_split_over_the_processes_unless_it_is_the_full_batch(
        capsys, monkeypatch):
    torchrun = dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="localhost",
                    MASTER_PORT="29500")
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    assert "must be divisible by the number of processes (3)" in cli_error(
        capsys, "--ddp", "--samples", "40", "--batch-size", "10")
    # A batch of the whole data or more is one full batch (it was refused too).
    for batch in ("40", "50"):
        options = parse_args(["--ddp", "--samples", "40", "--batch-size", batch])
        assert options.config.batch_size == int(batch)
    # digits holds out a fifth of its samples: 80 of 100 train, so 80 is the full batch.
    pytest.importorskip("sklearn")
    assert parse_args(["--ddp", "--dataset", "digits", "--samples", "100",
                       "--batch-size", "80"]).config.batch_size == 80
    assert "must be divisible" in cli_error(capsys, "--ddp", "--dataset", "digits",
                                            "--samples", "100", "--batch-size", "79")


def test_train_samples_is_the_training_splits_size():
    for config in (TrainConfig(samples=40), TrainConfig(dataset="digits", input_size=64,
                                                        output_size=10, samples=100)):
        if config.dataset == "digits":
            pytest.importorskip("sklearn")
        torch.manual_seed(0)
        assert train_samples(config) == len(make_data(config).train.y)


def test_epochs_zero_prints_nothing(capsys):
    assert run_cli(capsys, "--epochs", "0") == []
