"""layer_norm under torch.func transforms and forward-mode AD, against F.layer_norm.

Every transform is applied to our layer_norm and to torch's in the same way (float64, each
weight/bias combination); the results must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import func

import layernorm_ext
from layernorm_ext import layer_norm

AFFINE = pytest.mark.parametrize(
    "affine", [(True, True), (True, False), (False, True), (False, False)],
    ids=["affine", "weight_only", "bias_only", "none"])
NORMALIZED = [4, 5]


def make_args(device, affine, shape=(3, 4, 5), normalized_shape=NORMALIZED, seed=0):
    """(x, weight, bias) in float64: only the present tensors, so transforms see each one."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(normalized_shape)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    params = [torch.randn(n, generator=g, dtype=torch.float64) + 1,
              torch.randn(n, generator=g, dtype=torch.float64)]
    args = [x] + [p for p, keep in zip(params, affine) if keep]
    return tuple(t.to(device) for t in args)


def as_function(norm, affine, normalized_shape=NORMALIZED):
    """norm(x, normalized_shape, w, b) as a function of the present tensors only."""
    def fn(x, *params):
        it = iter(params)
        weight = next(it) if affine[0] else None
        bias = next(it) if affine[1] else None
        return norm(x, normalized_shape, weight, bias)
    return fn


def scalar_loss(norm, affine, normalized_shape=NORMALIZED):
    """A non-linear scalar of the output, so second derivatives are not trivially zero."""
    fn = as_function(norm, affine, normalized_shape)

    def loss(*args):
        y = fn(*args)
        return (y.sin() * torch.linspace(-1, 2, y.numel(), dtype=y.dtype,
                                         device=y.device).view_as(y)).sum()
    return loss


def reference_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """LayerNorm from elementary ops, the reference for second and higher derivatives.

    F.layer_norm is not one there: on torch 2.14 its vmapped Hessians (jacrev/jacfwd of
    jacrev/jacfwd) get the mixed input/weight block wrong, and its nested forward-mode
    derivatives too (pytorch/pytorch#196700, functorch#534); its grad-of-grad is right.
    """
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    centered = x - x.mean(dims, keepdim=True)
    y = centered * (centered.square().mean(dims, keepdim=True) + eps).rsqrt()
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


def tangents_like(args, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(a.shape, generator=g, dtype=a.dtype).to(a.device) for a in args)


def assert_trees_close(ours, theirs):
    flat_ours, spec_ours = torch.utils._pytree.tree_flatten(ours)
    flat_theirs, spec_theirs = torch.utils._pytree.tree_flatten(theirs)
    assert spec_ours == spec_theirs
    for o, t in zip(flat_ours, flat_theirs):
        torch.testing.assert_close(o, t)


@AFFINE
def test_func_grad(device, affine):
    args = make_args(device, affine)
    argnums = tuple(range(len(args)))
    ours = func.grad(scalar_loss(layer_norm, affine), argnums)(*args)
    theirs = func.grad(scalar_loss(F.layer_norm, affine), argnums)(*args)
    assert_trees_close(ours, theirs)


@AFFINE
def test_func_vjp(device, affine):
    args = make_args(device, affine)
    out, vjp_fn = func.vjp(as_function(layer_norm, affine), *args)
    ref_out, ref_vjp_fn = func.vjp(as_function(F.layer_norm, affine), *args)
    cotangent = tangents_like((out,))[0]
    torch.testing.assert_close(out, ref_out)
    assert_trees_close(vjp_fn(cotangent), ref_vjp_fn(cotangent))


@AFFINE
def test_func_jvp(device, affine):
    args = make_args(device, affine)
    tangents = tangents_like(args)
    ours = func.jvp(as_function(layer_norm, affine), args, tangents)
    theirs = func.jvp(as_function(F.layer_norm, affine), args, tangents)
    assert_trees_close(ours, theirs)


@pytest.mark.parametrize("wrt", ["input", "weight", "bias"])
def test_func_jvp_with_respect_to_one_argument(device, wrt):
    x, w, b = make_args(device, (True, True))
    position = {"input": 0, "weight": 1, "bias": 2}[wrt]

    def along(norm):
        def fn(t):
            args = [x, w, b]
            args[position] = t
            return norm(args[0], NORMALIZED, args[1], args[2])
        primal = (x, w, b)[position]
        return func.jvp(fn, (primal,), tangents_like((primal,)))

    assert_trees_close(along(layer_norm), along(F.layer_norm))


