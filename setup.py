"""Build of layernorm_ext: a CUDAExtension when a CUDA toolkit and a CUDA build of torch
are present, else a CppExtension.

Environment:
  LAYERNORM_EXT_CPU_ONLY=1   build the CPU kernels only, even where CUDA is available.
  CUDA_HOME                  the CUDA toolkit root; found from `nvcc` when unset.
  TORCH_CUDA_ARCH_LIST       GPU architectures; default "8.0;9.0" plus the visible GPUs'.
  MAX_JOBS                   parallel compile jobs (ninja).

Install with `pip install --no-build-isolation .`: the extension must be compiled
against the torch that is already installed (an isolated build would download another).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def find_cuda_home() -> str | None:
    """CUDA_HOME from the environment, else the toolkit root that nvcc itself reports.

    torch's own guess (the parent of the nvcc on PATH) is wrong when nvcc is a wrapper
    script; `nvcc -dryrun` prints the real root as TOP.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return str(Path(match.group(1).strip()).resolve()) if match else None


def want_cuda(cuda_home: str | None) -> bool:
    import torch

    if os.environ.get("LAYERNORM_EXT_CPU_ONLY", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and cuda_home is not None and (
        Path(cuda_home) / "bin" / "nvcc").exists()


cuda_home = find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension, CppExtension, CUDAExtension)

with_cuda = want_cuda(cuda_home)
sources = ["csrc/layernorm.cpp", "csrc/cpu/layernorm_cpu.cpp"]
extra_compile_args = {"cxx": ["-O3"]}
if with_cuda:
    import torch

    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        # Ampere and Hopper always (tests/test_cuda_static.py checks both), plus the
        # visible GPUs' own architectures.
        archs = ["8.0", "9.0"]
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            arch = "{}.{}".format(*torch.cuda.get_device_capability(i))
            if arch not in archs:
                archs.append(arch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    sources.append("csrc/cuda/layernorm_cuda.cu")
    # -lineinfo: source lines in compute-sanitizer and profiler reports, no run-time cost.
    # --threads: compile the architectures in parallel (the .cu is the longest job).
    extra_compile_args["nvcc"] = ["-O3", "-lineinfo", "--threads=2"]
    extension = CUDAExtension
else:
    extension = CppExtension

print(f"layernorm_ext: building {'CPU + CUDA' if with_cuda else 'CPU only'} kernels"
      + (f" (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST="
         f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPU')})" if with_cuda else ""))

setup(
    name="layernorm_ext",
    version="0.1.0",
    description="Fused LayerNorm forward/backward kernels (CPU and CUDA) as torch ops",
    packages=["layernorm_ext"],
    ext_modules=[extension("layernorm_ext._C", sources, extra_compile_args=extra_compile_args)],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch"],
)
