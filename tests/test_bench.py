"""The microbenchmark's smoke run: it writes its three files with every contender, pass and
dtype and sensible numbers. No timing is asserted; speed is the benchmark's business."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "bench_layernorm.py"
CONTENDERS = {"layernorm_ext", "torch eager", "torch.compile", "copy (roof)"}
PASSES = {"fwd", "bwd", "fwdbwd"}
DTYPES = {"float32", "bfloat16", "float16"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("bench") / "quick"
    # A private compile cache so a stale one from another checkout cannot hide a failure.
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(prefix.parent / "inductor"))
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(prefix)],
                   check=True, timeout=300, env=env, cwd=REPO)
    return prefix


def test_quick_run_writes_markdown_csv_and_png(quick_run: Path):
    for ext in (".md", ".csv", ".png"):
        path = quick_run.with_name(quick_run.name + ext)
        assert path.is_file() and path.stat().st_size > 0, path
    assert quick_run.with_name("quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_has_every_case_with_finite_positive_numbers(quick_run: Path):
    with quick_run.with_name("quick.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    cases = {(r["pass"], r["dtype"], r["contender"]) for r in rows}
    assert cases == {(p, d, c) for p in PASSES for d in DTYPES for c in CONTENDERS}
    for row in rows:
        for column in ("median_us", "GBps", "roof_GBps", "pct_roof"):
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (column, row)
        assert int(row["bytes"]) == {"fwd": 2, "bwd": 3, "fwdbwd": 5}[row["pass"]] * int(
            row["M"]) * int(row["N"]) * (4 if row["dtype"] == "float32" else 2)
        if row["contender"] == "copy (roof)":
            assert row["ext_speedup"] == ""
        else:
            speedup = float(row["ext_speedup"])
            assert math.isfinite(speedup) and speedup > 0, row
        if row["contender"] == "layernorm_ext":
            assert float(row["ext_speedup"]) == 1.0


def test_markdown_names_machine_settings_contenders_and_summary(quick_run: Path):
    text = quick_run.with_name("quick.md").read_text()
    for setting in ("| machine |", "| torch |", "| threads |", "| allocator |", "| date |"):
        assert setting in text
    assert "| status | complete |" in text
    import layernorm_ext
    from bench.machine import format_bytes
    threshold = format_bytes(layernorm_ext.cpu_stream_threshold())
    assert (f", {layernorm_ext.cpu_kernels_isa()} CPU kernels, outputs from {threshold} "
            "streamed |") in text  # which were timed, how
    for pass_name in PASSES:
        for dtype in DTYPES:
            assert f"## {pass_name}, {dtype}" in text
            assert f"| {pass_name} | {dtype} |" in text.split("## Summary")[1]
    for name in ("layernorm_ext µs", "torch eager µs", "torch.compile µs", "roof GB/s"):
        assert name in text
    assert "Liger-Kernel: CUDA only" in text and "apex: CUDA only" in text
    assert "n/a" not in text and not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert "differs from torch eager" not in text and "failed" not in text


def test_malloc_tuned_reruns_under_the_tuned_settings_and_reports_them(tmp_path: Path):
    prefix = tmp_path / "tuned"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    # Ours alone: the re-run under the tuned allocator is the point, not torch.compile's
    # half a minute of compiling.
    subprocess.run([sys.executable, str(SCRIPT), "--malloc-tuned", "--shapes", "8x16", "--passes",
                    "fwd", "--dtypes", "float32", "--contenders", "ext", "--reps", "1",
                    "--no-progress", "--out", str(prefix)], check=True, timeout=300, env=env,
                   cwd=REPO)
    header = prefix.with_name("tuned.md").read_text().split("\n\n")[1]
    allocator = next(line for line in header.splitlines() if line.startswith("| allocator |"))
    for setting in ("MALLOC_MMAP_THRESHOLD_=1099511627776", "MALLOC_TRIM_THRESHOLD_=1099511627776",
                    "GLIBC_TUNABLES=glibc.malloc.tcache_count=0"):
        assert setting in allocator


def test_help_lists_the_interface():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    for option in ("--device", "--norms", "--passes", "--dtypes", "--shapes", "--quick",
                   "--out", "--malloc-tuned"):
        assert option in out


def test_a_contender_that_fails_is_reported_and_the_sweep_goes_on(monkeypatch, tmp_path: Path):
    monkeypatch.syspath_prepend(str(REPO))
    from bench import contenders, sweep
    from bench.report import write_reports

    def broken() -> contenders.LayerNormFn:
        def layer_norm(x, weight, bias):
            raise RuntimeError("no kernel for this case")
        return layer_norm

    picked = [contenders.Contender(contenders.EXT, contenders._make_ext),
              contenders.Contender(contenders.EAGER, contenders._make_eager),
              contenders.Contender("broken", broken)]
    monkeypatch.setattr(sweep, "select_contenders", lambda device, wanted: (picked, {}))
    result = sweep.run_sweep(sweep.SweepConfig(shapes=[(8, 16)], dtypes=["float32"], reps=2,
                                               warmup=1, progress=False))
    assert {row.contender for row in result.rows} == {"layernorm_ext", "torch eager", "copy (roof)"}
    assert {row.pass_name for row in result.rows} == PASSES
    failures = [note for note in result.notes if "broken failed: RuntimeError: no kernel" in note]
    assert len(failures) == 4  # the forward check, then each of the three passes
    md, _, _ = write_reports(result, tmp_path / "broken")
    assert "| broken µs |" in md.read_text() and "n/a" in md.read_text()


def test_contenders_option_limits_the_sweep(monkeypatch):
    """--contenders ext times layernorm_ext and the roof alone (as scripts/gpu_ab.py runs
    it); its output is still checked against torch eager."""
    monkeypatch.syspath_prepend(str(REPO))
    import torch

    from bench import contenders, sweep
    from bench.bench_layernorm import build_parser

    assert build_parser().parse_args(["--contenders", "ext,compile"]).contenders == [
        "ext", "compile"]
    configs = [sweep.SweepConfig(norms=[norm], passes=["fwd"], shapes=[(8, 16)],
                                 dtypes=["float32"], reps=1, warmup=0, progress=False,
                                 contenders=[contenders.EXT]) for norm in ("layer", "rms")]
    for config in configs:
        result = sweep.run_sweep(config)
        assert result.contenders == [contenders.EXT]
        assert {row.contender for row in result.rows} == {contenders.EXT, sweep.ROOF}
        assert result.notes == []
    monkeypatch.setattr(sweep, "reference",
                        lambda norm: lambda x, weight, bias: torch.zeros_like(x))
    for config in configs:
        assert any("differs from torch eager" in note for note in sweep.run_sweep(config).notes)


def test_rms_rows_with_norms_option(tmp_path: Path):
    """--norms layer,rms adds RMSNorm rows (layernorm_ext.rms_norm vs F.rms_norm eager and
    compiled) next to the LayerNorm ones, in every output."""
    prefix = tmp_path / "rms"
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    subprocess.run([sys.executable, str(SCRIPT), "--norms", "layer,rms", "--shapes", "64x256",
                    "--passes", "fwd,bwd", "--dtypes", "bfloat16", "--reps", "1", "--warmup",
                    "0", "--no-progress", "--out", str(prefix)], check=True, timeout=300,
                   env=env, cwd=REPO)
    with prefix.with_name("rms.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    cases = {(r["norm"], r["pass"], r["contender"]) for r in rows}
    assert cases == {(n, p, c) for n in ("layer", "rms") for p in ("fwd", "bwd")
                     for c in CONTENDERS}
    for row in rows:  # (GBps has 3 decimals: a tiny case under load may print 0.000)
        assert math.isfinite(float(row["median_us"])) and float(row["median_us"]) > 0, row
        assert int(row["bytes"]) == {"fwd": 2, "bwd": 3}[row["pass"]] * 64 * 256 * 2, row
    text = prefix.with_name("rms.md").read_text()
    assert "# LayerNorm and RMSNorm microbenchmark" in text
    for pass_name in ("fwd", "bwd"):
        assert f"## {pass_name}, bfloat16" in text and f"## RMSNorm {pass_name}, bfloat16" in text
        assert f"| RMSNorm | {pass_name} | bfloat16 |" in text.split("## Summary")[1]
    assert "differs from torch eager" not in text and "failed" not in text


def test_host_overhead_reports_every_call_and_where_ours_spends_its_time(tmp_path: Path):
    """bench/host_overhead.py on the CPU: every call timed (finite, positive; the device
    never returns before the host), and the profile of ours names our op."""
    out = tmp_path / "host.md"
    subprocess.run([sys.executable, str(REPO / "bench" / "host_overhead.py"), "--device", "cpu",
                    "--calls", "50", "--rounds", "2", "--profile-calls", "20", "--out", str(out)],
                   check=True, timeout=300, cwd=REPO, capture_output=True)
    text = out.read_text()
    for call in ("torch eager", "layernorm_ext", "layernorm_ext._C.forward_output",
                 "torch.ops.layernorm_ext.forward", "torch.empty_like (floor)",
                 "copy_ (the roof's call)"):
        row = re.search(rf"^\| {re.escape(call)} \| ([0-9.]+) \| ([0-9.]+) \|$", text, re.MULTILINE)
        assert row, f"no row for {call}:\n{text}"
        host, wall = float(row[1]), float(row[2])
        assert 0 < host <= wall < 1e6, (call, host, wall)
    ours = text.split("## layernorm_ext: profiler")[1].split("## ")[0]
    assert "`layernorm_ext::forward`" in ours, ours


def test_a_runner_that_fails_in_a_timed_round_is_dropped_and_reported(monkeypatch):
    """Out of memory (say) after the warm-up, in the calibration or a timed round: the
    others are still timed."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench.timing import measure_interleaved

    calls = {"flaky": 0, "fails": 0}

    def flaky() -> None:  # called for the warm-up, the calibration, then the samples
        calls["flaky"] += 1
        if calls["flaky"] == calls["fails"]:
            raise MemoryError("out of memory")

    for failing_call in (2, 3):  # the calibration's call, the first timed sample's
        calls["flaky"], calls["fails"] = 0, failing_call
        measured, failures = measure_interleaved({"steady": lambda: None, "flaky": flaky},
                                                 "cpu", reps=3, warmup=1, min_sample_s=0,
                                                 max_inner=1)
        assert set(measured) == {"steady"} and len(measured["steady"].samples_s) == 3
        assert failures == {"flaky": "MemoryError: out of memory"}


