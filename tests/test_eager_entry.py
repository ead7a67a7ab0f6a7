"""The forward ops' eager entry points, layernorm_ext._C.forward_output and
rms_forward_output, which layer_norm and rms_norm call instead of torch.ops for plain
tensors outside torch.compile, modes and transforms: the same op through the dispatcher,
bitwise, and NotImplemented (never a crash) for other calls, which then take torch.ops."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import layernorm_ext
from layernorm_ext import _C

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=g).to(device, dtype)
                 for shape in ((6, 3, 20), (3, 20), (3, 20)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_entry_points_give_the_ops_output(device, dtype, affine):
    x, w, b = inputs(device, dtype)
    w, b = (w, b) if affine else (None, None)
    for shape in ((3, 20), [3, 20]):
        ours = _C.forward_output(x, shape, w, b, 0.1)
        assert torch.equal(ours, torch.ops.layernorm_ext.forward(x, list(shape), w, b, 0.1)[0])
        assert torch.equal(_C.rms_forward_output(x, shape, w, 0.1),
                           torch.ops.layernorm_ext.rms_forward(x, list(shape), w, 0.1)[0])
    assert torch.equal(_C.rms_forward_output(x, (20,), None, None),
                       torch.ops.layernorm_ext.rms_forward(x, [20], None, None)[0])


def test_entry_points_record_autograd(device):
    x, w, b = inputs(device, torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y = _C.forward_output(leaves[0], (3, 20), leaves[1], leaves[2], 1e-5)
    assert type(y.grad_fn).__name__ == "LayerNormBackward"
    y.sum().backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    y = torch.ops.layernorm_ext.forward(leaves[0], [3, 20], leaves[1], leaves[2], 1e-5)[0]
    y.sum().backward()
    assert all(torch.equal(g, t.grad) for g, t in zip(grads, leaves))


class Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def test_eager_calls_reach_the_ops_through_the_dispatcher(device):
    # What a dispatch mode, the profiler or the JIT tracer sees is the op, as before.
    x, w, b = inputs(device, torch.float32)
    with Calls() as mode:
        layernorm_ext.layer_norm(x, (3, 20), w, b)
        layernorm_ext.rms_norm(x, (3, 20), w)
    assert mode.calls == [torch.ops.layernorm_ext.forward.default,
                          torch.ops.layernorm_ext.rms_forward.default]


class EntrySpy:
    """Stands in for layernorm_ext._C in ops.py: records the entry points' arguments."""

    def __init__(self):
        self.calls = []

    def forward_output(self, *args):
        self.calls.append(("forward", args))
        return _C.forward_output(*args)

    def rms_forward_output(self, *args):
        self.calls.append(("rms", args))
        return _C.rms_forward_output(*args)


def test_eager_calls_take_the_entry_points_and_compiled_ones_the_ops(device, monkeypatch):
    spy = EntrySpy()
    monkeypatch.setattr(layernorm_ext.ops, "_C", spy)
    x, w, b = inputs(device, torch.float32)
    y = layernorm_ext.layer_norm(x, (3, 20), w, b, eps=0.1)
    z = layernorm_ext.rms_norm(x, [20], w[0], eps=0.1)
    assert [(name, args[1], args[-1]) for name, args in spy.calls] == \
        [("forward", (3, 20), 0.1), ("rms", [20], 0.1)]
    assert torch.equal(y, torch.ops.layernorm_ext.forward(x, [3, 20], w, b, 0.1)[0])
    assert torch.equal(z, torch.ops.layernorm_ext.rms_forward(x, [20], w[0], 0.1)[0])

    spy.calls.clear()
    compiled = torch.compile(lambda x: layernorm_ext.layer_norm(x, (3, 20), w, b, eps=0.1)
                             + layernorm_ext.rms_norm(x, [20], w[0], eps=0.1),
                             backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), y + z)
    assert spy.calls == []


class Twenty(int):
    pass


class Subclass(torch.Tensor):
    pass


def test_other_argument_types_go_the_long_way():
    # NotImplemented from the entry points: ops.py then calls torch.ops, which takes what
    # it can and raises torch's error for the rest.
    x, w, b = inputs("cpu", torch.float32)
    not_taken = [
        (x.numpy(), (3, 20), w, b, 1e-5),
        (x.as_subclass(Subclass), (3, 20), w, b, 1e-5),
        (x, (3, 20), w.as_subclass(Subclass), b, 1e-5),
        (x, (3, 20), w, b.as_subclass(Subclass), 1e-5),
        (x, 20.0, w, b, 1e-5),
        (x, (3, 20.0), w, b, 1e-5),
        (x, (3, True), w, b, 1e-5),
        (x, (3, 2**63), w, b, 1e-5),
        (x, (3, -2**64), w, b, 1e-5),
        (x, (3, 20), "w", b, 1e-5),
        (x, (3, 20), w, 0, 1e-5),
        (x, (3, 20), w, b, 1),
        (x, (3, 20), w, b, None),
    ]
    for args in not_taken:
        assert _C.forward_output(*args) is NotImplemented
    for args in [(x, (20,), None, 1), (x, [20], w.numpy(), None), (x, [20.0], None, None),
                 (x.as_subclass(Subclass), 20, None, None),
                 (x, (3, 20), w.double(), None),  # rms_norm casts it
                 (x.to(torch.complex64), 20, None, None),  # torch's rms_norm computes it
                 (x, (3, 20), w.int(), None)]:
        assert _C.rms_forward_output(*args) is NotImplemented
    for entry, args in [(_C.forward_output, (x, (3, 20), w, b)),
                        (_C.rms_forward_output, (x, (3, 20), w, 1e-5, None))]:
        with pytest.raises(TypeError, match="positional arguments"):
            entry(*args)

    # int subclasses are ints (an IntEnum size, say)
    y = layernorm_ext.layer_norm(x, (Twenty(3), Twenty(20)), w, b)
    assert torch.equal(y, layernorm_ext.layer_norm(x, (3, 20), w, b))
    assert torch.equal(_C.rms_forward_output(x, [Twenty(20)], None, None),
                       layernorm_ext.rms_norm(x, [20]))
    with pytest.raises(TypeError, match="weight"):  # torch's message, from the long way
        layernorm_ext.layer_norm(x, (3, 20), "w", b)


