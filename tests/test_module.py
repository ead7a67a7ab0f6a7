"""layernorm_ext.LayerNorm as a drop-in for torch.nn.LayerNorm."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from layernorm_ext import LayerNorm, RMSNorm
from layernorm_cases import check_module_under_autocast


@pytest.mark.parametrize("kwargs", [
    {}, {"eps": 1e-6}, {"elementwise_affine": False}, {"bias": False},
], ids=["default", "eps", "no_affine", "no_bias"])
@pytest.mark.parametrize("normalized_shape", [16, (4, 4)], ids=["int", "tuple"])
def test_same_attributes_parameters_and_repr(device, kwargs, normalized_shape):
    ours = LayerNorm(normalized_shape, device=device, **kwargs)
    theirs = nn.LayerNorm(normalized_shape, device=device, **kwargs)
    assert ours.normalized_shape == theirs.normalized_shape
    assert ours.eps == theirs.eps
    assert ours.elementwise_affine == theirs.elementwise_affine
    assert ours.extra_repr() == theirs.extra_repr()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert (ours.bias is None) == (theirs.bias is None)
    assert isinstance(ours, nn.LayerNorm)
    if ours.weight is not None:
        assert ours.weight.device.type == device
        with torch.no_grad():
            ours.weight.mul_(3)
        ours.reset_parameters()
        assert torch.equal(ours.weight, torch.ones_like(ours.weight))


def test_dtype_argument(device):
    ours = LayerNorm(8, device=device, dtype=torch.float64)
    assert ours.weight.dtype == torch.float64 and ours.bias.dtype == torch.float64


# (torch's module, ours) per norm: the state_dict contract is the same for both.
MODULE_PAIRS = {"layer": (nn.LayerNorm, LayerNorm), "rms": (nn.RMSNorm, RMSNorm)}


@pytest.mark.parametrize("norm,kwargs", [
    ("layer", {}), ("layer", {"bias": False}), ("layer", {"elementwise_affine": False}),
    ("rms", {}), ("rms", {"elementwise_affine": False})],
    ids=["layer", "layer_no_bias", "layer_no_affine", "rms", "rms_no_affine"])
def test_state_dict_interchange_both_directions(device, norm, kwargs):
    torch_module, our_module = MODULE_PAIRS[norm]
    torch.manual_seed(0)
    theirs = torch_module(12, device=device, **kwargs)
    ours = our_module(12, device=device, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 12, device=device)
    torch.testing.assert_close(ours(x), theirs(x))

    fresh = torch_module(12, device=device, **kwargs)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), ours(x))


@pytest.mark.parametrize("norm,kwargs,weight_dtype", [
    ("layer", {}, None), ("layer", {"bias": False}, None),
    ("layer", {"elementwise_affine": False}, None), ("rms", {}, None),
    ("rms", {"elementwise_affine": False}, None), ("rms", {}, torch.float64)],
    ids=["layer", "layer_no_bias", "layer_no_affine", "rms", "rms_no_affine",
         "rms_float64_weight"])
def test_torchscript_runs_the_fused_op(device, norm, kwargs, weight_dtype):
    """torch.jit.script compiles a model holding our modules, as it does torch's, and the
    scripted model calls the op: its output is torch's, its gradients bitwise the
    unscripted module's (an RMSNorm weight of another dtype cast as rms_norm does)."""
    torch_module, our_module = MODULE_PAIRS[norm]
    torch.manual_seed(0)
    # Not the default eps, nor parameters of ones and zeros: the scripted path must pass
    # both on.
    ours = nn.Sequential(nn.Linear(8, 8), our_module(8, eps=0.1, **kwargs)).to(device)
    theirs = nn.Sequential(nn.Linear(8, 8), torch_module(8, eps=0.1, **kwargs)).to(device)
    with torch.no_grad():
        for param in ours[1].parameters():
            param.copy_(torch.randn_like(param))
    if weight_dtype is not None:
        ours[1].to(weight_dtype)
        theirs[1].to(weight_dtype)
    theirs.load_state_dict(ours.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(ours)
        graph = str(torch.jit.script(ours[1]).graph)
    assert ("layernorm_ext::rms_forward" if norm == "rms" else "layernorm_ext::forward") in graph
    x = torch.randn(3, 8, device=device, requires_grad=True)
    y = scripted(x)
    torch.testing.assert_close(y, theirs(x))
    grads = torch.autograd.grad(y.square().sum(), [x, *ours.parameters()])
    unscripted_grads = torch.autograd.grad(ours(x).square().sum(), [x, *ours.parameters()])
    for grad, unscripted_grad in zip(grads, unscripted_grads):
        assert grad.dtype == unscripted_grad.dtype and torch.equal(grad, unscripted_grad)


def test_scripted_rmsnorm_computes_complex_input_as_torch(device):
    """What the kernels don't take goes to torch's rms_norm in the scripted forward too."""
    ours, theirs = RMSNorm(8, device=device), nn.RMSNorm(8, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(ours)
    x = torch.randn(3, 8, dtype=torch.complex64, device=device)
    torch.testing.assert_close(scripted(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("eps", [1e-5, 0.1])  # a large eps: a module that drops it fails
def test_module_forward_backward_matches_torch(device, eps):
    torch.manual_seed(0)
    ours = LayerNorm((3, 8), eps=eps, device=device)
    theirs = nn.LayerNorm((3, 8), eps=eps, device=device)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters()):
            p.normal_()
            q.copy_(p)
    x = torch.randn(2, 5, 3, 8, device=device)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_autocast_output_dtype_matches_torch(device, autocast_dtype, input_dtype):
    check_module_under_autocast(LayerNorm(8, device=device), nn.LayerNorm(8, device=device),
                                device, input_dtype, autocast_dtype)