@AFFINE
def test_forward_ad_dual_numbers(device, affine):
    args = make_args(device, affine)
    tangents = tangents_like(args)

    def primal_and_tangent(norm):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
            out = fwAD.unpack_dual(as_function(norm, affine)(*duals))
            return out.primal, out.tangent

    ours, theirs = primal_and_tangent(layer_norm), primal_and_tangent(F.layer_norm)
    assert ours[1] is not None
    assert_trees_close(ours, theirs)


def test_forward_ad_level_without_duals_and_backward_inside_it(device):
    x, w, b = (t.requires_grad_() for t in make_args(device, (True, True)))
    with fwAD.dual_level():
        y = layer_norm(x, NORMALIZED, w, b)
        assert fwAD.unpack_dual(y).tangent is None
        ours = torch.autograd.grad(y.square().sum(), (x, w, b))
    theirs = torch.autograd.grad(F.layer_norm(x, NORMALIZED, w, b).square().sum(), (x, w, b))
    torch.testing.assert_close(y, F.layer_norm(x, NORMALIZED, w, b))
    assert_trees_close(ours, theirs)


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
@AFFINE
def test_jacobians(device, affine, transform):
    args = make_args(device, affine, shape=(2, 4, 5))
    jac = getattr(func, transform)
    argnums = tuple(range(len(args)))
    assert_trees_close(jac(as_function(layer_norm, affine), argnums)(*args),
                       jac(as_function(F.layer_norm, affine), argnums)(*args))


@pytest.mark.parametrize("outer,inner", [("jacfwd", "jacrev"), ("jacrev", "jacrev"),
                                         ("jacfwd", "jacfwd"), ("jacrev", "jacfwd")])
@AFFINE
def test_hessians(device, affine, outer, inner):
    args = make_args(device, affine, shape=(2, 3), normalized_shape=[3])
    argnums = tuple(range(len(args)))

    def hessian(norm):
        loss = scalar_loss(norm, affine, [3])
        return getattr(func, outer)(getattr(func, inner)(loss, argnums), argnums)(*args)

    assert_trees_close(hessian(layer_norm), hessian(reference_layer_norm))


def test_hessian_matches_torch_grad_of_grad(device):
    """The reference itself, against F.layer_norm where torch is right (grad of grad)."""
    args = make_args(device, (True, True), shape=(2, 3), normalized_shape=[3])
    for i in range(3):
        for j in range(3):
            def mixed(norm):
                grad_i = func.grad(scalar_loss(norm, (True, True), [3]), argnums=i)
                return func.jacrev(grad_i, argnums=j)(*args)

            torch.testing.assert_close(mixed(layer_norm), mixed(F.layer_norm))


@pytest.mark.parametrize("modes", ["fff", "rrr", "frf", "rff"])
def test_third_directional_derivative(device, modes):
    """d^3/dt^3 <f(x + t v), c> at t = 0, by any mix of forward (f) and reverse (r) mode."""
    x, w, b = make_args(device, (True, True))
    v, c = tangents_like((x, x))

    def derivative(fn, mode):
        if mode == "f":
            return lambda t: func.jvp(fn, (t,), (torch.ones_like(t),))[1]
        return func.grad(fn)

    def third(norm):
        fn = lambda t: (norm(x + t * v, NORMALIZED, w, b).sin() * c).sum()  # noqa: E731
        for mode in modes:
            fn = derivative(fn, mode)
        return fn(torch.zeros((), dtype=x.dtype, device=device))

    torch.testing.assert_close(third(layer_norm), third(reference_layer_norm))


@AFFINE
def test_hessian_vector_product_forward_over_reverse(device, affine):
    args = make_args(device, affine)
    tangents = tangents_like(args)
    argnums = tuple(range(len(args)))

    def hvp(norm):
        grad_fn = func.grad(scalar_loss(norm, affine), argnums)
        return func.jvp(grad_fn, args, tangents)

    assert_trees_close(hvp(layer_norm), hvp(F.layer_norm))


@AFFINE
def test_vmap_of_grad_per_sample_gradients(device, affine):
    args = make_args(device, affine, shape=(6, 4, 5))
    in_dims = (0,) + (None,) * (len(args) - 1)
    argnums = tuple(range(len(args)))

    def per_sample(norm):
        return func.vmap(func.grad(scalar_loss(norm, affine), argnums), in_dims)(*args)

    assert_trees_close(per_sample(layer_norm), per_sample(F.layer_norm))


