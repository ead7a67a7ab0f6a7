"""The ops' C++ backward nodes behave in the autograd graph as torch's own LayerNorm node.

The nodes are hand-written torch::autograd::Node subclasses (csrc/autograd_common.h), so
what a C++ Function gave for free is checked here against F.layer_norm / F.rms_norm: the
errors for a second backward and for an input changed in place, saved-tensor hooks,
activation checkpointing, and gradients only for the tensors that require them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from layernorm_ext import layer_norm, rms_norm

SHAPE, NORMALIZED = (6, 16), [16]


def _ours_rms(x, shape, weight=None, bias=None):
    return rms_norm(x, shape, weight)


def _torch_rms(x, shape, weight=None, bias=None):
    return F.rms_norm(x, shape, weight)


# (ours, torch's) with layer_norm's signature; rms_norm takes no bias.
NORMS = {"layer_norm": (layer_norm, F.layer_norm), "rms_norm": (_ours_rms, _torch_rms)}


def _leaves(device, norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(device)
    w = (torch.randn(NORMALIZED, generator=g, dtype=torch.float64) + 1).to(device)
    b = torch.randn(NORMALIZED, generator=g, dtype=torch.float64).to(device)
    params = (w, b) if norm == "layer_norm" else (w,)
    return tuple(t.requires_grad_() for t in (x, *params))


def _grad_out(device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64).to(device)


def _call(fn, leaves):
    return fn(leaves[0], NORMALIZED, *leaves[1:])


@pytest.mark.parametrize("norm", NORMS)
def test_second_backward_raises_as_torch(device, norm):
    for fn in NORMS[norm]:
        leaves = _leaves(device, norm)
        y = _call(fn, leaves)
        y.sum().backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            y.sum().backward()


@pytest.mark.parametrize("norm", NORMS)
def test_retain_graph_allows_a_second_backward(device, norm):
    grads = []
    for fn in NORMS[norm]:
        leaves = _leaves(device, norm)
        y = _call(fn, leaves)
        grad_out = _grad_out(device)
        first = torch.autograd.grad(y, leaves, grad_out, retain_graph=True)
        second = torch.autograd.grad(y, leaves, grad_out)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        grads.append(first)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("norm", NORMS)
def test_input_changed_in_place_after_forward_raises_as_torch(device, norm):
    for fn in NORMS[norm]:
        leaves = _leaves(device, norm)
        x = leaves[0].clone()  # not a leaf, so it may be changed in place
        y = fn(x, NORMALIZED, *leaves[1:])
        x.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("norm", NORMS)
def test_saved_tensor_hooks_pack_and_unpack_what_the_node_saves(device, norm):
    # The hooks of torch.autograd.graph.saved_tensors_hooks (CPU offloading, compression)
    # see every tensor the node saves; a copy made by pack gives the same gradients.
    results = []
    for fn in NORMS[norm]:
        packed, unpacked = [], []

        def pack(t, packed=packed):
            packed.append(t.shape)
            return t.clone()

        def unpack(t, unpacked=unpacked):
            unpacked.append(t.shape)
            return t

        leaves = _leaves(device, norm)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = _call(fn, leaves)
        assert packed, "no saved tensor went through the pack hook"
        assert torch.Size(SHAPE) in packed  # the input
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
        assert len(unpacked) > 0
        results.append(grads)
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("norm", NORMS)
def test_non_reentrant_checkpoint_gives_the_plain_gradients(device, norm):
    ours = NORMS[norm][0]
    leaves = _leaves(device, norm)

    def block(x, *params):
        return ours(x.sin(), NORMALIZED, *params).cos()

    grad_out = _grad_out(device)
    plain = torch.autograd.grad(block(*leaves), leaves, grad_out)
    checkpointed = torch.autograd.grad(checkpoint(block, *leaves, use_reentrant=False),
                                       leaves, grad_out)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("wanted", [0, 1])
def test_gradients_only_for_the_tensors_that_require_them(device, norm, wanted):
    # Only the input, or only the weight, requires grad; the other gets no .grad.
    results = []
    for fn in NORMS[norm]:
        leaves = [t.detach() for t in _leaves(device, norm)]
        leaves[wanted].requires_grad_()
        y = _call(fn, leaves)
        y.backward(torch.ones_like(y) + torch.arange(SHAPE[1], device=device))
        assert all(t.grad is None for i, t in enumerate(leaves) if i != wanted)
        results.append(leaves[wanted].grad)
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("norm", NORMS)
def test_anomaly_mode_names_the_node_of_a_nan_gradient(device, norm):
    # detect_anomaly checks each node's outputs: a NaN gradient raises naming our node.
    ours = NORMS[norm][0]
    leaves = _leaves(device, norm)
    with torch.autograd.detect_anomaly(check_nan=True):
        y = _call(ours, leaves)
        grad_out = torch.full_like(y, float("nan"))
        with pytest.raises(RuntimeError, match=r"layernorm_ext::\w+Backward.*returned nan"):
            y.backward(grad_out)
