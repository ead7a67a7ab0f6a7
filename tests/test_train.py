"""The project's main job: the document's training run."""

from __future__ import annotations

import re
import subprocess
import sys

from layernorm_ext.train import TrainConfig, train

EPOCH_LINE = re.compile(r"^Epoch \[(\d+)/10\], Loss: (\d+\.\d{4}), Accuracy: (\d+\.\d{2})%$")


def test_cli_prints_the_documents_ten_epoch_lines():
    out = subprocess.run([sys.executable, "-m", "layernorm_ext.train"], capture_output=True,
                         text=True, check=True, timeout=300).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 10
    matches = [EPOCH_LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == list(range(1, 11))
    # The printed losses are those of the library function with the same default seed.
    expected = train(TrainConfig())
    assert [float(m.group(2)) for m in matches] == [round(r.loss, 4) for r in expected]


def test_fused_run_matches_torch_layernorm_run():
    fused = train(TrainConfig(norm="fused", seed=3))
    reference = train(TrainConfig(norm="torch", seed=3))
    assert len(fused) == len(reference) == 10
    for a, b in zip(fused, reference):
        assert abs(a.loss - b.loss) <= 1e-6
        assert a.accuracy == b.accuracy


def test_seed_makes_the_run_reproducible():
    assert train(TrainConfig(seed=5)) == train(TrainConfig(seed=5))
    assert train(TrainConfig(seed=5)) != train(TrainConfig(seed=6))


def test_help():
    out = subprocess.run([sys.executable, "-m", "layernorm_ext.train", "--help"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "--seed" in out and "--norm" in out
