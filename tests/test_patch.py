"""replace_layernorm: the fused op put into arbitrary models, in place."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import layernorm_ext
from layernorm_ext import replace_layernorm

FUSED_FORWARD = torch.ops.layernorm_ext.forward.default


class CountFusedCalls(TorchDispatchMode):
    """Counts calls of the fused forward operator inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is FUSED_FORWARD:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def layer_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm)]


def encoder(norm_first: bool, device: str) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                       batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(32),
                                 enable_nested_tensor=False).to(device)


def assert_same_outputs_and_gradients(original: nn.Module, swapped: nn.Module,
                                      x: torch.Tensor, atol: float = 1e-5) -> None:
    x_original = x.clone().requires_grad_()
    x_swapped = x.clone().requires_grad_()
    y_original, y_swapped = original(x_original), swapped(x_swapped)
    torch.testing.assert_close(y_swapped, y_original, atol=atol, rtol=1e-5)
    grad_out = torch.randn_like(y_original)
    y_original.backward(grad_out)
    y_swapped.backward(grad_out)
    torch.testing.assert_close(x_swapped.grad, x_original.grad, atol=atol, rtol=1e-5)
    for (name, p_original), (_, p_swapped) in zip(original.named_parameters(),
                                                  swapped.named_parameters()):
        torch.testing.assert_close(p_swapped.grad, p_original.grad, atol=atol, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_transformer_encoder_matches_in_training(norm_first, device):
    original = encoder(norm_first, device).train()
    swapped = replace_layernorm(copy.deepcopy(original))
    assert len(layer_norms(swapped)) == 5  # 2 per layer and the final norm
    assert all(type(m) is layernorm_ext.LayerNorm for m in layer_norms(swapped))
    x = torch.randn(3, 7, 32, device=device)
    with CountFusedCalls() as counter:
        assert_same_outputs_and_gradients(original, swapped, x)
    assert counter.calls == 5  # the swapped modules really ran the fused op


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_transformer_encoder_matches_in_eval(norm_first, device):
    # With autograd on, eval mode still calls the modules (no inference fast path).
    original = encoder(norm_first, device).eval()
    swapped = replace_layernorm(copy.deepcopy(original))
    x = torch.randn(2, 5, 32, device=device)
    with CountFusedCalls() as counter:
        assert_same_outputs_and_gradients(original, swapped, x)
    assert counter.calls == 5
    # Under no_grad the layers' inference fast path bypasses their norm modules (as the
    # docstring of replace_layernorm says); only the encoder's final norm is called.
    with torch.no_grad(), CountFusedCalls() as counter:
        torch.testing.assert_close(swapped(x), original(x), atol=1e-5, rtol=1e-5)
    assert counter.calls == 1


class Block(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 12)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).view(*x.shape[:-1], 3, 4)).flatten(-2)


@pytest.mark.parametrize("make_norm", [
    pytest.param(lambda: nn.LayerNorm((3, 4)), id="multi-dim-shape"),
    pytest.param(lambda: nn.LayerNorm((3, 4), bias=False), id="bias-false"),
    pytest.param(lambda: nn.LayerNorm((3, 4), elementwise_affine=False), id="no-affine"),
    pytest.param(lambda: nn.LayerNorm((3, 4), eps=1e-2), id="eps"),
])
def test_norm_settings_are_kept(make_norm, device):
    torch.manual_seed(1)
    original = Block(make_norm()).to(device)
    if original.norm.weight is not None:  # not the default ones/zeros, so a mix-up shows
        nn.init.normal_(original.norm.weight)
    swapped = replace_layernorm(copy.deepcopy(original))
    norm, before = swapped.norm, original.norm
    assert type(norm) is layernorm_ext.LayerNorm
    assert (norm.normalized_shape, norm.eps, norm.elementwise_affine) == (
        before.normalized_shape, before.eps, before.elementwise_affine)
    assert (norm.bias is None) == (before.bias is None)
    assert_same_outputs_and_gradients(original, swapped, torch.randn(5, 12, device=device))


def test_swap_keeps_parameter_objects_so_an_existing_optimizer_still_trains_them():
    torch.manual_seed(2)
    model = Block(nn.LayerNorm((3, 4)))
    weight, bias = model.norm.weight, model.norm.bias
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    norm = model.norm
    assert replace_layernorm(model) is model
    assert model.norm is norm and model.norm.weight is weight and model.norm.bias is bias
    before = weight.detach().clone()
    model(torch.randn(4, 12)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.norm.weight.detach(), before)


