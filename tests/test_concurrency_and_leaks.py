"""Many threads at once get the single-threaded results; repeated calls leak nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from layernorm_cases import DTYPE_PAIRS, forward_backward, subprocess_env
from layernorm_ext import layer_norm

THREADS = 8


def make_jobs(device: str) -> list[tuple]:
    """Inputs of several shapes and every dtype pair; each job is one forward + backward."""
    jobs = []
    g = torch.Generator().manual_seed(0)
    for dtype, param_dtype in DTYPE_PAIRS:
        for shape, normalized in [((48, 1000), [1000]), ((3, 17, 33), [17, 33]), ((300, 64), [64])]:
            x = torch.randn(shape, generator=g).to(device, dtype)
            weight = (torch.randn(normalized, generator=g) + 1).to(device, param_dtype)
            bias = torch.randn(normalized, generator=g).to(device, param_dtype)
            grad_out = torch.randn(shape, generator=g).to(device, dtype)
            jobs.append((x, normalized, weight, bias, grad_out))
    return jobs


def run_job(job) -> list[torch.Tensor]:
    x, normalized, weight, bias, grad_out = job
    return forward_backward(layer_norm, x, normalized, weight, bias, grad_out, 1e-5)


def test_threads_get_the_single_threaded_results_bitwise(device):
    jobs = make_jobs(device)
    expected = [run_job(job) for job in jobs]
    start = threading.Barrier(THREADS)
    mismatches: list[str] = []
    errors: list[BaseException] = []

    def worker(thread_index: int) -> None:
        try:
            start.wait()
            for repeat in range(4):
                # Each thread walks the jobs from a different starting point, so
                # different shapes and dtypes run at the same time.
                for k in range(len(jobs)):
                    j = (k + thread_index * 5 + repeat) % len(jobs)
                    got = run_job(jobs[j])
                    for name, g, e in zip(("output", "dx", "dw", "db"), got, expected[j]):
                        if not torch.equal(g, e):
                            mismatches.append(f"thread {thread_index}, job {j}: {name}")
        except BaseException as error:  # surfaced below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    assert not mismatches, mismatches[:20]


# Runs in a fresh interpreter: in the test process, memory freed by earlier tests would
# hide a leak (the allocator would serve it from pages that are already resident).
LEAK_SCRIPT = textwrap.dedent("""
    import gc, json, os, sys
    import torch
    from layernorm_ext import LayerNorm, layer_norm

    device = sys.argv[1]
    iterations, rounds = int(sys.argv[2]), int(sys.argv[3])
    page = os.sysconf("SC_PAGE_SIZE")

    def resident_bytes():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    module = LayerNorm([16, 32]).to(device)
    def one_iteration():
        # Small enough to run inline: on a loaded machine, waking the OpenMP threads
        # thousands of times would dominate (the kernels allocate nothing per thread).
        x = torch.randn(8, 16, 32, device=device, requires_grad=True)
        module(x).sum().backward()
        xb = torch.randn(4, 100, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(100, device=device, requires_grad=True)
        layer_norm(xb, [100], w, None).backward(torch.randn_like(xb))
        out, mean, rstd = torch.ops.layernorm_ext.forward(x.detach(), [32], None, None, 1e-5)
        torch.ops.layernorm_ext.backward(out, x.detach(), [32], mean, rstd, None, None)
        try:  # the error path: an exception thrown from C++ must free what it held
            layer_norm(x, [31])
        except RuntimeError:
            pass
        module.zero_grad(set_to_none=True)

    samples = []
    for r in range(rounds):
        for _ in range(iterations):
            one_iteration()
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append({"rss": resident_bytes(),
                        "cuda_allocated": torch.cuda.memory_allocated() if device == "cuda" else 0})
    print(json.dumps(samples))
""")


def test_repeated_calls_do_not_grow_memory(device):
    if os.environ.get("LAYERNORM_EXT_SANITIZE"):
        pytest.skip("under ASan (make test-sanitize), whose quarantine keeps freed memory")
    # 4 rounds of 1500 iterations; round 0 is warm-up (allocator caches, lazy init).
    proc = subprocess.run([sys.executable, "-c", LEAK_SCRIPT, device, "1500", "4"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = [s["rss"] for s in samples]
    # Each iteration allocates ~100 KB of tensors and autograd state: leaking any of it
    # would add > 100 MB over the 4500 measured iterations; 2 MiB is ~460 bytes a call.
    growth = rss[-1] - rss[0]
    assert growth < 2 << 20, f"resident memory grew by {growth / 2**20:.1f} MiB: {rss}"
    if device == "cuda":
        allocated = [s["cuda_allocated"] for s in samples]
        assert allocated[-1] == allocated[0], allocated
