"""Checks of the CUDA kernels that need no GPU.

- The built extension carries sm_80 and sm_90 machine code, and sm_90 PTX.
- No kernel spills registers or uses local memory (resource report and SASS).
- The vectorized kernels issue 128-bit global loads and stores (sm_90 SASS).
- The backward kernels have a batch of loads in flight before they use any (sm_90 SASS).
- Host replay (tests/cuda_replay/replay.cpp): the kernels' element-to-thread mapping and
  reduction order, run on the CPU for every thread of a block.

The binary checks read the built .so with ``cuobjdump`` (shipped in triton's package, or
the CUDA toolkit's) and are skipped for a CPU-only build; the host replay needs only a C++
compiler.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

import layernorm_ext
from layernorm_cases import sanitizer_flags

ROOT = Path(__file__).resolve().parents[1]

# Kernel families of csrc/cuda/layernorm_cuda.cu (as they appear in the mangled names).
ROW_KERNELS = ("forward_registers_kernel", "forward_staged_rows_kernel",
               "forward_streaming_kernel", "backward_staged_rows_kernel", "backward_registers_kernel",
               "backward_row_means_kernel", "backward_columns_kernel")
ALL_KERNELS = ROW_KERNELS + ("finalize_param_grads_kernel",)

needs_cuda_build = pytest.mark.skipif(
    not layernorm_ext.has_cuda_kernels(), reason="CPU-only build: no CUDA kernels to inspect")


def find_cuda_tool(name: str) -> str | None:
    """`name` from triton's bundled NVIDIA tools, else the CUDA toolkit, else PATH."""
    candidates = []
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "bin" / name)
    candidates.append(Path("/usr/local/cuda/bin") / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


def extension_path() -> Path:
    from layernorm_ext import _C

    return Path(_C.__file__)


@lru_cache(maxsize=None)
def cuobjdump(*args: str) -> str:
    tool = find_cuda_tool("cuobjdump")
    if tool is None:
        pytest.skip("cuobjdump not found (install triton or a CUDA toolkit)")
    result = subprocess.run([tool, *args, str(extension_path())], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def split_functions(sass: str) -> dict[str, str]:
    """{mangled kernel name: its SASS} from `cuobjdump -sass` output."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def family(name: str) -> str | None:
    return next((k for k in ALL_KERNELS if k in name), None)


@needs_cuda_build
def test_fatbin_has_sm80_and_sm90():
    elfs = set(re.findall(r"\.(sm_\d+a?)\.cubin", cuobjdump("--list-elf")))
    assert {"sm_80", "sm_90"} <= elfs, f"machine code for {sorted(elfs)} only"


@needs_cuda_build
def test_fatbin_has_ptx_for_newer_gpus():
    """PTX of the newest architecture built (sm_90 unless a newer GPU was visible at build
    time): the driver compiles it for a GPU newer than any machine code in the library."""
    newest = max(re.findall(r"\.sm_(\d+)a?\.cubin", cuobjdump("--list-elf")), key=int)
    ptx = set(re.findall(r"\.sm_(\d+)a?\.ptx", cuobjdump("--list-ptx")))
    assert newest in ptx, f"PTX for sm_{sorted(ptx)} only, machine code up to sm_{newest}"


@needs_cuda_build
def test_every_kernel_family_is_built_for_each_arch():
    for arch in ("sm_80", "sm_90"):
        functions = split_functions(cuobjdump("-sass", "-arch", arch))
        families = {family(name) for name in functions}
        assert set(ALL_KERNELS) <= families, f"{arch}: missing {set(ALL_KERNELS) - families}"


@needs_cuda_build
def test_no_kernel_spills_or_uses_local_memory():
    report = cuobjdump("-res-usage")
    usage = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)",
                       report)
    assert len(usage) >= 2 * len(ALL_KERNELS), report[:2000]
    offenders = [(name, stack, local) for name, _reg, stack, _shared, local in usage
                 if int(stack) or int(local)]
    assert not offenders, f"stack frame / local memory in: {offenders}"
    for arch in ("sm_80", "sm_90"):
        for name, body in split_functions(cuobjdump("-sass", "-arch", arch)).items():
            assert not re.search(r"\b(LDL|STL)\b", body), f"{arch} {name} uses local memory"


@needs_cuda_build
def test_row_kernels_use_128_bit_global_accesses():
    functions = split_functions(cuobjdump("-sass", "-arch", "sm_90"))
    row_kernels = {name: body for name, body in functions.items() if family(name) in ROW_KERNELS}
    # Per norm (LayerNorm, RMSNorm) and dtype pair (5, and float64's 6th for streaming):
    # forward 3 register kernels (small and large slices, a row per thread: staged, or
    # kept in registers without kStageRowsPerThread; and float32's huge slices) +
    # streaming, backward 3 (a row per thread, 16 and 32 elements a thread) + streaming's 2.
    # The staged kernels (rows a thread each) have an instance per unit width.
    staged = staged_instances_per_norm() if config_flag("kStageRowsPerThread") else 5
    per_norm = (2 * 5 + staged + 1 + 6) + (2 * 5 + staged_instances_per_norm() + 2 * 6)
    assert len(row_kernels) == 2 * per_norm, sorted(row_kernels)
    for norm in (0, 1):  # the Norm template argument, as mangled: LNS_4NormE0E / ...E1E
        assert sum(f"NormE{norm}E" in name for name in row_kernels) == per_norm
    for name, body in row_kernels.items():
        # A plain load, or (staged blocks, kAsyncStagedCopy) a cp.async into shared memory.
        assert re.search(r"\b(LDG\.E|LDGSTS\.E\.BYPASS)\.128\b", body), \
            f"{name}: no 128-bit global load"
        if family(name) != "backward_row_means_kernel":  # it stores two floats a row
            assert re.search(r"\bSTG\.E\.128\b", body), f"{name}: no 128-bit global store"


_SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def _registers(operand: str) -> set[int]:
    """General registers an operand names: R5 -> {5}, [R4.64] -> {4, 5}."""
    regs = set()
    for number, pair in re.findall(r"\bR(\d+)(\.64)?", operand):
        regs.update(range(int(number), int(number) + (2 if pair else 1)))
    return regs


# cp.async (global to shared memory, no register): the staged kernels' copies of their
# spans into the tiles (kAsyncStagedCopy); DEPBAR waits for them.
ASYNC_COPY = "LDGSTS"


def async_copies_in_flight(body: str) -> int:
    """The most 128-bit cp.async copies a kernel issues in a row, in the SASS's
    straight-line order, before a wait for them (DEPBAR), a barrier or an exit."""
    best = run = 0
    for opcode, _ in _SASS_INSTRUCTION.findall(body):
        if opcode.startswith(ASYNC_COPY) and ".128" in opcode:
            run += 1
            best = max(best, run)
        elif opcode.startswith(("DEPBAR", "BAR", "EXIT", "RET")):
            run = 0
    return best


def loads_in_flight(body: str) -> int:
    """The most 128-bit global loads a kernel issues before the first instruction that
    reads one of their results, over every starting load, in the SASS's straight-line
    order (branches taken as falling through; a barrier or exit ends a run)."""
    instructions = _SASS_INSTRUCTION.findall(body)
    best = 0
    for start, (opcode, _) in enumerate(instructions):
        if not (opcode.startswith("LDG") and ".128" in opcode) or opcode.startswith(ASYNC_COPY):
            continue
        pending: set[int] = set()
        loads = 0
        for opcode, operands in instructions[start:]:
            if opcode.startswith(("BAR", "EXIT", "RET")):
                break
            parts = [p.strip() for p in operands.split(",")] if operands.strip() else []
            writes_first = parts and not opcode.startswith(("ST", "BRA", "RED", "ATOM",
                                                             ASYNC_COPY))
            sources = set().union(*(_registers(p) for p in parts[1 if writes_first else 0:]))
            if sources & pending:
                break
            if writes_first:
                dest = _registers(parts[0])
                if opcode.startswith("LDG"):
                    width = 4 if ".128" in opcode else 2 if ".64" in opcode else 1
                    first = min(dest) if dest else None
                    if first is not None:
                        pending.update(range(first, first + width))
                    loads += ".128" in opcode
                elif dest & pending:
                    break
        best = max(best, loads)
    return best


def config_constant(name: str) -> int:
    text = (ROOT / "csrc" / "cuda" / "layernorm_cuda_config.h").read_text()
    return int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))


def config_flag(name: str) -> bool:
    text = (ROOT / "csrc" / "cuda" / "layernorm_cuda_config.h").read_text()
    return re.search(rf"constexpr bool {name} = (true|false);", text).group(1) == "true"


def staged_instances_per_norm() -> int:
    """Instances of a staged kernel (rows a thread each) for one norm: a dtype pair's for
    each unit width (cuda_config::staged_unit_width: float32 1 or 2, 2-byte dtypes 1, 2
    or 4; 1 alone without kStagedUnits). float64 has none."""
    if not config_flag("kStagedUnits"):
        return 5
    return 2 + 4 * 3  # float32/float32, then bf16 and fp16 with their own or fp32 params


@needs_cuda_build
@pytest.mark.parametrize("kernel, count, constant", [
    # norms x row variants x dtype pairs; packs of a batch (dy and x each)
    ("backward_registers_kernel", 2 * 2 * 5, "kBackwardBatchPacks"),
    # norms x dtype pairs (float64 too); rows in flight (dy and x each)
    ("backward_columns_kernel", 2 * 6, "kColumnRowsInFlight"),
])
def test_backward_loads_a_batch_before_using_it(kernel, count, constant):
    """Each backward thread issues the dy and x vectors of a batch (of packs, or of rows)
    before it uses any: a use waits for its load, and the register backward's loading
    pack by pack made a row cost one memory round trip per pack (that kernel ran at
    47-68% of the copy roof on an H100)."""
    functions = split_functions(cuobjdump("-sass", "-arch", "sm_90"))
    kernels = {name: body for name, body in functions.items() if family(name) == kernel}
    assert len(kernels) == count, sorted(kernels)
    wanted = 2 * config_constant(constant)
    in_flight = {name: loads_in_flight(body) for name, body in kernels.items()}
    assert all(n >= wanted for n in in_flight.values()), (wanted, in_flight)


@needs_cuda_build
def test_register_forward_loads_its_slice_before_using_it():
    """Each forward thread issues at least 4 of its slice's 16-byte loads (all of a
    shorter slice) before it uses any. nvcc does not issue all of a longer slice at
    once: 4-8 of 8 and 6-7 of 16 with nvcc 13.0 (the notes in bench/results); this guards
    against a return to loading and using pack by pack."""
    functions = split_functions(cuobjdump("-sass", "-arch", "sm_90"))
    forward = {name: body for name, body in functions.items()
               if family(name) == "forward_registers_kernel"}
    # norms x (variants x dtypes + huge); a row per thread is staged (its own kernel)
    variants = 2 if config_flag("kStageRowsPerThread") else 3
    assert len(forward) == 2 * (variants * 5 + 1), sorted(forward)
    short = {}
    for name, body in forward.items():
        vectors = int(re.search(r"Li(\d+)ELb[01]E", name).group(1))  # kVectors as mangled
        issued = loads_in_flight(body)
        if issued < min(vectors, 4):
            short[name] = (vectors, issued)
    assert not short, short


@needs_cuda_build
@pytest.mark.skipif(not config_flag("kAsyncStagedCopy"), reason="staged copies through registers")
@pytest.mark.parametrize("kernel, copies", [
    # the forward's x: an unrolled run of the copy loop (4 vectors)
    ("forward_staged_rows_kernel", 4),
    # the backward's dy and x together: a run of each tensor's loop
    ("backward_staged_rows_kernel", 8),
])
def test_staged_kernels_issue_their_copies_before_waiting(kernel, copies):
    """A staged block's threads issue their cp.async copies of a span before they wait
    for any."""
    functions = split_functions(cuobjdump("-sass", "-arch", "sm_90"))
    staged = {name: async_copies_in_flight(body) for name, body in functions.items()
              if family(name) == kernel}
    if kernel.startswith("forward") and not config_flag("kStageRowsPerThread"):
        assert not staged, sorted(staged)
        return
    assert len(staged) == 2 * staged_instances_per_norm(), sorted(staged)
    assert all(n >= copies for n in staged.values()), staged


def async_copies_unwaited_at_barrier(body: str) -> int:
    """Barriers (BAR) a kernel reaches, in the SASS's straight-line order, with a cp.async
    copy issued since its last wait (DEPBAR): each one hands the block a tile some of whose
    16-byte vectors may not have landed. The emulator's copies are synchronous, so without
    a GPU only this check sees a missing wait_async_copies()."""
    unwaited = False
    barriers = 0
    for opcode, _ in _SASS_INSTRUCTION.findall(body):
        if opcode.startswith(ASYNC_COPY):
            unwaited = True
        elif opcode.startswith("DEPBAR"):
            unwaited = False
        elif opcode.startswith("BAR"):
            barriers += unwaited
    return barriers


@needs_cuda_build
@pytest.mark.skipif(not config_flag("kAsyncStagedCopy"), reason="staged copies through registers")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_staged_copies_are_waited_for_before_each_barrier(arch):
    """Every staged kernel (the forward's and the backward's rows a thread each) waits for
    its cp.async copies before the barrier that publishes the tiles."""
    functions = split_functions(cuobjdump("-sass", "-arch", arch))
    staged = {name: body for name, body in functions.items() if ASYNC_COPY in body}
    # norms, forward and backward
    assert len(staged) == 2 * staged_instances_per_norm() * 2, sorted(staged)
    unwaited = {name: n for name, body in staged.items()
                if (n := async_copies_unwaited_at_barrier(body))}
    assert not unwaited, unwaited


@needs_cuda_build
@pytest.mark.skipif(not config_flag("kPrefetchNextRows"), reason="no L2 prefetch configured")
def test_persistent_kernels_prefetch_their_next_rows():
    """The kernels whose blocks loop over rows or spans ask L2 for the next ones
    (prefetch.L2: CCTL.E.PF2 in sm_90 SASS)."""
    persistent = ("forward_registers_kernel", "forward_staged_rows_kernel",
                  "backward_registers_kernel", "backward_staged_rows_kernel")
    functions = split_functions(cuobjdump("-sass", "-arch", "sm_90"))
    kernels = {name: body for name, body in functions.items() if family(name) in persistent}
    staged = staged_instances_per_norm()
    assert len(kernels) == 2 * (2 * 5 + 1 + staged + 2 * 5 + staged), sorted(kernels)
    missing = [name for name, body in kernels.items() if not re.search(r"\bCCTL\.E\.PF2\b", body)]
    assert not missing, missing


def find_cxx() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_host_replay_of_indexing_and_reductions(tmp_path):
    """Every element read/written once, every partial combined once, no shared-memory race."""
    cxx = find_cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "replay"
    compile_cmd = [cxx, "-std=c++20", "-O1", "-pthread", *sanitizer_flags(), "-I",
                   str(ROOT / "csrc"), str(ROOT / "tests" / "cuda_replay" / "replay.cpp"),
                   "-o", str(exe)]
    built = subprocess.run(compile_cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    sys.stdout.write(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^\d+ checks, 0 failures$", run.stdout, re.MULTILINE), run.stdout
    # The register variants of each direction (forward: small, large and huge slices, a
    # row per thread; backward: the row kept, the row read twice, a row per thread in
    # float32 and in 2-byte dtypes), and the streaming ones.
    assert "coverage: 5 forward and 5 backward kernel variants replayed" in run.stdout
    # Rows a thread each, backward: the float32 and 2-byte row lengths of the replay's list;
    # its column pass a column a thread, and (even 2-byte rows) a pair.
    assert "coverage: 28 row-per-thread backward configurations, columns a thread: 1 2" in run.stdout
    # Rows a thread each in float32 (D <= 32) and 2-byte dtypes (D <= 64), 6 block row
    # counts, every base offset, three first rows: (32 * 4 + 64 * 8) * 6 * 3 spans.
    assert "coverage: 11520 staged spans of rows copied" in run.stdout