def test_vmap_of_jvp_with_batched_parameters(device):
    x, w, b = make_args(device, (True, True), shape=(3, 4, 5))
    ws, bs = torch.stack([w, w * 2, -w]), torch.stack([b, b + 1, b * 3])
    tx, tw, tb = tangents_like((x, ws, bs))

    def batched_jvp(norm):
        fn = as_function(norm, (True, True))
        return func.vmap(lambda *a: func.jvp(fn, a[:3], a[3:]))(x, ws, bs, tx, tw, tb)

    assert_trees_close(batched_jvp(layer_norm), batched_jvp(F.layer_norm))


def test_grad_of_module_via_functional_call(device):
    model = layernorm_ext.LayerNorm(NORMALIZED, device=device, dtype=torch.float64)
    reference = torch.nn.LayerNorm(NORMALIZED, device=device, dtype=torch.float64)
    x = make_args(device, (False, False))[0]
    params = {k: v.detach() + 0.1 * i for i, (k, v) in enumerate(model.named_parameters())}

    def grads(module):
        loss = lambda p: func.functional_call(module, p, (x,)).sin().sum()  # noqa: E731
        return func.grad(loss)(params)

    assert_trees_close(grads(model), grads(reference))


@AFFINE
def test_gradcheck_forward_mode_and_batched(device, affine):
    args = [t.requires_grad_()
            for t in make_args(device, affine, shape=(3, 6), normalized_shape=[6])]
    fn = as_function(layer_norm, affine, [6])
    assert torch.autograd.gradcheck(fn, args, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(fn, args, check_fwd_over_rev=True,
                                        check_rev_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_jvp_reduced_precision_keeps_the_output_dtype(device, dtype):
    x, w, b = make_args(device, (True, True), shape=(8, 32), normalized_shape=[32])
    tx, tw, tb = tangents_like((x, w, b))
    low = [t.to(dtype) for t in (x, tx)]
    params = [t.float() for t in (w, b, tw, tb)]  # fp32 parameters, as under mixed precision
    out, tangent = func.jvp(lambda x, w, b: layer_norm(x, [32], w, b),
                            (low[0], params[0], params[1]), (low[1], params[2], params[3]))
    ref_out, ref_tangent = func.jvp(lambda x, w, b: F.layer_norm(x, [32], w, b),
                                    tuple(t.double() for t in (low[0], params[0], params[1])),
                                    tuple(t.double() for t in (low[1], params[2], params[3])))
    assert out.dtype == tangent.dtype == dtype
    tol = {torch.float32: 1e-4, torch.bfloat16: 8e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(tangent.double(), ref_tangent, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)


def test_double_backward_without_leading_dims(device):
    x, w, b = (t.requires_grad_() for t in make_args(device, (True, True), shape=(5,),
                                                     normalized_shape=[5]))

    def grads(norm):
        first = torch.autograd.grad(norm(x, [5], w, b).sin().sum(), (x, w, b), create_graph=True)
        return first, torch.autograd.grad(sum(g.square().sum() for g in first), (x, w, b))

    assert_trees_close(grads(layer_norm), grads(F.layer_norm))


def test_plain_eager_keeps_the_cpp_autograd_node(device):
    x = torch.randn(4, 8, device=device, requires_grad=True)
    assert "LayerNormFunction" in layer_norm(x, [8]).grad_fn.name()
    assert "CppNode" in layer_norm(x, [8]).grad_fn.name()
    with fwAD.dual_level():
        assert "CppNode" not in layer_norm(x, [8]).grad_fn.name()


@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp", "forward_ad", "vmap", "jacrev"])
def test_transforms_run_the_fused_forward_op(device, monkeypatch, transform):
    import layernorm_ext.transforms as transforms

    calls = []
    real_forward = transforms._forward

    def counting_forward(*args):
        calls.append(args[0].shape)
        return real_forward(*args)

    monkeypatch.setattr(transforms, "_forward", counting_forward)
    x, w, b = make_args(device, (True, True))
    fn = lambda x: layer_norm(x, NORMALIZED, w, b)  # noqa: E731
    if transform == "grad":
        func.grad(lambda x: fn(x).sum())(x)
    elif transform == "vjp":
        func.vjp(fn, x)[1](torch.ones_like(x))
    elif transform == "jvp":
        func.jvp(fn, (x,), (x,))
    elif transform == "forward_ad":
        with fwAD.dual_level():
            fn(fwAD.make_dual(x, x))
    elif transform == "vmap":
        func.vmap(fn)(x)
    else:
        func.jacrev(fn)(x)
    # One call: under vmap the op's batching rule takes the whole batch (the Python code
    # sees the per-sample shape), not a loop over samples.
    assert len(calls) == 1 and calls[0][-2:] == x.shape[-2:]


@pytest.mark.slow
def test_torch_compile_of_grad_and_jvp(device):
    torch._dynamo.reset()
    x, w, b = make_args(device, (True, True))
    t = tangents_like((x,))[0]

    def grad_and_jvp(norm):
        def fn(x, t):
            f = lambda x: norm(x, NORMALIZED, w, b)  # noqa: E731
            return func.grad(lambda x: f(x).sin().sum())(x), func.jvp(f, (x,), (t,))
        return fn

    compiled = torch.compile(grad_and_jvp(layer_norm), fullgraph=True)
    assert_trees_close(compiled(x, t), grad_and_jvp(F.layer_norm)(x, t))


@pytest.mark.parametrize("affine", [(True, True), (False, True)], ids=["affine", "bias_only"])
@pytest.mark.parametrize("path", ["create_graph", "func_grad"])
def test_differentiable_backward_keeps_fp32_parameter_grads(device, affine, path):
    """bf16 input with fp32 weight/bias: the differentiable backward (double backward, and
    every torch.func gradient) accumulates the parameter grads in fp32, as the fused one."""
    x, w, b = make_args(device, (True, True), shape=(64, 32), normalized_shape=[32])
    x = x.bfloat16()
    params = [p.float() for p, keep in zip((w, b), affine) if keep]
    fn = as_function(layer_norm, affine, [32])
    loss = lambda x, *params: fn(x, *params).float().sin().sum()  # noqa: E731
    leaves = [t.detach().requires_grad_() for t in params]
    fused = torch.autograd.grad(loss(x, *leaves), leaves)  # the fused backward kernel
    if path == "create_graph":
        ours = torch.autograd.grad(loss(x, *leaves), leaves, create_graph=True)
    else:
        ours = func.grad(loss, argnums=tuple(range(1, len(params) + 1)))(x, *params)
    for o, f in zip(ours, fused):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, f, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("transform", ["grad", "jvp", "forward_ad"])
def test_bad_arguments_raise_torchs_errors_under_transforms(device, transform):
    x, w, b = make_args(device, (True, True))

    def run(fn):
        if transform == "grad":
            return func.grad(lambda x: fn(x).sum())(x)
        if transform == "jvp":
            return func.jvp(fn, (x,), (x,))
        with fwAD.dual_level():
            return fn(fwAD.make_dual(x, x))

    with pytest.raises(RuntimeError, match=r"Given normalized_shape=\[3\]"):
        run(lambda x: layer_norm(x, [3]))
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape"):
        run(lambda x: layer_norm(x, NORMALIZED, w[0], b))
    with pytest.raises(NotImplementedError, match="must be float32"):
        run(lambda x: layer_norm(x, NORMALIZED, w.int(), b))


def test_vmap_of_grad_over_stacked_module_parameters(device):
    """Model ensembling: one LayerNorm's parameters stacked, vmap(grad) over them."""
    x = make_args(device, (False, False))[0]
    stacked = {"weight": torch.stack([torch.full(NORMALIZED, s, dtype=torch.float64)
                                      for s in (0.5, 1.0, 2.0)]).to(device),
               "bias": torch.randn(3, *NORMALIZED, dtype=torch.float64).to(device)}

    def ensemble_grads(module):
        loss = lambda p: func.functional_call(module, p, (x,)).sin().sum()  # noqa: E731
        return func.vmap(func.grad(loss))(stacked)

    ours = layernorm_ext.LayerNorm(NORMALIZED, device=device, dtype=torch.float64)
    theirs = torch.nn.LayerNorm(NORMALIZED, device=device, dtype=torch.float64)
    assert_trees_close(ensemble_grads(ours), ensemble_grads(theirs))


@pytest.mark.parametrize("batched_weight", [False, True], ids=["shared_weight", "per_sample"])
def test_vmap_alone_keeps_the_cpp_node_and_backpropagates(device, batched_weight):
    """vmap without a gradient transform calls the op as plain eager does: its batching
    rule, then the C++ autograd node for a backward taken outside vmap."""
    x, w = make_args(device, (True, False))
    weights = torch.stack([w, 2 * w, -w]) if batched_weight else w
    x = x.requires_grad_()
    weights = weights.requires_grad_()
    in_dims = (0, 0 if batched_weight else None)

    def forward_backward(norm):
        y = func.vmap(lambda x, w: norm(x, NORMALIZED, w, None), in_dims)(x, weights)
        return y, torch.autograd.grad(y.sin().sum(), (x, weights))

    ours, theirs = forward_backward(layer_norm), forward_backward(F.layer_norm)
    assert_trees_close(ours, theirs)
    if not batched_weight:
        assert "CppNode" in ours[0].grad_fn.name()