def test_noisy_measurements_are_marked_in_the_markdown(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import dataclasses

    from bench import sweep
    from bench.report import markdown

    result = sweep.run_sweep(sweep.SweepConfig(passes=["fwd"], shapes=[(8, 16)],
                                               dtypes=["float32"], reps=1, progress=False,
                                               contenders=[sweep.EXT]))
    quiet = markdown(result)
    assert "(0 of 2 measurements)" in quiet and "*" not in quiet.split("## fwd")[1]
    result.rows = [dataclasses.replace(row, iqr_s=row.median_s) for row in result.rows]
    noisy = markdown(result).split("## fwd")[1]
    assert "(2 of 2 measurements)" in markdown(result)
    ext_cell, roof_cell = noisy.split("\n")[4].split(" | ")[2], noisy.split("\n")[4].split(" | ")[1]
    assert ext_cell.endswith("*") and roof_cell.endswith("*")


def test_cuda_samples_start_after_an_untimed_lead_call(monkeypatch):
    """The start event is queued behind one call's kernels, so a sample does not time the
    host's path to its first kernel on an idle GPU (recorded order, with fake events)."""
    monkeypatch.syspath_prepend(str(REPO))
    import torch

    from bench import timing

    log, names = [], iter(["start", "end"])

    class FakeEvent:
        def __init__(self, enable_timing: bool):
            self.name = next(names)  # created in this order

        def record(self) -> None:
            log.append(self.name)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timing._CudaClock().time(lambda: log.append("call"), inner=2)
    assert log == ["call", "start", "call", "call", "end"]


def test_contenders_that_cannot_run_here_are_refused(capsys, monkeypatch):
    """--contenders liger on the CPU wrote a table of the copy roof alone."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench.bench_layernorm import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--contenders", "liger,apex", "--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2
    assert ("--contenders liger,apex: none can run on cpu (Liger-Kernel: CUDA only; "
            "apex: CUDA only)") in capsys.readouterr().err


def test_last_level_cache_counts_the_instances_this_process_runs_on(tmp_path: Path):
    """The benchmark's shapes must leave all of the last level the process can fill: four
    CPUs under two L3s of 32 MiB hold 64 MiB (one instance's size undercounted a multi-CCD
    EPYC eightfold), two CPUs of one L3 32 MiB, as CPUs 2 and 3 alone (a container pinned
    to them: sysfs lists every CPU of the host); an offline CPU is passed over."""
    from bench.machine import last_level_cache_bytes

    def cache(cpu: int, index: int, level: int, size: str, shared: str) -> None:
        folder = tmp_path / f"cpu{cpu}" / "cache" / f"index{index}"
        folder.mkdir(parents=True)
        for name, text in (("level", level), ("size", size), ("shared_cpu_list", shared)):
            (folder / name).write_text(f"{text}\n")

    for cpu in range(4):
        cache(cpu, 0, 1, "48K", str(cpu))
        cache(cpu, 3, 3, "32768K", "0-1" if cpu < 2 else "2-3")
    (tmp_path / "cpu4").mkdir()  # offline: no cache folder
    assert last_level_cache_bytes(tmp_path, cpus=range(5)) == 64 << 20
    assert last_level_cache_bytes(tmp_path, cpus={0, 1}) == 32 << 20
    assert last_level_cache_bytes(tmp_path, cpus={2, 3, 4}) == 32 << 20