def test_swap_keeps_dtype_device_training_mode_and_hooks():
    model = nn.Sequential(nn.LayerNorm(8, dtype=torch.float64), nn.LayerNorm(8)).train()
    model[1].eval()
    seen = []
    model[0].register_forward_hook(lambda module, args, output: seen.append(type(module)))
    replace_layernorm(model)
    assert model[0].weight.dtype == torch.float64 and model[0].weight.device.type == "cpu"
    assert (model[0].training, model[1].training) == (True, False)
    x = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(model[0](x), nn.functional.layer_norm(
        x, (8,), model[0].weight, model[0].bias))
    assert seen == [layernorm_ext.LayerNorm]


def test_shared_module_and_the_root_itself_are_swapped():
    shared = nn.LayerNorm(6)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    replace_layernorm(model)
    assert model["a"] is model["b"][0] is shared
    assert type(shared) is layernorm_ext.LayerNorm
    root = nn.LayerNorm(6)
    assert replace_layernorm(root) is root and type(root) is layernorm_ext.LayerNorm


class ScaledLayerNorm(nn.LayerNorm):
    """A user subclass with its own forward: must not be replaced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_fused_modules_and_user_subclasses_are_left_alone():
    fused, custom = layernorm_ext.LayerNorm(4), ScaledLayerNorm(4)
    model = nn.Sequential(fused, custom, nn.LayerNorm(4))
    replace_layernorm(model)
    assert model[0] is fused and type(fused) is layernorm_ext.LayerNorm
    assert type(model[1]) is ScaledLayerNorm
    assert type(model[2]) is layernorm_ext.LayerNorm
    x = torch.randn(3, 4)
    torch.testing.assert_close(model[1](x), 2 * nn.functional.layer_norm(x, (4,)))


def test_a_model_quantized_in_eager_mode_keeps_its_quantized_layernorm():
    """Eager-mode quantization (torch.ao.quantization prepare/convert) matches exact module
    types, so it would leave a fused LayerNorm unconverted; the README says to quantize
    first. The quantized LayerNorm subclasses nn.LayerNorm: the swap must leave it alone."""
    tq = pytest.importorskip("torch.ao.quantization")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation warnings
        model = nn.Sequential(tq.QuantStub(), nn.Linear(8, 8), nn.LayerNorm(8),
                              tq.DeQuantStub()).eval()
        model.qconfig = tq.get_default_qconfig("x86")
        prepared = tq.prepare(model)
        prepared(torch.randn(16, 8))
        quantized = tq.convert(prepared)
    quantized_norm = quantized[2]
    assert isinstance(quantized_norm, nn.LayerNorm)
    x = torch.randn(5, 8)
    expected = quantized(x)
    replace_layernorm(quantized)
    assert quantized[2] is quantized_norm and type(quantized_norm) is not layernorm_ext.LayerNorm
    assert torch.equal(quantized(x), expected)


def test_swapped_state_dict_loads_strictly_into_the_original():
    original = encoder(norm_first=True, device="cpu")
    swapped = replace_layernorm(copy.deepcopy(original))
    with torch.no_grad():
        for p in swapped.parameters():
            p.add_(1.0)  # so a load that silently did nothing would show
    fresh = encoder(norm_first=True, device="cpu")
    fresh.load_state_dict(swapped.state_dict(), strict=True)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), swapped.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(type(m) is nn.LayerNorm for m in layer_norms(fresh))


def test_fused_layernorm_adds_no_state_to_nn_layernorm():
    # replace_layernorm swaps classes in place; that is only sound while
    # layernorm_ext.LayerNorm adds no state to nn.LayerNorm, only its forward.
    # (An empty __annotations__ appears once anything reads it: torch.jit.script does.)
    added = {name for name, value in vars(layernorm_ext.LayerNorm).items()
             if not (name == "__annotations__" and not value)}
    added -= {"__module__", "__doc__", "__qualname__", "__firstlineno__", "__static_attributes__"}
    assert added == {"forward"}, added
    assert layernorm_ext.LayerNorm.__mro__[1] is nn.LayerNorm