def test_the_calls_the_entry_points_take(device):
    x, w, b = inputs(device, torch.float32)
    # an int as normalized_shape, as nn.LayerNorm takes it; nn.Parameters
    expected = torch.ops.layernorm_ext.forward(x, [20], w[0], b[0], 1e-5)[0]
    assert torch.equal(_C.forward_output(x, 20, w[0], b[0], 1e-5), expected)
    params = [torch.nn.Parameter(t[0]) for t in (w, b)]
    assert torch.equal(_C.forward_output(x, 20, *params, 1e-5).detach(), expected)
    # float32 weight with bfloat16 input, as the kernels pair them
    xb = x.bfloat16()
    assert torch.equal(_C.rms_forward_output(xb, 20, w[0], None),
                       torch.ops.layernorm_ext.rms_forward(xb, [20], w[0], None)[0])


def test_calls_under_a_mode_or_transform_go_the_long_way(device):
    x, w, b = inputs(device, torch.float32)
    for layout in (torch.jagged, torch.strided):
        nested = torch.nested.nested_tensor([x[0], x[1, :2]], layout=layout)
        assert _C.forward_output(nested, (20,), None, None, 1e-5) is NotImplemented
        assert _C.rms_forward_output(nested, (20,), None, None) is NotImplemented

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert _C.forward_output(x, (3, 20), w, b, 1e-5) is NotImplemented
        assert _C.rms_forward_output(x, (3, 20), w, None) is NotImplemented

    # a Parameter subclass with a __torch_function__ of its own gets the call
    class Seen(torch.nn.Parameter):
        calls = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls += 1
            return super().__torch_function__(func, types, args, kwargs)

    assert _C.forward_output(x, (3, 20), Seen(w), b, 1e-5) is NotImplemented
    layernorm_ext.layer_norm(x, (3, 20), Seen(w), b)
    assert Seen.calls > 0

    taken = []

    def f(x):
        taken.append(_C.forward_output(x, (20,), None, None, 1e-5) is not NotImplemented)
        taken.append(_C.rms_forward_output(x, (20,), None, None) is not NotImplemented)
        return layernorm_ext.layer_norm(x, (20,)).sum() + layernorm_ext.rms_norm(x, (20,)).sum()

    torch.func.vmap(f)(x[:, 0])
    torch.func.grad(f)(x[0, 0])
    torch.func.jvp(f, (x[0, 0],), (torch.ones_like(x[0, 0]),))
    assert taken == [False] * 6


@pytest.mark.skipif(not hasattr(torch.overrides, "redispatch_function"),
                    reason="torch.overrides.redispatch_function is new (torch 2.11 lacks it)")
def test_a_redispatched_call_goes_the_long_way(device):
    x, w, b = inputs(device, torch.float32)

    # torch.overrides.redispatch_function leaves a skip of one __torch_function__ hop for
    # the function's own check, which the long way makes (torch raises if none does)
    class Redispatch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return torch.overrides.redispatch_function(func, types, args, kwargs or {})

    class Unwraps(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            args = tuple(a.as_subclass(torch.Tensor) if isinstance(a, Unwraps) else a
                         for a in args)
            return torch.overrides.redispatch_function(func, types, args, kwargs or {})

    expected = (layernorm_ext.layer_norm(x, (3, 20), w, b), layernorm_ext.rms_norm(x, (20,)))
    with Redispatch():
        got = (layernorm_ext.layer_norm(x, (3, 20), w, b), layernorm_ext.rms_norm(x, (20,)))
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    got = (layernorm_ext.layer_norm(x.as_subclass(Unwraps), (3, 20), w, b),
           layernorm_ext.rms_norm(x.as_subclass(Unwraps), (20,)))
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_the_ops_errors_come_through_with_torchs_types():
    x, w, b = inputs("cpu", torch.float32)
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape"):
        _C.forward_output(x, (3, 20), w[0], b, 1e-5)
    with pytest.raises(NotImplementedError):
        _C.forward_output(x.to(torch.int32), (3, 20), None, None, 1e-5)


def test_the_jit_tracer_records_the_ops():
    x, w, b = inputs("cpu", torch.float32)
    with warnings.catch_warnings():  # torch.jit.trace is deprecated:
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14's word
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.11's
        traced = torch.jit.trace(
            lambda x: layernorm_ext.layer_norm(x, (3, 20), w, b) + layernorm_ext.rms_norm(x, 20),
            (x,))
    kinds = [node.kind() for node in traced.graph.nodes()]
    assert "layernorm_ext::forward" in kinds and "layernorm_ext::rms_forward" in kinds
    assert torch.equal(traced(x), layernorm_ext.layer_norm(x, (3, 20), w, b)
                       + layernorm_ext.rms_norm(x, 20))
