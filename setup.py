"""Build of layernorm_ext: a CUDAExtension when a CUDA toolkit and a CUDA build of torch
are present, else a CppExtension.

Environment:
  LAYERNORM_EXT_CPU_ONLY=1   build the CPU kernels only, even where CUDA is available.
  CUDA_HOME                  the CUDA toolkit root; found from `nvcc` when unset.
  TORCH_CUDA_ARCH_LIST       GPU architectures; default "8.0;9.0" plus the visible GPUs'.
  MAX_JOBS                   parallel compile jobs (ninja).
  LAYERNORM_EXT_SANITIZE     e.g. "address,undefined": gcc's sanitizers in the C++ objects
                             (`make test-sanitize`; python must preload libasan).

Install with `pip install --no-build-isolation .`: the extension must be compiled
against the torch that is already installed (an isolated build would download another).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# gcc's sanitizers (ASan, UBSan) for the C++ objects, the per-ISA ones included; a report
# aborts the process (no recovery), so a test run cannot pass over one.
SANITIZE = os.environ.get("LAYERNORM_EXT_SANITIZE", "")
SANITIZE_FLAGS = ([f"-fsanitize={SANITIZE}", "-fno-sanitize-recover=all",
                   "-fno-omit-frame-pointer"] if SANITIZE else [])


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

from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension, CppExtension, CUDAExtension)

# The CPU row kernels are compiled once more per x86 instruction set, as ATen does for
# its own CPU kernels, and the extension picks one at run time (csrc/cpu/row_kernels.h).
# Never -march=native: the built wheel must run on any x86-64 machine.
ROW_KERNELS = "csrc/cpu/row_kernels.cpp"
# F16C and BMI2 come with AVX2 on every CPU, but ATen picks its AVX2/AVX512 kernels
# without checking for them: csrc/cpu/layernorm_cpu.cpp's kernel_table() does.
X86_ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    # -mavx512bf16: for intrinsics used only after a run-time check (pack_reduced in
    # csrc/cpu/row_chunks.h, after kernel_table_AVX512()'s check in row_kernels.cpp).
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-mbmi2", "-mavx512bf16"],
}
BUILD_X86_ISAS = platform.machine().lower() in ("x86_64", "amd64")


def check_shared_libstdcxx(library: Path) -> None:
    """Fails the build when the extension carries its own copy of libstdc++.

    A compiler whose library path holds only libstdc++.a (seen: a g++ wrapper that puts
    its own lib directory first with -B) links the C++ runtime into the extension. That
    private copy's iostreams and locales are never initialized, so the first error
    message the extension formats crashes the process instead of raising.
    """
    readelf = shutil.which("readelf")
    if readelf is None or not library.exists():
        return
    dynamic = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    if needed and not any(name.startswith("libstdc++.so") for name in needed):
        raise RuntimeError(
            f"layernorm_ext: {library.name} links libstdc++ statically (compiler: "
            f"{os.environ.get('CXX', 'c++')}); it would crash on its first error message. "
            "Build with a compiler that links libstdc++ as a shared library, e.g. "
            "CC=/usr/bin/gcc CXX=/usr/bin/g++.")


def isa_leaks(nm_output: str, isa: str) -> list[str]:
    """The weak (inline or template) functions an ISA object defines outside that ISA's
    namespace, from `nm --defined-only -C`. Another object may define the same function
    compiled for another instruction set, and the linker keeps one copy for all callers:
    with this ISA's instructions, the baseline kernels could run AVX-512 code."""
    leaks = []
    for line in nm_output.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[1] == "W" and f"::{isa}::" not in parts[2]:
            leaks.append(parts[2])
    return leaks


def check_isa_object(obj: Path, isa: str) -> None:
    """Fails the build when the ISA object defines functions the others may share."""
    nm = shutil.which("nm")
    if nm is None:
        return
    listing = subprocess.run([nm, "--defined-only", "-C", str(obj)], capture_output=True,
                             text=True, check=True).stdout
    leaks = isa_leaks(listing, isa)
    if leaks:
        raise RuntimeError(
            f"layernorm_ext: {obj.name} defines inline functions outside namespace {isa}, "
            "which the linker may share with the other instruction sets' kernels: "
            + "; ".join(leaks[:5]) + ". Put them in the ISA's namespace "
            "(inline namespace CPU_CAPABILITY) or give them internal linkage.")


