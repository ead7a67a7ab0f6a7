"""The CPU kernel's alternative code paths give the same numbers as the default one.

The paths are chosen once per process (instruction set, streaming stores), so each is
run in a subprocess and compared bitwise, or within rounding across instruction sets.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from layernorm_cases import subprocess_env

SCRIPT = r"""
import sys, torch, layernorm_ext
torch.manual_seed(0)
results = {}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    # 4099: more than 128 chunks on every ISA; 32771: streamed rows past 128 KiB (float32)
    for n in (1, 20, 33, 64, 1000, 4099, 32771):
        x = torch.randn(37, n, dtype=dtype, requires_grad=True)
        w = torch.randn(n, dtype=dtype, requires_grad=True)
        b = torch.randn(n, dtype=dtype, requires_grad=True)
        y = layernorm_ext.layer_norm(x, [n], w, b)
        y.backward(torch.randn_like(y))
        results[f"{dtype}-{n}"] = [t.detach().clone() for t in (y, x.grad, w.grad, b.grad)]
        if n == 1:
            # RMSNorm's dx of a one-element row is rstd * g * (1 - xhat^2) with
            # xhat^2 ~ 1: rounding noise, which differs where DEFAULT cannot fuse.
            continue
        x.grad, w.grad = None, None
        r = layernorm_ext.rms_norm(x, [n], w)
        r.backward(torch.randn_like(r))
        results[f"rms-{dtype}-{n}"] = [t.detach().clone() for t in (r, x.grad, w.grad)]
torch.save(results, sys.argv[1])
"""


def run_variant(tmp_path, name: str, **env: str) -> dict:
    out = tmp_path / f"{name}.pt"
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], check=True, timeout=300,
                   env=subprocess_env(**env))
    return torch.load(out)


def kernels_isa(**env: str) -> str:
    """The instruction set of the extension's CPU kernels in a child with ``env``."""
    script = "import layernorm_ext; print(layernorm_ext.cpu_kernels_isa())"
    return subprocess.run([sys.executable, "-c", script], check=True, timeout=120,
                          capture_output=True, text=True,
                          env=subprocess_env(**env)).stdout.strip()


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        return {flag for line in cpuinfo if line.startswith("flags")
                for flag in line.split(":", 1)[1].split()}


@pytest.mark.parametrize("capability", ["best", "avx2"])
def test_streaming_stores_give_identical_results(tmp_path, capability):
    """Streamed outputs: rows on cache lines straight from the vectors, the others
    (D = 20, 33, 1000, ...) staged and copied a group at a time, past 128 KiB in place."""
    env = {}
    if capability != "best":
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        if not x86 or not {"avx2", "fma", "f16c", "bmi2"} <= cpu_flags():
            pytest.skip("no AVX2 kernels here")
        env["ATEN_CPU_CAPABILITY"] = capability
    cached = run_variant(tmp_path, "cached", LAYERNORM_EXT_STREAM_BYTES=str(1 << 62), **env)
    streamed = run_variant(tmp_path, "streamed", LAYERNORM_EXT_STREAM_BYTES="0", **env)
    for key in cached:
        for a, b in zip(cached[key], streamed[key]):
            assert torch.equal(a, b), key


# (value, as the warning shows it; None: a value that is taken, without a warning)
@pytest.mark.parametrize("value, shown", [("64M", "64M"), ("", ""), ("1e9", "1e9"),
                                          ("99999999999999999999", "99999999999999999999"),
                                          ("\udcff", "\\xff"), ("4096", None)],
                         ids=["64M", "empty", "1e9", "overflow", "not_utf8", "4096"])
