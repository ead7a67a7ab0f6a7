"""The LayerNorm sweep: cases, contenders, timing, roof, rows. ``run_sweep`` is the entry point.

LayerNorm is memory-bound, so each contender is judged by its effective bandwidth under the
byte model (forward 2*M*N*s, backward 3*M*N*s, forward+backward 5*M*N*s for s bytes per
element) against the bandwidth of a copy of the same byte count between preallocated
buffers, timed in the same rounds. ``bench/bench_layernorm.py`` is the command line; a GPU
check can call ``run_sweep(SweepConfig(device="cuda", ...))`` and
``bench.report.write_reports`` directly.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import layernorm_ext
from bench import machine
from bench.contenders import EXT, NORMS, LayerNormFn, reference, select_contenders
from bench.timing import Measurement, Runner, measure_interleaved

PASSES = ("fwd", "bwd", "fwdbwd")
# Bytes moved per element of x under the byte model, in units of the element size.
PASS_TRAFFIC = {"fwd": 2, "bwd": 3, "fwdbwd": 5}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWEEP_DIMS = (20, 128, 512, 768, 1024, 2048, 4096, 8192, 16384)
SEED_SHAPE = (100, 20)  # the original document's MLP: batch 100, hidden 20
QUICK_SHAPES = ((512, 768),)  # one shape: compiling dominates a quick run
ROOF = "copy (roof)"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_FALLBACK_CACHE_BYTES = 256 << 20
_GPU_MIN_TENSOR_BYTES = 256 << 20  # keeps launch overhead small next to the kernel time


@dataclass
class SweepConfig:
    """What to measure. ``shapes=None`` runs the default sweep (or the quick one)."""

    device: str = "cpu"
    norms: Sequence[str] = ("layer",)  # of NORMS: "layer" (LayerNorm), "rms" (RMSNorm)
    passes: Sequence[str] = PASSES
    dtypes: Sequence[str] = tuple(DTYPES)
    shapes: Optional[Sequence[tuple[int, int]]] = None
    quick: bool = False
    reps: int = 15
    warmup: int = 2
    min_sample_s: float = 2e-3
    progress: bool = True
    contenders: Optional[Sequence[str]] = None  # names (contenders.CONTENDER_KEYS); None: all


@dataclass(frozen=True)
class Row:
    """One contender on one (pass, dtype, shape) case."""

    pass_name: str
    dtype: str
    rows: int
    cols: int
    contender: str
    median_s: float
    iqr_s: float
    inner: int
    bytes_moved: int
    gbps: float
    roof_gbps: float
    ext_speedup: Optional[float]  # contender time / layernorm_ext time; None for the roof
    norm: str = "layer"  # "layer" or "rms"

    @property
    def pct_roof(self) -> float:
        return 100.0 * self.gbps / self.roof_gbps


@dataclass
class SweepResult:
    config: SweepConfig
    header: dict[str, str]
    contenders: list[str]
    skipped: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def sweep_tensor_bytes(device: str) -> tuple[int, str]:
    """Bytes of x in the default sweep, and the rule that chose them.

    CPU: x alone fills the last-level cache, so in+out is at least twice it. GPU: in+out is at
    least four times L2 (and x at least 256 MiB).
    """
    cache = machine.cache_bytes(device)
    if cache is None:
        return _FALLBACK_CACHE_BYTES, (f"cache size unknown: x = "
                                       f"{machine.format_bytes(_FALLBACK_CACHE_BYTES)}")
    if device == "cuda":
        size = max(2 * cache, _GPU_MIN_TENSOR_BYTES)
        return size, (f"in+out >= 4x L2 ({machine.format_bytes(cache)}): "
                      f"x = {machine.format_bytes(size)}")
    return cache, (f"in+out >= 2x last-level cache ({machine.format_bytes(cache)}): "
                   f"x = {machine.format_bytes(cache)}")


def sweep_shapes(config: SweepConfig, dtype: torch.dtype) -> list[tuple[int, int]]:
    """The (M, N) cases for one dtype: custom, quick, or the seed shape plus the D sweep."""
    if config.shapes:
        return list(config.shapes)
    if config.quick:
        return list(QUICK_SHAPES)
    target_bytes, _ = sweep_tensor_bytes(config.device)
    elements = target_bytes // dtype.itemsize
    return [SEED_SHAPE] + [(math.ceil(elements / dim), dim) for dim in SWEEP_DIMS]


def _pass_runners(pass_name: str, fns: dict[str, LayerNormFn], x: torch.Tensor,
                  weight: torch.Tensor, bias: Optional[torch.Tensor], grad_out: torch.Tensor
                  ) -> dict[str, Runner]:
    """Zero-argument callables that run one pass of each contender (bias None: RMSNorm)."""
    if pass_name == "fwd":
        return {name: (lambda fn=fn: fn(x, weight, bias)) for name, fn in fns.items()}
    leaves = tuple(t.detach().requires_grad_() for t in (x, weight, bias) if t is not None)
    args = leaves + (None,) * (3 - len(leaves))  # (x, weight, bias or None)
    if pass_name == "bwd":
        # The graph is built once; only the backward is timed.
        runners = {}
        for name, fn in fns.items():
            try:
                y = fn(*args)
            except Exception as error:  # reported by measure_interleaved, like any failure
                runners[name] = _raiser(error)
                continue
            runners[name] = lambda y=y: torch.autograd.grad(y, leaves, grad_out, retain_graph=True)
        return runners
    return {name: (lambda fn=fn: torch.autograd.grad(fn(*args), leaves, grad_out))
            for name, fn in fns.items()}


def _raiser(error: Exception) -> Runner:
    def run() -> None:
        raise error
    return run


def _roof_runner(pass_name: str, x: torch.Tensor) -> Runner:
    """A copy between two preallocated tensors that reads and writes the pass's byte count."""
    numel = PASS_TRAFFIC[pass_name] * x.numel() // 2
    src = torch.empty(numel, dtype=x.dtype, device=x.device).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _check_outputs(fns: dict[str, LayerNormFn], x: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], norm: str = "layer") -> list[str]:
    """Compare every contender's forward with torch eager on ~256 sampled rows."""
    rows = torch.linspace(0, x.shape[0] - 1, min(x.shape[0], 256), device=x.device).long()
    sample = x.index_select(0, rows)
    expected = reference(norm)(sample, weight, bias).float()
    tol = _TOLERANCE[x.dtype]
    problems = []
    for name, fn in fns.items():
        try:
            got = fn(sample, weight, bias).float()
        except Exception as error:
            problems.append(f"{name} failed: {type(error).__name__}: {error}")
            continue
        excess = ((got - expected).abs() - tol - tol * expected.abs()).max().item()
        if not excess <= 0:
            problems.append(f"{name} differs from torch eager beyond {tol:g} (rel+abs)")
    return problems