def toolchain_description() -> str:
    """What else an object depends on: an upgraded torch (same include paths, new headers),
    another compiler, CUDA toolkit or set of GPU architectures, or a switch between the
    CPU-only and the CUDA build must rebuild it, as the sources' mtimes cannot tell."""
    import torch

    def version(compiler: str) -> str:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout

    cxx = os.environ.get("CXX", "c++")
    description = f"torch {torch.__version__} {torch.version.git_version}\n{cxx}: {version(cxx)}"
    if with_cuda:
        nvcc = str(Path(cuda_home) / "bin" / "nvcc")
        description += (f"\n{nvcc}: {version(nvcc)}"
                        f"\nTORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        description += "\nCPU only"
    if SANITIZE_FLAGS:
        description += f"\n{' '.join(SANITIZE_FLAGS)}"
    return description


class BuildExtensionWithCpuIsas(BuildExtension):
    """BuildExtension that adds the per-ISA objects of the CPU row kernels, and rebuilds
    everything after a change of torch or compiler."""

    def build_extension(self, ext):
        toolchain = toolchain_description()
        stamp = Path(self.build_temp) / "toolchain.stamp"
        if not stamp.exists() or stamp.read_text() != toolchain:
            # Without ninja setuptools skips an extension newer than its sources, and
            # ninja judges the objects by mtimes and commands: drop them, force the link.
            for obj in Path(self.build_temp).rglob("*.o"):
                obj.unlink()
            self.force = True
        if BUILD_X86_ISAS:
            ext.extra_objects = list(ext.extra_objects or []) + self._compile_isa_objects(ext)
        super().build_extension(ext)
        check_shared_libstdcxx(Path(self.get_ext_fullpath(ext.name)))
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(toolchain)

    def _compile_isa_objects(self, ext) -> list[str]:
        """Each ISA's object, compiled again when its command, row_kernels.cpp or a header
        changed (a change of torch or compiler already removed it: build_extension)."""
        out_dir = Path(self.build_temp) / "cpu_isa"
        out_dir.mkdir(parents=True, exist_ok=True)
        cxx = os.environ.get("CXX", "c++")
        includes = [f"-I{d}" for d in [*ext.include_dirs, sysconfig.get_paths()["include"]]]
        headers = list((ROOT / "csrc").rglob("*.h"))
        newest_input = max(p.stat().st_mtime for p in [ROOT / ROW_KERNELS, *headers])

        def compile_one(isa: str) -> str:
            obj = out_dir / f"row_kernels_{isa}.o"
            stamp = out_dir / f"row_kernels_{isa}.stamp"
            cmd = [cxx, "-O3", "-fPIC", "-std=c++20", "-DNDEBUG", *includes,
                   f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}", *X86_ISA_FLAGS[isa],
                   # fused multiply-adds only where the source asks (layernorm_math.h)
                   "-ffp-contract=off", *SANITIZE_FLAGS,
                   "-DTORCH_API_INCLUDE_EXTENSION_H", "-c", str(ROOT / ROW_KERNELS),
                   "-o", str(obj)]
            built_with = " ".join(cmd)
            if (obj.exists() and obj.stat().st_mtime > newest_input and stamp.exists()
                    and stamp.read_text() == built_with):
                return str(obj)
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            check_isa_object(obj, isa)
            stamp.write_text(built_with)
            return str(obj)

        jobs = int(os.environ.get("MAX_JOBS", "2"))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(compile_one, X86_ISA_FLAGS))


with_cuda = want_cuda(cuda_home)
# Without ninja, setuptools rebuilds the extension only for a source or one of these newer
# than it (ninja reads the objects' own dependency files).
csrc_headers = sorted(str(p.relative_to(ROOT)) for pattern in ("*.h", "*.cuh")
                 for p in (ROOT / "csrc").rglob(pattern))
sources = ["csrc/layernorm.cpp", "csrc/python_module.cpp", "csrc/layernorm_checks.cpp",
           "csrc/layernorm_autograd.cpp", "csrc/rms_norm_autograd.cpp",
           "csrc/layernorm_autocast.cpp",
           "csrc/cpu/layernorm_cpu.cpp",
           ROW_KERNELS]
# at::parallel_for is header code: without -fopenmp it silently runs on one thread.
# Linking -fopenmp records libgomp.so.1, which resolves to the copy torch has loaded.
# -ffp-contract=off: fused multiply-adds only where the source asks (layernorm_math.h),
# also in the DEFAULT row kernels (on x86 they have no FMA; elsewhere they are the only ones).
# -std=c++20: the sources use <bit>; torch before 2.13 (2.11: the GPU machines' image)
# compiles extensions as C++17 unless a -std flag is given.
extra_compile_args = {"cxx": ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off",
                              *SANITIZE_FLAGS]}
extra_link_args = ["-fopenmp", *SANITIZE_FLAGS]
define_macros = [("LAYERNORM_EXT_X86_ISAS", None)] if BUILD_X86_ISAS else []
if with_cuda:
    import torch

    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        # Ampere and Hopper always (tests/test_cuda_static.py checks both), plus the
        # visible GPUs' own architectures; and PTX of the newest, which the driver
        # compiles for GPUs newer than any of them (Blackwell, for a build without one).
        archs = ["8.0", "9.0"]
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            arch = "{}.{}".format(*torch.cuda.get_device_capability(i))
            if arch not in archs:
                archs.append(arch)
        archs.sort(key=lambda arch: tuple(map(int, arch.split("."))))
        archs[-1] += "+PTX"
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
    packages=find_packages(include=["layernorm_ext", "layernorm_ext.*"]),
    ext_modules=[extension("layernorm_ext._C", sources, extra_compile_args=extra_compile_args,
                           extra_link_args=extra_link_args, define_macros=define_macros,
                           depends=csrc_headers)],
    cmdclass={"build_ext": BuildExtensionWithCpuIsas},
    python_requires=">=3.10",
    install_requires=["torch"],
)
