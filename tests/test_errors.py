"""Bad input raises torch's exception and message, never crashes or returns garbage."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from layernorm_ext import layer_norm


def torch_message(fn):
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("case", ["empty_shape", "trailing_mismatch", "too_few_dims",
                                  "weight_shape", "bias_shape"])
def test_shape_errors_match_torch(device, case):
    x = torch.randn(4, 8, device=device)
    args = {
        "empty_shape": (x, []),
        "trailing_mismatch": (x, [7]),
        "too_few_dims": (x, [2, 4, 8]),
        "weight_shape": (x, [8], torch.ones(7, device=device)),
        "bias_shape": (x, [8], None, torch.ones(7, device=device)),
    }[case]
    expected = torch_message(lambda: F.layer_norm(*args))
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        layer_norm(*args)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64],
                         ids=str)
def test_non_float_input_rejected(device, dtype):
    """The same message from the kernels' checks, the fake kernels' (meta tensors) and
    the checks under torch.func transforms, which name the dtype as the C++ does."""
    x = torch.ones(4, 8, device=device).to(dtype)
    messages = []
    weight = torch.ones(8, device=device)
    for call in (lambda: layer_norm(x, [8]), lambda: layer_norm(x.to("meta"), [8]),
                 lambda: torch.func.grad(lambda w: layer_norm(x, [8], w).sum())(weight)):
        with pytest.raises(NotImplementedError,
                           match="must be float32, float64, float16 or bfloat16") as error:
            call()
        messages.append(str(error.value))
    assert len(set(messages)) == 1, messages


def test_non_float_weight_rejected(device):
    x = torch.ones(4, 8, device=device)
    with pytest.raises(NotImplementedError, match="weight must be float32"):
        layer_norm(x, [8], torch.ones(8, dtype=torch.int64, device=device))


@pytest.mark.parametrize("input_dtype,param_dtype", [
    (torch.float32, torch.float16), (torch.float32, torch.float64),
    (torch.bfloat16, torch.float16), (torch.float64, torch.float32)], ids=str)
def test_unsupported_mixed_dtypes_rejected(device, input_dtype, param_dtype):
    """By the kernels, and by the fake kernels with the same message: torch.compile and
    export refuse the mix when they trace, not when the compiled code runs."""
    messages = set()
    for on in (device, "meta"):
        x = torch.ones(4, 8, device=on, dtype=input_dtype)
        w = torch.ones(8, device=on, dtype=param_dtype)
        for call in (lambda: layer_norm(x, [8], w), lambda: layer_norm(x, [8], None, w),
                     lambda: torch.ops.layernorm_ext.rms_forward(x, [8], w, None)):
            with pytest.raises(RuntimeError, match="mixed dtype: expected (weight|bias) to have "
                                                   "the input's dtype") as error:
                call()
            messages.add(str(error.value).splitlines()[0])
    assert len(messages) == 2, messages  # one for the weight, one for the bias


def test_weight_and_bias_dtypes_must_agree(device):
    messages = set()
    for on in (device, "meta"):
        x = torch.ones(4, 8, device=on, dtype=torch.bfloat16)
        w = torch.ones(8, device=on)
        b = torch.zeros(8, device=on, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="expected weight and bias to have the same dtype") \
                as error:
            layer_norm(x, [8], w, b)
        messages.add(str(error.value).splitlines()[0])
    assert len(messages) == 1, messages


def test_compile_refuses_a_mixed_dtype_when_it_traces():
    x = torch.ones(4, 8)
    w = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(Exception) as error:
        torch.compile(layer_norm, backend="eager", fullgraph=True)(x, [8], w)
    # Raised by the fake kernel while Dynamo traces (before, the graph compiled and its
    # run raised the kernels' error).
    assert "failed to run FX node with fake tensors" in str(error.value), str(error.value)
    assert "mixed dtype: expected weight to have the input" in str(error.value)


def test_tensors_on_different_devices_rejected():
    x = torch.ones(4, 8)
    w = torch.ones(8, device="meta")
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        layer_norm(x, [8], w)


def test_backward_op_checks_its_tensors(device):
    x = torch.randn(4, 8, device=device)
    out, mean, rstd = torch.ops.layernorm_ext.forward(x, [8], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="Expected grad_out of shape"):
        torch.ops.layernorm_ext.backward(out[:2], x, [8], mean, rstd, None, None)
    with pytest.raises(RuntimeError, match="Expected mean and rstd with 4 elements"):
        torch.ops.layernorm_ext.backward(out, x, [8], mean[:2], rstd, None, None)
    with pytest.raises(RuntimeError, match="Expected mean and rstd with 4 elements of dtype Float"):
        torch.ops.layernorm_ext.backward(out, x, [8], mean.double(), rstd, None, None)
