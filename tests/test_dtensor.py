"""DTensor inputs (tensor and sequence parallelism): layer_norm and rms_norm on a 2-rank
CPU mesh (gloo) against torch's functions on the whole tensors, for inputs sharded along
a row dim (each rank runs the kernels on its rows: the output stays sharded, the
parameters' gradients are partial sums) and along the normalized dim (redistributed
first; torch's own rms_norm fails there in torch 2.14), and the modules under torch's
SequenceParallel style."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from layernorm_cases import subprocess_env

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch without torch.distributed")

WORLD_SIZE = 2


def forward_backward(fn, x, w, b) -> list:
    """[y, x.grad, w.grad, b.grad] of fn(x, w, b) under the loss sum(y²)."""
    y = fn(x, w, b)
    (y * y).sum().backward()
    return [y.detach(), x.grad, w.grad, b.grad]


def _check_rank(rank: int, store_path: str) -> None:
    import torch.nn.functional as F

    import layernorm_ext  # before torch.distributed.tensor: the rules come on first use

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    store = dist.FileStore(store_path, WORLD_SIZE)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, store=store)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        generator = torch.Generator().manual_seed(0)  # the same full tensors on every rank
        full_x = torch.randn(4, 6, 8, generator=generator)
        full_w = torch.randn(8, generator=generator)
        full_b = torch.randn(8, generator=generator)
        norms = {
            "layer": (lambda x, w, b: layernorm_ext.layer_norm(x, (8,), w, b),
                      lambda x, w, b: F.layer_norm(x, (8,), w, b)),
            "rms": (lambda x, w, b: layernorm_ext.rms_norm(x, (8,), w),
                    lambda x, w, b: F.rms_norm(x, (8,), w)),
        }
        assert not layernorm_ext.sharding._registered
        for norm, (ours, theirs) in norms.items():
            leaves = [t.clone().requires_grad_() for t in (full_x, full_w, full_b)]
            expected = forward_backward(theirs, *leaves)
            # Compiled (fullgraph: the rules registered by the eager calls before it).
            compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
            for dim, fn in ((0, ours), (1, ours), (2, ours), (0, compiled)):
                x = distribute_tensor(full_x, mesh, [Shard(dim)]).requires_grad_()
                w = distribute_tensor(full_w, mesh, [Replicate()]).requires_grad_()
                b = distribute_tensor(full_b, mesh, [Replicate()]).requires_grad_()
                got = forward_backward(fn, x, w, b)
                where = (f"{norm} norm{', compiled' if fn is compiled else ''}, input sharded "
                         f"along dim {dim}")
                if dim < 2:  # a row dim: each rank ran the kernels on its rows
                    assert got[0].placements == (Shard(dim),), f"{where}: {got[0].placements}"
                    # ... and its parameter gradients are partial sums until reduced
                    assert all(grad.placements == (Partial(),) for grad in got[2:]
                               if grad is not None), f"{where}: {got[2].placements}"
                for name, tensor, reference in zip(("y", "dx", "dw", "db"), got, expected):
                    if reference is not None:
                        torch.testing.assert_close(tensor.full_tensor(), reference,
                                                   msg=lambda m: f"{where}, {name}: {m}")
        check_sequence_parallel(mesh, rank)
    finally:
        dist.destroy_process_group()


def check_sequence_parallel(mesh, rank: int) -> None:
    """Our modules under torch's SequenceParallel style (replicated parameters, each rank
    given its part of the sequence) as torch's modules."""
    from torch import nn
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    import layernorm_ext

    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(rank))  # this rank's
    for ours, theirs in ((layernorm_ext.LayerNorm, nn.LayerNorm),
                         (layernorm_ext.RMSNorm, nn.RMSNorm)):
        results = []
        for cls in (ours, theirs):
            norm = cls(8)
            with torch.no_grad():
                norm.weight.copy_(torch.randn(8, generator=torch.Generator().manual_seed(1)))
            parallelize_module(norm, mesh, SequenceParallel())
            y = norm(x)
            (y * y).sum().backward()
            results.append([y.full_tensor(), norm.weight.grad.full_tensor()])
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, msg=lambda m: f"{ours.__name__}: {m}")


def test_dtensor_sharded_rows_as_torch():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_check_rank, args=(os.path.join(tmp, "store"),), nprocs=WORLD_SIZE,
                 join=True)


def test_rules_registered_on_import_after_torch_distributed_tensor():
    """Imported after torch.distributed.tensor, the package registers the rules at once
    (torch.compile(fullgraph=True) cannot trace the registration on first use)."""
    code = ("import torch.distributed.tensor, layernorm_ext, sys; "
            "sys.exit(0 if layernorm_ext.sharding._registered else 1)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120,
                          env=subprocess_env()).returncode == 0
