"""Interleaved timing: every contender is timed once per round, so machine drift hits all alike."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

Runner = Callable[[], object]


@dataclass(frozen=True)
class Measurement:
    """Per-call seconds, one sample per repetition round; a sample averages ``inner`` calls."""

    samples_s: tuple[float, ...]
    inner: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def iqr_s(self) -> float:
        """Interquartile range of the samples: how noisy the median is."""
        if len(self.samples_s) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples_s, n=4)
        return q3 - q1


class _CpuClock:
    """Wall-clock time; CPU ops are synchronous, so the calls have finished when they return."""

    def time(self, runner: Runner, inner: int) -> Callable[[], float]:
        start = time.perf_counter()
        for _ in range(inner):
            runner()
        elapsed = time.perf_counter() - start
        return lambda: elapsed

    def synchronize(self) -> None:
        pass


class _CudaClock:
    """CUDA events around the calls on the current stream; read after the round's synchronize.

    One untimed call leads each sample: after a synchronize the GPU is idle, so a start
    event recorded at once would also time the host's path to the first kernel. With the
    lead call's kernels queued first, the GPU is still busy when the timed calls come,
    unless the host is the bottleneck, which is then what the sample measures.
    """

    def time(self, runner: Runner, inner: int) -> Callable[[], float]:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        runner()
        start.record()
        for _ in range(inner):
            runner()
        end.record()
        return lambda: start.elapsed_time(end) / 1e3

    def synchronize(self) -> None:
        torch.cuda.synchronize()


def _clock(device: str) -> _CpuClock | _CudaClock:
    return _CudaClock() if device == "cuda" else _CpuClock()


def measure_interleaved(
    runners: dict[str, Runner],
    device: str,
    reps: int,
    warmup: int,
    min_sample_s: float,
    max_inner: int = 10_000,
) -> tuple[dict[str, Measurement], dict[str, str]]:
    """Time every runner ``reps`` times, one sample of each per round, in rotating order.

    ``warmup`` untimed rounds come first, at least one (they include any compilation, and
    find the runners that fail). Fast runners are called ``inner`` times per sample so one
    sample lasts about ``min_sample_s``; big shapes take one call per sample. A runner that
    raises, in any round, is dropped and its error returned instead of a measurement.
    """
    clock = _clock(device)
    failures: dict[str, str] = {}
    live = dict(runners)

    def failed(name: str, error: Exception) -> None:
        failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        del live[name]

    for _ in range(max(warmup, 1)):
        for name, runner in list(live.items()):
            try:
                runner()
            except Exception as error:  # a contender that cannot run this case is reported
                failed(name, error)
        clock.synchronize()

    inner = {}
    for name, runner in list(live.items()):
        try:
            one_call = clock.time(runner, 1)
        except Exception as error:
            failed(name, error)
            continue
        clock.synchronize()
        inner[name] = max(1, min(max_inner, math.ceil(min_sample_s / max(one_call(), 1e-9))))

    names = list(live)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(reps):
        shift = round_index % max(len(names), 1)
        order = [name for name in names[shift:] + names[:shift] if name in live]
        pending = []
        for name in order:
            try:
                pending.append((name, clock.time(live[name], inner[name])))
            except Exception as error:  # e.g. out of memory in a later round
                failed(name, error)
        clock.synchronize()
        for name, elapsed in pending:
            samples[name].append(elapsed() / inner[name])
    measurements = {name: Measurement(tuple(samples[name]), inner[name]) for name in live}
    return measurements, failures