def test_a_stream_threshold_that_is_no_number_is_ignored_with_a_warning(tmp_path, value,
                                                                         shown):
    """LAYERNORM_EXT_STREAM_BYTES was read by atoll: "64M" as 64 bytes, "" as 0 (every
    output streamed past the cache), an overflow undefined. A value that is ignored is a
    Python warning at import (a C++ warning from the op reached stderr only), also one
    that is no UTF-8 (the byte 0xff: subprocess encodes the surrogate \\udcff as it)."""
    script = textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, layernorm_ext
            layernorm_ext.layer_norm(torch.randn(4, 8), (8,))
        print([(w.category.__name__, str(w.message)) for w in caught
               if "LAYERNORM_EXT_STREAM_BYTES" in str(w.message)])
    """)
    run = subprocess.run([sys.executable, "-c", script], check=True, timeout=120,
                         capture_output=True, text=True, cwd=tmp_path,
                         env=subprocess_env(LAYERNORM_EXT_STREAM_BYTES=value))
    expected = ([("UserWarning", f'layernorm_ext: ignoring LAYERNORM_EXT_STREAM_BYTES="{shown}", '
                  "which is not a whole number of bytes")] if shown is not None else [])
    assert run.stdout.strip().splitlines()[-1] == repr(expected), run.stdout + run.stderr
    assert "LAYERNORM_EXT_STREAM_BYTES" not in run.stderr, run.stderr


def test_stream_threshold_is_the_cache_at_most_64_mib_unless_set(tmp_path):
    """The default is the last-level cache's size, capped at 64 MiB: VMs list their host's
    L3 (260 and 480 MiB on 2-core Xeon VMs, where outputs of 64-256 MiB left unstreamed
    took 1.2-1.9x the time). LAYERNORM_EXT_STREAM_BYTES, when taken, replaces it."""
    script = "import layernorm_ext; print(layernorm_ext.cpu_stream_threshold())"

    def threshold(**env: str) -> int:
        environment = subprocess_env(**env)
        if not env:
            environment.pop("LAYERNORM_EXT_STREAM_BYTES", None)
        return int(subprocess.run([sys.executable, "-c", script], check=True, timeout=120,
                                  capture_output=True, text=True, cwd=tmp_path,
                                  env=environment).stdout.split()[-1])

    default = threshold()
    assert 0 < default <= 64 << 20
    # where the kernels read it (else their fallbacks differ from bench.machine's)
    if os.path.isfile("/sys/devices/system/cpu/cpu0/cache/index0/size"):
        from bench.machine import last_level_cache_bytes
        assert default == min(last_level_cache_bytes(cpus=[0]), 64 << 20)
    assert threshold(LAYERNORM_EXT_STREAM_BYTES="4096") == 4096
    assert threshold(LAYERNORM_EXT_STREAM_BYTES=str(1 << 40)) == 1 << 40  # above the cap
    assert threshold(LAYERNORM_EXT_STREAM_BYTES="-5") == 0  # everything streamed
    assert threshold(LAYERNORM_EXT_STREAM_BYTES="64M") == default  # ignored (warned above)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="x86 instruction sets")
def test_kernels_follow_atens_capability_where_the_cpu_has_f16c_and_bmi2():
    import layernorm_ext

    aten = torch.backends.cpu.get_cpu_capability()
    extras = {"f16c", "bmi2"} <= cpu_flags()
    expected = aten if aten in ("AVX2", "AVX512") and extras else "DEFAULT"
    assert layernorm_ext.cpu_kernels_isa() == expected, (aten, extras)


@pytest.mark.parametrize("capability", ["default", "avx2"])
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="x86 instruction sets")
def test_every_instruction_set_agrees_with_the_best(tmp_path, capability):
    # ATen's capability picks the kernels, which for AVX2/AVX-512 also want F16C and BMI2
    # (csrc/cpu/layernorm_cpu.cpp): the extension says which ones it runs.
    has_avx2 = {"avx2", "fma", "f16c", "bmi2"} <= cpu_flags()
    best_name = kernels_isa()
    expected = capability.upper() if capability == "default" or has_avx2 else "DEFAULT"
    if best_name == expected:
        pytest.skip(f"{expected} is the best kernels here: nothing to compare them with")
    assert kernels_isa(ATEN_CPU_CAPABILITY=capability) == expected
    best = run_variant(tmp_path, "best")
    other = run_variant(tmp_path, capability, ATEN_CPU_CAPABILITY=capability)
    for key in best:
        dtype = best[key][0].dtype
        # About twice the largest difference seen between AVX-512 and the others (an
        # Intel Xeon, 2026-12-06): a few ulps, fused multiply-adds and vector widths.
        tol = {torch.float64: 1e-14, torch.float32: 4e-6, torch.float16: 1e-3,
               torch.bfloat16: 8e-3}[dtype]
        for a, b in zip(best[key], other[key]):
            torch.testing.assert_close(a, b, atol=tol * max(1.0, a.abs().max().item()), rtol=tol,
                                       msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("rows", ["random", "with_nan_and_max"])
def test_rows_give_the_same_bits_in_a_group_as_alone(dtype, norm, rows):
    """Rows of at most one vector chunk go 16 at a time; on AVX-512 a whole group's y and
    dx are written from contiguous vectors, a partial group's row by row, and a row with
    NaN or sums that overflow takes other statistics than its neighbours. Longer rows go
    in groups too, and from D = 4096 (2048 in float64) the forward writes a group's
    outputs chunk by chunk over its rows. A row's results must not depend on any of
    that: 37 rows (whole groups and a partial one) against each row alone. The
    parameter gradients sum over rows, in another order: close."""
    torch.manual_seed(0)
    largest = torch.finfo(dtype).max
    for D in (1, 7, 16, 20, 31, 32, 1000, 4100):
        x, dy = ((torch.randn(37, D, dtype=torch.float64) * 3 + 1).to(dtype) for _ in range(2))
        if rows == "with_nan_and_max":
            x[3, 0] = float("nan")
            x[20] = torch.tensor([largest, -largest], dtype=torch.float64).repeat(D)[:D].to(dtype)
        weight, bias = (torch.randn(D, dtype=torch.float64).to(dtype) for _ in range(2))
        if norm == "layer":
            def run(rows, grads):
                y, mean, rstd = torch.ops.layernorm_ext.forward(rows, [D], weight, bias, 1e-5)
                return (y, mean, rstd), torch.ops.layernorm_ext.backward(
                    grads, rows, [D], mean, rstd, weight, bias)
        else:
            def run(rows, grads):
                y, rstd = torch.ops.layernorm_ext.rms_forward(rows, [D], weight, 1e-5)
                return (y, rstd), torch.ops.layernorm_ext.rms_backward(grads, rows, [D], rstd, weight)
        (outputs, grads) = run(x, dy)
        alone = [run(x[i:i + 1], dy[i:i + 1]) for i in range(x.shape[0])]
        same = dict(rtol=0, atol=0, equal_nan=True)
        for k, out in enumerate(outputs):
            torch.testing.assert_close(out, torch.cat([a[0][k] for a in alone]), **same,
                                       msg=f"D={D} output {k}")
        torch.testing.assert_close(grads[0], torch.cat([a[1][0] for a in alone]), **same,
                                   msg=f"D={D} dx")
        if rows == "random":
            for k in range(1, len(grads)):
                summed = torch.stack([a[1][k].double() for a in alone]).sum(0)
                tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
                torch.testing.assert_close(grads[k].double(), summed, rtol=tol, atol=tol * D)


PARTIALS_SCRIPT = r"""
import resource, torch, layernorm_ext
torch.set_num_threads(64)  # more threads than rows allow chunks for
x = torch.randn(64, 1 << 20, dtype=torch.bfloat16)
dy = torch.randn_like(x)
y, mean, rstd = torch.ops.layernorm_ext.forward(x, [1 << 20], None, None, 1e-5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.ops.layernorm_ext.backward(dy, x, [1 << 20], mean, rstd, None, None)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_backward_partials_stay_below_the_input_with_many_threads():
    """A few long rows over many threads: the dgamma/dbeta partial rows (a chunk's) stay
    within half a chunk's input. A chunk a thread took 64 partial rows of 8 MiB each here,
    four times the 128 MiB input."""
    out = subprocess.run([sys.executable, "-c", PARTIALS_SCRIPT], capture_output=True,
                         text=True, timeout=300, check=True, env=subprocess_env())
    growth_mib = int(out.stdout.split()[-1])
    assert growth_mib < 128 + 128, out.stdout  # dx and the partials


SPLIT_SCRIPT = r"""
import sys, torch, layernorm_ext
torch.manual_seed(0)
results = {}
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for D in (1, 7, 20, 33):
        x, dy = (torch.randn(4099, D, dtype=dtype) for _ in range(2))
        w, b = (torch.randn(D, dtype=dtype) for _ in range(2))
        for threads in (1, 3):
            torch.set_num_threads(threads)
            y, mean, rstd = torch.ops.layernorm_ext.forward(x, [D], w, b, 1e-5)
            dx = torch.ops.layernorm_ext.backward(dy, x, [D], mean, rstd, w, b)[0]
            results[f"{dtype}-{D}-{threads}"] = (y, mean, rstd, dx)
torch.save(results, sys.argv[1])
"""


def test_rows_split_over_threads_give_the_same_rows_as_one_thread(tmp_path):
    """Tasks and backward chunks of short rows start on whole cache lines (units of up to
    32 rows), so with an odd row count and three threads the split falls where one
    thread's would not; every row must still be written once, the same as on one
    thread, with the outputs streamed (and so fenced by each task) too."""
    out = tmp_path / "split.pt"
    subprocess.run([sys.executable, "-c", SPLIT_SCRIPT, str(out)], check=True, timeout=300,
                   env=subprocess_env(LAYERNORM_EXT_STREAM_BYTES="0"))
    results = torch.load(out)
    for key in [k for k in results if k.endswith("-1")]:
        for a, b in zip(results[key], results[key[:-1] + "3"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
