"""The machine a benchmark runs on: its name, its caches, and the settings that move the numbers."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import torch

# glibc's defaults hand every large block back to the OS on free, so each fresh large tensor is
# faulted in page by page. Raising both thresholds keeps freed blocks in the heap. tcache must go
# too: posix_memalign (torch's CPU allocator) frees a small tail chunk into the tcache, where it
# is never coalesced and fences the big block off from the top of the heap, so the next
# same-sized request grows the heap again and faults anyway (measured here: every iteration of
# `torch.empty(128 MiB).fill_()` faulted until tcache_count=0). These are read at process start.
_NEVER = str(1 << 40)  # 1 TiB: larger than any tensor this benchmark makes
TUNED_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": _NEVER,
    "MALLOC_TRIM_THRESHOLD_": _NEVER,
    "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0",
}
_ALLOCATOR_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "PYTORCH_CUDA_ALLOC_CONF", "LD_PRELOAD")


def tuned_malloc_env(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with the tuned glibc allocator settings (an existing GLIBC_TUNABLES is extended)."""
    env = dict(environ)
    for key, value in TUNED_MALLOC_ENV.items():
        current = env.get(key, "")
        if key == "GLIBC_TUNABLES" and current:
            if value not in current.split(":"):
                env[key] = f"{current}:{value}"
        else:
            env[key] = value
    return env


def malloc_is_tuned(environ: dict[str, str]) -> bool:
    """Whether ``environ`` already carries every tuned allocator setting."""
    return tuned_malloc_env(environ) == dict(environ)


def allocator_settings() -> str:
    """The allocator settings this process runs under, as a one-line description."""
    settings = [f"{key}={value}" for key, value in sorted(os.environ.items())
                if key.startswith(_ALLOCATOR_ENV_PREFIXES)]
    return ", ".join(settings) if settings else "glibc defaults (no MALLOC_* or GLIBC_TUNABLES set)"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def last_level_cache_bytes(cpu_root: Path = Path("/sys/devices/system/cpu"),
                           cpus: Optional[Iterable[int]] = None) -> Optional[int]:
    """Size of the largest-level CPU cache as the OS reports it: one instance's size (sysfs)
    times the instances over the CPUs this process may run on (``cpus``, by default its
    affinity: data spread over the cores of an 8-CCD EPYC stays in eight L3s of 32 MiB),
    else sysconf's size. The CPU kernels stream their outputs from one instance's size,
    or 64 MiB if that is less, up (csrc/cpu/layernorm_cpu.cpp), so a sweep sized by this
    total is streamed too."""
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(
            os.cpu_count() or 1)
    folders = [cpu_root / f"cpu{cpu}" / "cache" for cpu in sorted(cpus)]
    folders = [folder for folder in folders if folder.is_dir()]  # offline CPUs have none
    best_level, best_index, best_size = 0, None, None
    for index in sorted(folders[0].glob("index*")) if folders else []:
        try:
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if level >= best_level:
            best_level, best_index, best_size = level, index.name, size
    if best_size:
        instances = set()  # each one named by the CPUs that share it
        for folder in folders:
            try:
                instances.add((folder / best_index / "shared_cpu_list").read_text().strip())
            except OSError:
                continue
        return best_size * max(len(instances), 1)
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if size > 0:
            return size
    return None


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", text)
    if not match:
        raise ValueError(f"cannot parse cache size {text!r}")
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]


def slugify(text: str) -> str:
    """``"Intel(R) Xeon(R) Gold 6430"`` -> ``"intel-xeon-gold-6430"``."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_description(device: str) -> str:
    """The CPU model or the GPU name."""
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def machine_name(device: str) -> str:
    """A file-name-safe machine name: ``cpu-<model>-<cores>c`` or the slugified GPU name."""
    if device == "cuda":
        return slugify(torch.cuda.get_device_name())
    return f"cpu-{slugify(cpu_model())}-{os.cpu_count()}c"


def cache_bytes(device: str) -> Optional[int]:
    """The cache a benchmark must leave: the CPU's last level, or the GPU's L2."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return last_level_cache_bytes()


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def source_revision(path: Path) -> str:
    """The git commit of the checkout at ``path`` ("+ changes" when dirty), or "unknown"."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
        return git("rev-parse", "--short", "HEAD") + dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown"