def _case_rows(pass_name: str, dtype_name: str, shape: tuple[int, int],
               measured: dict[str, Measurement], norm: str = "layer") -> list[Row]:
    rows, cols = shape
    element_size = DTYPES[dtype_name].itemsize
    bytes_moved = PASS_TRAFFIC[pass_name] * rows * cols * element_size
    roof_gbps = bytes_moved / measured[ROOF].median_s / 1e9
    ext = measured.get(EXT)
    result = []
    for name, m in measured.items():
        speedup = (m.median_s / ext.median_s) if ext is not None and name != ROOF else None
        result.append(Row(pass_name, dtype_name, rows, cols, name, m.median_s, m.iqr_s, m.inner,
                          bytes_moved, bytes_moved / m.median_s / 1e9, roof_gbps, speedup, norm))
    return result


def describe_run(config: SweepConfig) -> dict[str, str]:
    """The header of the report: machine, software, settings, date."""
    device = config.device
    cache = machine.cache_bytes(device)
    _, size_rule = sweep_tensor_bytes(device)
    hardware = machine.device_description(device)
    if device == "cpu":
        hardware += f", {os.cpu_count()} cores"
    if cache:
        hardware += f", {'L2' if device == 'cuda' else 'last-level cache'} {machine.format_bytes(cache)}"
    return {
        "machine": f"{machine.machine_name(device)} ({hardware})",
        "device": device,
        "torch": torch.__version__ + (f", CUDA {torch.version.cuda}" if device == "cuda" else ""),
        "layernorm_ext": f"{layernorm_ext.__version__}, git "
                         + machine.source_revision(Path(__file__).resolve().parent)
                         + (f", {layernorm_ext.cpu_kernels_isa()} CPU kernels, outputs from "
                            f"{machine.format_bytes(layernorm_ext.cpu_stream_threshold())} "
                            "streamed" if device == "cpu" else ""),
        "norms": ", ".join({"layer": "LayerNorm", "rms": "RMSNorm"}[n] for n in config.norms),
        "threads": str(torch.get_num_threads()),
        "allocator": machine.allocator_settings(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load average (before)": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "command": "python " + shlex.join(sys.argv),
        "method": (f"median of {config.reps} rounds after {max(config.warmup, 1)} warm-up "
                   f"rounds; each round times every contender once, in rotating order; a "
                   f"sample averages as many calls as fill {config.min_sample_s * 1e3:g} ms"
                   + ("; CUDA events, one untimed call ahead of each sample" if device == "cuda"
                      else "; wall clock")),
        "shapes": ("custom (--shapes)" if config.shapes else
                   "quick" if config.quick else f"{SEED_SHAPE[0]}x{SEED_SHAPE[1]} plus D sweep, "
                   + size_rule),
    }


def run_sweep(config: SweepConfig,
              after_case: Optional[Callable[[SweepResult], None]] = None) -> SweepResult:
    """Measure every contender on every (dtype, shape, pass) case of ``config``.

    ``after_case`` sees the partial result after each shape, so a long run that is stopped
    still leaves what it measured (the command line rewrites its Markdown and CSV there).
    """
    if config.device == "cuda" and not (torch.cuda.is_available()
                                        and layernorm_ext.has_cuda_kernels()):
        raise RuntimeError("--device cuda needs a CUDA GPU and a CUDA build of layernorm_ext")
    unknown = set(config.norms) - set(NORMS)
    if unknown or not config.norms:
        raise ValueError(f"norms must be a non-empty subset of {NORMS}, got {config.norms}")
    contenders, skipped = select_contenders(config.device, config.contenders)
    result = SweepResult(config, describe_run(config), [c.name for c in contenders], skipped)
    for c in contenders:
        missing = [n for n in config.norms if c.maker(n) is None]
        if missing:
            result.notes.append(f"{c.name}: not measured for {', '.join(missing)}")
    cases = [(norm, dtype_name, shape) for norm in config.norms for dtype_name in config.dtypes
             for shape in sweep_shapes(config, DTYPES[dtype_name])]
    progress = tqdm(total=len(cases) * len(config.passes), unit="case", disable=not config.progress,
                    dynamic_ncols=True)
    generator = torch.Generator(config.device)
    peak_load = os.getloadavg()[0]  # this run adds ~threads; much more means others were busy
    for norm, dtype_name, (rows, cols) in cases:
        peak_load = max(peak_load, os.getloadavg()[0])
        label = f"{'' if norm == 'layer' else 'rms '}{dtype_name} {rows}x{cols}"
        dtype = DTYPES[dtype_name]
        generator.manual_seed(0)
        make = dict(dtype=dtype, device=config.device)
        x = torch.randn(rows, cols, generator=generator, **make)
        weight = 1 + 0.1 * torch.randn(cols, generator=generator, **make)
        bias = 0.1 * torch.randn(cols, generator=generator, **make) if norm == "layer" else None
        grad_out = torch.randn(rows, cols, generator=generator, **make)
        # torch.compile: once per norm, shape and dtype.
        fns = {c.name: c.maker(norm)() for c in contenders if c.maker(norm) is not None}
        for problem in _check_outputs(fns, x, weight, bias, norm):
            result.notes.append(f"{label}: {problem}")
        for pass_name in config.passes:
            progress.set_postfix_str(f"{pass_name} {label}")
            runners = _pass_runners(pass_name, fns, x, weight, bias, grad_out)
            runners[ROOF] = _roof_runner(pass_name, x)
            measured, failures = measure_interleaved(
                runners, config.device, config.reps, config.warmup, config.min_sample_s)
            for name, error in failures.items():
                result.notes.append(f"{pass_name} {label}: {name} failed: {error}")
            if ROOF in measured:
                result.rows.extend(_case_rows(pass_name, dtype_name, (rows, cols), measured,
                                              norm))
            del runners, measured
            gc.collect()
            progress.update()
        del x, weight, bias, grad_out, fns
        gc.collect()
        _record_end(result, peak_load, finished=False)
        if after_case is not None:
            after_case(result)
    progress.close()
    _record_end(result, peak_load, finished=True)
    return result


def _record_end(result: SweepResult, peak_load: float, finished: bool) -> None:
    result.header["load average (after)"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    result.header["peak 1-min load during the run"] = f"{max(peak_load, os.getloadavg()[0]):.2f}"
    # ru_maxrss is in KiB on Linux.
    result.header["peak resident memory"] = machine.format_bytes(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result.header["status"] = "complete" if finished else (
        f"INCOMPLETE: {len(result.rows)} rows so far (still running, or stopped)")


