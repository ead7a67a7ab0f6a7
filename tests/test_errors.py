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


def test_fake_tensors_refuse_a_mixed_dtype():
    """What torch.compile and export trace with: the mix fails there, not at run time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.ones(4, 8)
        w = torch.ones(8, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="mixed dtype: expected weight to have the "
                                               "input's dtype \\(Float\\), but got BFloat16"):
            torch.ops.layernorm_ext.forward(x, [8], w, None, 1e-5)


def test_tensors_on_different_devices_rejected():
    x = torch.ones(4, 8)
    w = torch.ones(8, device="meta")
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        layer_norm(x, [8], w)


@pytest.mark.parametrize("on", ["device", "meta"])
def test_backward_ops_check_their_tensors(device, on):
    """The kernels' checks, and the fake kernels' (meta) with the same messages."""
    on = device if on == "device" else on
    backward, rms_backward = torch.ops.layernorm_ext.backward, torch.ops.layernorm_ext.rms_backward
    x = torch.randn(4, 8, device=on)
    out, mean, rstd = torch.ops.layernorm_ext.forward(x, [8], None, None, 1e-5)
    calls = {
        "Expected grad_out of shape [4, 8], but got [2, 8]":
            lambda: backward(out[:2], x, [8], mean, rstd, None, None),
        "Expected grad_out of dtype Float, but got Double":
            lambda: backward(out.double(), x, [8], mean, rstd, None, None),
        "Expected mean and rstd with 4 elements of dtype Float, but got 2 elements of dtype "
        "Float": lambda: backward(out, x, [8], mean[:2], rstd, None, None),
        "Expected mean and rstd with 4 elements of dtype Float, but got 4 elements of dtype "
        "Double": lambda: backward(out, x, [8], mean.double(), rstd, None, None),
        "Expected mean and rstd with 4 elements of dtype Float, but got 3 elements of dtype "
        "Float": lambda: rms_backward(out, x, [8], rstd[:3], None),
    }
    for message, call in calls.items():
        with pytest.raises(RuntimeError) as error:
            call()
        assert str(error.value).splitlines()[0] == message
    # grad_out, mean or rstd elsewhere than the input (on CUDA the C++ check, with a CPU
    # tensor; else the fake kernels', with a meta one).
    other = "cpu" if on != "cpu" else "meta"
    moved = lambda t: torch.empty_like(t, device=other)  # noqa: E731
    for call in (lambda: backward(moved(out), x, [8], mean, rstd, None, None),
                 lambda: backward(out, x, [8], moved(mean), rstd, None, None),
                 lambda: backward(out, x, [8], mean, moved(rstd), None, None),
                 lambda: rms_backward(out, x, [8], moved(rstd), None)):
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            call()
