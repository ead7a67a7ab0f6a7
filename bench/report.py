"""Writes a sweep's results as Markdown (tables per norm, pass and dtype), CSV, and a PNG plot."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.sweep import EXT, ROOF, Row, SweepResult  # noqa: E402

CSV_FIELDS = ("device", "norm", "pass", "dtype", "M", "N", "contender", "median_us", "iqr_us",
              "inner", "bytes", "GBps", "roof_GBps", "pct_roof", "ext_speedup")
NORM_TITLES = {"layer": "", "rms": "RMSNorm "}  # LayerNorm sections keep their old titles


def write_reports(result: SweepResult, prefix: Path, plot: bool = True) -> list[Path]:
    """Write PREFIX.md, PREFIX.csv and (with ``plot``) PREFIX.png; return their paths."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_name(prefix.name + ext) for ext in (".md", ".csv", ".png")]
    paths[0].write_text(markdown(result))
    write_csv(result, paths[1])
    if not plot:
        return paths[:2]
    write_plot(result, paths[2])
    return paths


def _cases(rows: Iterable[Row]
           ) -> dict[tuple[str, str, str], dict[tuple[int, int], dict[str, Row]]]:
    """rows grouped as {(norm, pass, dtype): {(M, N): {contender: row}}}, in sweep order."""
    grouped: dict = defaultdict(dict)
    for row in rows:
        key = (row.norm, row.pass_name, row.dtype)
        grouped[key].setdefault((row.rows, row.cols), {})[row.contender] = row
    return grouped


def _us(seconds: float) -> str:
    micro = seconds * 1e6
    return f"{micro:,.0f}" if micro >= 100 else f"{micro:.3g}"


NOISY_IQR = 0.25  # a median whose samples' interquartile range exceeds this share of it


def _noisy(row: Row) -> bool:
    return row.iqr_s > NOISY_IQR * row.median_s


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown(result: SweepResult) -> str:
    others = [name for name in result.contenders if name != EXT]
    lines = [f"# {_title(result)} microbenchmark: {result.header['machine'].split(' ')[0]}", "",
             "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in result.header.items()]
    noisy = sum(_noisy(row) for row in result.rows)
    lines += ["", "Effective bandwidth by the byte model: fwd 2·M·N·s, bwd 3·M·N·s, fwd+bwd "
              "5·M·N·s bytes (s = bytes per element; the row statistics and the parameters "
              "are not counted); the roof is a copy between two preallocated buffers "
              "(`dst.copy_(src)`) of the same byte count, measured in the same rounds. "
              "`ext ×` is the speedup of layernorm_ext over that contender (time ratio; > 1: "
              "layernorm_ext is faster). bwd times the backward alone, on a graph built once. "
              f"A time (or roof) marked * is noisy: its samples' interquartile range is over "
              f"{NOISY_IQR:.0%} of the median ({noisy} of {len(result.rows)} measurements).",
              ""]
    if result.skipped:
        lines.append("Skipped contenders: " + "; ".join(
            f"{name}: {reason}" for name, reason in result.skipped.items()) + ".")
        lines.append("")
    if result.notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in result.notes] + [""]

    for (norm, pass_name, dtype), shapes in _cases(result.rows).items():
        lines += [f"## {NORM_TITLES[norm]}{pass_name}, {dtype}", ""]
        head = ["M×N", "roof GB/s", f"{EXT} µs", "GB/s", "% roof"]
        for name in others:
            head += [f"{name} µs", "GB/s", "% roof", "ext ×"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for (rows, cols), by_name in shapes.items():
            roof = next(iter(by_name.values())).roof_gbps
            roof_noisy = ROOF in by_name and _noisy(by_name[ROOF])
            cells = [f"{rows}×{cols}", f"{roof:.1f}" + ("*" if roof_noisy else "")]
            for name in [EXT] + others:
                row = by_name.get(name)
                if row is None:
                    cells += ["n/a"] * (3 if name == EXT else 4)
                    continue
                cells += [_us(row.median_s) + ("*" if _noisy(row) else ""), f"{row.gbps:.1f}",
                          f"{row.pct_roof:.0f}"]
                if name != EXT:
                    cells.append(f"{row.ext_speedup:.2f}" if row.ext_speedup else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["## Summary", "",
              "Geometric mean over the shapes of each case of the speedup of layernorm_ext "
              "(> 1: layernorm_ext is faster), and of layernorm_ext's % of the roof.", ""]
    head = ["norm", "pass", "dtype"] + [f"vs {name}" for name in others] + [f"{EXT} % roof"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (norm, pass_name, dtype), shapes in _cases(result.rows).items():
        cells = [{"layer": "LayerNorm", "rms": "RMSNorm"}[norm], pass_name, dtype]
        for name in others + [EXT]:
            if name == EXT:
                values = [s[EXT].pct_roof for s in shapes.values() if EXT in s]
            else:
                values = [s[name].ext_speedup for s in shapes.values()
                          if name in s and s[name].ext_speedup]
            cells.append(f"{_geomean(values):.2f}" if values else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(result: SweepResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for row in result.rows:
            writer.writerow([
                result.config.device, row.norm, row.pass_name, row.dtype, row.rows, row.cols, row.contender,
                f"{row.median_s * 1e6:.3f}", f"{row.iqr_s * 1e6:.3f}", row.inner, row.bytes_moved,
                f"{row.gbps:.3f}", f"{row.roof_gbps:.3f}", f"{row.pct_roof:.2f}",
                "" if row.ext_speedup is None else f"{row.ext_speedup:.4f}"])


def _short(count: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)


def _title(result: SweepResult) -> str:
    norms = dict.fromkeys(row.norm for row in result.rows) or {"layer": None}
    return " and ".join({"layer": "LayerNorm", "rms": "RMSNorm"}[n] for n in norms)


def write_plot(result: SweepResult, path: Path) -> None:
    """Bandwidth against the shape per contender, one panel per (norm, pass) and dtype, roof
    dashed."""
    passes = list(dict.fromkeys((row.norm, row.pass_name) for row in result.rows)) or [
        ("layer", "(none)")]
    dtypes = list(dict.fromkeys(row.dtype for row in result.rows)) or ["(none)"]
    grouped = _cases(result.rows)
    names = result.contenders + [ROOF]
    height = 3.4 * len(passes) + 0.6
    fig, axes = plt.subplots(len(passes), len(dtypes), squeeze=False, sharey="row",
                             figsize=(4.8 * len(dtypes) + 1, height))
    for i, (norm, pass_name) in enumerate(passes):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            shapes = grouped.get((norm, pass_name, dtype), {})
            positions = range(len(shapes))
            for name in names:
                values = [by_name[name].gbps if name in by_name else float("nan")
                          for by_name in shapes.values()]
                style = dict(color="black", linestyle="--") if name == ROOF else {}
                ax.plot(positions, values, marker="o", markersize=3, label=name, **style)
            ax.set_xticks(list(positions))
            ax.set_xticklabels([f"{cols}\n{_short(rows)}" for rows, cols in shapes], fontsize=7)
            ax.set_title(f"{NORM_TITLES[norm]}{pass_name}, {dtype}", fontsize=10)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("effective GB/s")
            if i == len(passes) - 1:
                ax.set_xlabel("D (normalized size)\nM (rows)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), frameon=False)
    fig.suptitle(f"{_title(result)} effective bandwidth: {result.header['machine']}", fontsize=10)
    # Room for the legend below and the title above, in inches whatever the row count
    # (a top of 1 let the title run into the first row's titles).
    fig.tight_layout(rect=(0, 0.5 / height, 1, 1 - 0.2 / height))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
