"""layer_norm and rms_norm under torch.func transforms and forward-mode AD, against torch's.

Every transform is applied to our norm and to torch's (F.layer_norm, F.rms_norm) in the same
way (float64, each weight/bias combination); the results must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import func

import layernorm_ext
from layernorm_ext import layer_norm, rms_norm

NORMALIZED = [4, 5]
# Not a default eps: a transform path that dropped the caller's eps would show.
EPS = 0.1


def with_eps(layer):
    """layer(x, normalized_shape, weight, bias, eps) with EPS."""
    def norm(x, normalized_shape, weight=None, bias=None):
        return layer(x, normalized_shape, weight, bias, EPS)
    return norm


def with_layer_norm_signature(rms):
    """rms(x, normalized_shape, weight, eps) called as f(x, normalized_shape, weight, bias),
    with EPS: one signature for both norms in these tests. RMSNorm has no bias."""
    def norm(x, normalized_shape, weight=None, bias=None):
        assert bias is None
        return rms(x, normalized_shape, weight, EPS)
    return norm


# name: (ours, torch's), both called as f(x, normalized_shape, weight, bias).
NORMS = {
    "layer_norm": (with_eps(layer_norm), with_eps(F.layer_norm)),
    "rms_norm": (with_layer_norm_signature(rms_norm), with_layer_norm_signature(F.rms_norm)),
}
# The (weight, bias) combinations each norm has.
AFFINES = {
    "layer_norm": [(True, True), (True, False), (False, True), (False, False)],
    "rms_norm": [(True, False), (False, False)],
}
AFFINE_IDS = {(True, True): "affine", (True, False): "weight_only", (False, True): "bias_only",
              (False, False): "none"}
NORM_AFFINE = pytest.mark.parametrize(
    "norm,affine", [(norm, affine) for norm, affines in AFFINES.items() for affine in affines],
    ids=[f"{norm}-{AFFINE_IDS[affine]}" for norm, affines in AFFINES.items()
         for affine in affines])
# Every parameter the norm has.
ALL_PARAMS = {"layer_norm": (True, True), "rms_norm": (True, False)}
NORM = pytest.mark.parametrize("norm", list(NORMS))


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


def reference_layer_norm(x, normalized_shape, weight=None, bias=None, eps=EPS):
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


def reference_rms_norm(x, normalized_shape, weight=None, bias=None):
    """RMSNorm from elementary ops, with EPS.

    On the CPU F.rms_norm is itself such a composite and its Hessians agree; on CUDA torch
    routes it to a fused kernel (_fused_rms_norm), whose higher derivatives we do not rely on.
    """
    assert bias is None
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    y = x * (x.square().mean(dims, keepdim=True) + EPS).rsqrt()
    return y * weight if weight is not None else y


# The references for second and higher derivatives, called as NORMS' functions are.
REFERENCES = {"layer_norm": reference_layer_norm, "rms_norm": reference_rms_norm}


def tangents_like(args, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(a.shape, generator=g, dtype=a.dtype).to(a.device) for a in args)


def assert_trees_close(ours, theirs):
    flat_ours, spec_ours = torch.utils._pytree.tree_flatten(ours)
    flat_theirs, spec_theirs = torch.utils._pytree.tree_flatten(theirs)
    assert spec_ours == spec_theirs
    for o, t in zip(flat_ours, flat_theirs):
        torch.testing.assert_close(o, t)


@NORM_AFFINE
def test_func_grad(device, norm, affine):
    ours, theirs = NORMS[norm]
    args = make_args(device, affine)
    argnums = tuple(range(len(args)))
    assert_trees_close(func.grad(scalar_loss(ours, affine), argnums)(*args),
                       func.grad(scalar_loss(theirs, affine), argnums)(*args))


@NORM_AFFINE
def test_func_vjp(device, norm, affine):
    ours, theirs = NORMS[norm]
    args = make_args(device, affine)
    out, vjp_fn = func.vjp(as_function(ours, affine), *args)
    ref_out, ref_vjp_fn = func.vjp(as_function(theirs, affine), *args)
    cotangent = tangents_like((out,))[0]
    torch.testing.assert_close(out, ref_out)
    assert_trees_close(vjp_fn(cotangent), ref_vjp_fn(cotangent))


@NORM_AFFINE
def test_func_jvp(device, norm, affine):
    ours, theirs = NORMS[norm]
    args = make_args(device, affine)
    tangents = tangents_like(args)
    assert_trees_close(func.jvp(as_function(ours, affine), args, tangents),
                       func.jvp(as_function(theirs, affine), args, tangents))


@pytest.mark.parametrize("order", ["functionalize_of_grad", "grad_of_functionalize",
                                   "jvp_of_functionalize", "make_fx_of_functionalize_of_grad"])
@NORM
def test_func_functionalize_with_gradients(device, norm, order):
    """functionalize around or inside grad and jvp, as torch's functions (an
    autograd.Function has no functionalize rule: these run the composite formulas)."""
    affine = ALL_PARAMS[norm]
    args = make_args(device, affine)

    def run(which):
        loss, fn = scalar_loss(which, affine), as_function(which, affine)
        if order == "functionalize_of_grad":
            return func.functionalize(func.grad(loss))(*args)
        if order == "grad_of_functionalize":
            return func.grad(func.functionalize(loss))(*args)
        if order == "jvp_of_functionalize":
            return func.jvp(func.functionalize(fn), args, tangents_like(args))
        from torch.fx.experimental.proxy_tensor import make_fx
        return make_fx(func.functionalize(func.grad(loss)))(*args)(*args)

    ours, theirs = NORMS[norm]
    assert_trees_close(run(ours), run(theirs))


@pytest.mark.parametrize("norm,wrt", [("layer_norm", "input"), ("layer_norm", "weight"),
                                      ("layer_norm", "bias"), ("rms_norm", "input"),
                                      ("rms_norm", "weight")])
def test_func_jvp_with_respect_to_one_argument(device, norm, wrt):
    affine = ALL_PARAMS[norm]
    params = make_args(device, affine)
    position = {"input": 0, "weight": 1, "bias": 2}[wrt]

    def along(norm_fn):
        fn = as_function(norm_fn, affine)

        def along_one(t):
            args = list(params)
            args[position] = t
            return fn(*args)
        primal = params[position]
        return func.jvp(along_one, (primal,), tangents_like((primal,)))

    assert_trees_close(*(along(norm_fn) for norm_fn in NORMS[norm]))


@NORM_AFFINE
def test_forward_ad_dual_numbers(device, norm, affine):
    args = make_args(device, affine)
    tangents = tangents_like(args)

    def primal_and_tangent(norm_fn):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
            out = fwAD.unpack_dual(as_function(norm_fn, affine)(*duals))
            return out.primal, out.tangent

    ours, theirs = (primal_and_tangent(norm_fn) for norm_fn in NORMS[norm])
    assert ours[1] is not None
    assert_trees_close(ours, theirs)


@NORM
def test_forward_ad_level_without_duals_and_backward_inside_it(device, norm):
    ours_fn, theirs_fn = (as_function(norm_fn, ALL_PARAMS[norm]) for norm_fn in NORMS[norm])
    args = tuple(t.requires_grad_() for t in make_args(device, ALL_PARAMS[norm]))
    with fwAD.dual_level():
        y = ours_fn(*args)
        assert fwAD.unpack_dual(y).tangent is None
        ours = torch.autograd.grad(y.square().sum(), args)
    theirs = torch.autograd.grad(theirs_fn(*args).square().sum(), args)
    torch.testing.assert_close(y, theirs_fn(*args))
    assert_trees_close(ours, theirs)


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
@NORM_AFFINE
def test_jacobians(device, norm, affine, transform):
    args = make_args(device, affine, shape=(2, 4, 5))
    jac = getattr(func, transform)
    argnums = tuple(range(len(args)))
    assert_trees_close(*(jac(as_function(norm_fn, affine), argnums)(*args)
                         for norm_fn in NORMS[norm]))


@pytest.mark.parametrize("outer,inner", [("jacfwd", "jacrev"), ("jacrev", "jacrev"),
                                         ("jacfwd", "jacfwd"), ("jacrev", "jacfwd")])
@NORM_AFFINE
def test_hessians(device, norm, affine, outer, inner):
    args = make_args(device, affine, shape=(2, 3), normalized_shape=[3])
    argnums = tuple(range(len(args)))

    def hessian(norm_fn):
        loss = scalar_loss(norm_fn, affine, [3])
        return getattr(func, outer)(getattr(func, inner)(loss, argnums), argnums)(*args)

    assert_trees_close(hessian(NORMS[norm][0]), hessian(REFERENCES[norm]))


@NORM
def test_hessian_matches_torch_grad_of_grad(device, norm):
    """Ours against torch's norm where torch is right (grad of grad); with test_hessians,
    this ties the elementary reference to torch."""
    affine = ALL_PARAMS[norm]
    args = make_args(device, affine, shape=(2, 3), normalized_shape=[3])
    for i in range(len(args)):
        for j in range(len(args)):
            def mixed(norm_fn):
                grad_i = func.grad(scalar_loss(norm_fn, affine, [3]), argnums=i)
                return func.jacrev(grad_i, argnums=j)(*args)

            torch.testing.assert_close(*(mixed(norm_fn) for norm_fn in NORMS[norm]))


@pytest.mark.parametrize("modes", ["fff", "rrr", "frf", "rff"])
@NORM
def test_third_directional_derivative(device, norm, modes):
    """d^3/dt^3 <f(x + t v), c> at t = 0, by any mix of forward (f) and reverse (r) mode."""
    x, w, *rest = make_args(device, ALL_PARAMS[norm])
    b = rest[0] if rest else None
    v, c = tangents_like((x, x))

    def derivative(fn, mode):
        if mode == "f":
            return lambda t: func.jvp(fn, (t,), (torch.ones_like(t),))[1]
        return func.grad(fn)

    def third(norm_fn):
        fn = lambda t: (norm_fn(x + t * v, NORMALIZED, w, b).sin() * c).sum()  # noqa: E731
        for mode in modes:
            fn = derivative(fn, mode)
        return fn(torch.zeros((), dtype=x.dtype, device=device))

    torch.testing.assert_close(third(NORMS[norm][0]), third(REFERENCES[norm]))


@NORM_AFFINE
def test_hessian_vector_product_forward_over_reverse(device, norm, affine):
    args = make_args(device, affine)
    tangents = tangents_like(args)
    argnums = tuple(range(len(args)))

    def hvp(norm_fn):
        grad_fn = func.grad(scalar_loss(norm_fn, affine), argnums)
        return func.jvp(grad_fn, args, tangents)

    assert_trees_close(*(hvp(norm_fn) for norm_fn in NORMS[norm]))


@NORM_AFFINE
def test_vmap_of_grad_per_sample_gradients(device, norm, affine):
    args = make_args(device, affine, shape=(6, 4, 5))
    in_dims = (0,) + (None,) * (len(args) - 1)
    argnums = tuple(range(len(args)))

    def per_sample(norm_fn):
        return func.vmap(func.grad(scalar_loss(norm_fn, affine), argnums), in_dims)(*args)

    assert_trees_close(*(per_sample(norm_fn) for norm_fn in NORMS[norm]))


@NORM
def test_vmap_of_jvp_with_batched_parameters(device, norm):
    affine = ALL_PARAMS[norm]
    x, *params = make_args(device, affine, shape=(3, 4, 5))
    primals = (x, *(torch.stack([p, 2 * p + 1, -p]) for p in params))  # per-sample params
    tangents = tangents_like(primals)

    def batched_jvp(norm_fn):
        fn = as_function(norm_fn, affine)
        n = len(primals)
        return func.vmap(lambda *a: func.jvp(fn, a[:n], a[n:]))(*primals, *tangents)

    assert_trees_close(*(batched_jvp(norm_fn) for norm_fn in NORMS[norm]))


# name: (ours, torch's) module classes.
MODULES = {"layer_norm": (layernorm_ext.LayerNorm, torch.nn.LayerNorm),
           "rms_norm": (layernorm_ext.RMSNorm, torch.nn.RMSNorm)}


@NORM
def test_grad_of_module_via_functional_call(device, norm):
    model, reference = (module(NORMALIZED, device=device, dtype=torch.float64)
                        for module in MODULES[norm])
    x = make_args(device, (False, False))[0]
    params = {k: v.detach() + 0.1 * i for i, (k, v) in enumerate(model.named_parameters())}

    def grads(module):
        loss = lambda p: func.functional_call(module, p, (x,)).sin().sum()  # noqa: E731
        return func.grad(loss)(params)

    assert_trees_close(grads(model), grads(reference))


@NORM_AFFINE
def test_gradcheck_forward_mode_and_batched(device, norm, affine):
    args = [t.requires_grad_()
            for t in make_args(device, affine, shape=(3, 6), normalized_shape=[6])]
    fn = as_function(NORMS[norm][0], affine, [6])
    assert torch.autograd.gradcheck(fn, args, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(fn, args, check_fwd_over_rev=True,
                                        check_rev_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@NORM
def test_jvp_reduced_precision_keeps_the_output_dtype(device, norm, dtype):
    affine = ALL_PARAMS[norm]
    x, *params = make_args(device, affine, shape=(8, 32), normalized_shape=[32])
    tx, *tparams = tangents_like((x, *params))
    # fp32 parameters, as under mixed precision
    primals = (x.to(dtype), *(p.float() for p in params))
    tangents = (tx.to(dtype), *(t.float() for t in tparams))
    ours, theirs = (as_function(norm_fn, affine, [32]) for norm_fn in NORMS[norm])
    out, tangent = func.jvp(ours, primals, tangents)
    ref_out, ref_tangent = func.jvp(theirs, tuple(t.double() for t in primals),
                                    tuple(t.double() for t in tangents))
    assert out.dtype == tangent.dtype == dtype
    # About 2.5x the largest error seen (5.6e-7, 1.6e-2, 1.9e-3 relative, 2026-12-06).
    tol = {torch.float32: 2e-6, torch.bfloat16: 4e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(tangent.double(), ref_tangent, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)


def test_double_backward_without_leading_dims(device):
    x, w, b = (t.requires_grad_() for t in make_args(device, (True, True), shape=(5,),
                                                     normalized_shape=[5]))

    def grads(norm):
        first = torch.autograd.grad(norm(x, [5], w, b).sin().sum(), (x, w, b), create_graph=True)
        return first, torch.autograd.grad(sum(g.square().sum() for g in first), (x, w, b))

    assert_trees_close(grads(layer_norm), grads(F.layer_norm))


@pytest.mark.parametrize("norm,cpp_node", [("layer_norm", "layernorm_ext::LayerNormBackward"),
                                           ("rms_norm", "layernorm_ext::RMSNormBackward")])
def test_plain_eager_keeps_the_cpp_autograd_node(device, norm, cpp_node):
    ours = NORMS[norm][0]
    x = torch.randn(4, 8, device=device, requires_grad=True)
    assert ours(x, [8]).grad_fn.name() == cpp_node
    with fwAD.dual_level():
        assert "layernorm_ext::" not in ours(x, [8]).grad_fn.name()


@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp", "forward_ad", "vmap", "jacrev"])
@pytest.mark.parametrize("norm,op", [("layer_norm", "_forward"), ("rms_norm", "_rms_forward")])
def test_transforms_run_the_fused_forward_op(device, monkeypatch, transform, norm, op):
    import layernorm_ext.transforms as transforms

    calls = []
    real_forward = getattr(transforms, op)

    def counting_forward(*args):
        calls.append(args[0].shape)
        return real_forward(*args)

    monkeypatch.setattr(transforms, op, counting_forward)
    x, *params = make_args(device, ALL_PARAMS[norm])
    fn = lambda x: as_function(NORMS[norm][0], ALL_PARAMS[norm])(x, *params)  # noqa: E731
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
@NORM
def test_torch_compile_of_grad_and_jvp(device, norm):
    torch._dynamo.reset()
    x, *params = make_args(device, ALL_PARAMS[norm])
    t = tangents_like((x,))[0]

    def grad_and_jvp(norm_fn):
        def fn(x, t):
            f = lambda x: as_function(norm_fn, ALL_PARAMS[norm])(x, *params)  # noqa: E731
            return func.grad(lambda x: f(x).sin().sum())(x), func.jvp(f, (x,), (t,))
        return fn

    ours, theirs = NORMS[norm]
    compiled = torch.compile(grad_and_jvp(ours), fullgraph=True)
    assert_trees_close(compiled(x, t), grad_and_jvp(theirs)(x, t))


@pytest.mark.parametrize("norm,affine", [("layer_norm", (True, True)),
                                         ("layer_norm", (False, True)),
                                         ("rms_norm", (True, False))],
                         ids=["layer_norm-affine", "layer_norm-bias_only", "rms_norm-weight_only"])
@pytest.mark.parametrize("path", ["create_graph", "func_grad"])
def test_differentiable_backward_keeps_fp32_parameter_grads(device, norm, affine, path):
    """bf16 input with fp32 weight/bias: the differentiable backward (double backward, and
    every torch.func gradient) accumulates the parameter grads in fp32, as the fused one."""
    x, w, b = make_args(device, (True, True), shape=(64, 32), normalized_shape=[32])
    x = x.bfloat16()
    params = [p.float() for p, keep in zip((w, b), affine) if keep]
    fn = as_function(NORMS[norm][0], affine, [32])
    loss = lambda x, *params: fn(x, *params).float().sin().sum()  # noqa: E731
    leaves = [t.detach().requires_grad_() for t in params]
    fused = torch.autograd.grad(loss(x, *leaves), leaves)  # the fused backward kernel
    if path == "create_graph":
        ours = torch.autograd.grad(loss(x, *leaves), leaves, create_graph=True)
    else:
        ours = func.grad(loss, argnums=tuple(range(1, len(params) + 1)))(x, *params)
    for o, f in zip(ours, fused):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, f, atol=2e-5, rtol=1e-5)  # seen: 3.8e-6 on values <= 50


@pytest.mark.parametrize("transform", ["grad", "jvp", "forward_ad"])
@NORM
def test_bad_arguments_raise_torchs_errors_under_transforms(device, norm, transform):
    ours, theirs = NORMS[norm]
    x, w, *rest = make_args(device, ALL_PARAMS[norm])
    b = rest[0] if rest else None

    def run(fn):
        if transform == "grad":
            return func.grad(lambda x: fn(x).sum())(x)
        if transform == "jvp":
            return func.jvp(fn, (x,), (x,))
        with fwAD.dual_level():
            return fn(fwAD.make_dual(x, x))

    with pytest.raises(RuntimeError, match=r"Given normalized_shape=\[3\]"):
        run(lambda x: ours(x, [3]))
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape"):
        run(lambda x: ours(x, NORMALIZED, w[0], b))
    if norm == "rms_norm":  # torch's rms_norm computes an integer weight; so does ours
        torch.testing.assert_close(run(lambda x: ours(x, NORMALIZED, w.int(), b)),
                                   run(lambda x: theirs(x, NORMALIZED, w.int(), b)))
        return
    with pytest.raises(NotImplementedError, match="must be float32"):
        run(lambda x: ours(x, NORMALIZED, w.int(), b))


@NORM
def test_vmap_of_grad_over_stacked_module_parameters(device, norm):
    """Model ensembling: one norm module's parameters stacked, vmap(grad) over them."""
    x = make_args(device, (False, False))[0]
    stacked = {"weight": torch.stack([torch.full(NORMALIZED, s, dtype=torch.float64)
                                      for s in (0.5, 1.0, 2.0)]).to(device)}
    if norm == "layer_norm":
        stacked["bias"] = torch.randn(3, *NORMALIZED, dtype=torch.float64).to(device)

    def ensemble_grads(module):
        loss = lambda p: func.functional_call(module, p, (x,)).sin().sum()  # noqa: E731
        return func.vmap(func.grad(loss))(stacked)

    ours, theirs = (module(NORMALIZED, device=device, dtype=torch.float64)
                    for module in MODULES[norm])
    assert_trees_close(ensemble_grads(ours), ensemble_grads(theirs))


@pytest.mark.parametrize("batched_weight", [False, True], ids=["shared_weight", "per_sample"])
@NORM
def test_vmap_alone_keeps_the_cpp_node_and_backpropagates(device, norm, batched_weight):
    """vmap without a gradient transform calls the op as plain eager does: its batching
    rule, then the C++ autograd node for a backward taken outside vmap."""
    x, w = make_args(device, (True, False))
    weights = torch.stack([w, 2 * w, -w]) if batched_weight else w
    x = x.requires_grad_()
    weights = weights.requires_grad_()
    in_dims = (0, 0 if batched_weight else None)

    def forward_backward(norm_fn):
        y = func.vmap(lambda x, w: norm_fn(x, NORMALIZED, w, None), in_dims)(x, weights)
        return y, torch.autograd.grad(y.sin().sum(), (x, weights))

    ours, theirs = (forward_backward(norm_fn) for norm_fn in NORMS[norm])
    assert_trees_close(ours, theirs)
    if not batched_weight:
        assert ours[0].grad_fn.name().startswith("layernorm_ext::")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param_dtype", [None, torch.float32], ids=["same", "float32"])
@NORM
def test_vmap_per_sample_parameters_round_once_as_a_loop(device, norm, dtype, param_dtype):
    """Per-sample weight/bias in float16/bfloat16: the batching rule applies them in
    float32 and rounds once, as the unbatched kernel does: within an ulp of a loop
    (applied to a rounded unweighted output, LayerNorm was off by up to 239 ulps)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, generator=g).to(device, dtype)
    params = [(torch.randn(4, 64, generator=g) * 3).to(device, param_dtype or dtype),
              torch.randn(4, 64, generator=g).to(device, param_dtype or dtype)]
    params = params[:len([p for p in ALL_PARAMS[norm] if p])]
    ours = NORMS[norm][0]

    def call(x, *p):
        return ours(x, (64,), *p)

    looped = torch.stack([call(x[i], *(p[i] for p in params)) for i in range(4)]).double()
    mapped = func.vmap(call)(x, *params).double()
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    ulp = torch.pow(2.0, torch.floor(torch.log2(looped.abs().clamp_min(1e-30))) - mantissa_bits)
    assert ((mapped - looped).abs() <= ulp).all()


@pytest.mark.parametrize("entry", ["function", "op"])
@pytest.mark.parametrize("param", ["weight", "bias", "rms_weight"])
@pytest.mark.parametrize("bad", ["dtype", "shape"])
def test_vmap_per_sample_parameters_refuse_what_a_loop_refuses(device, entry, param, bad):
    """A per-sample parameter the unbatched op refuses (float64 with float32 input, or
    a sample of the wrong shape) raises that op's error under vmap too. Through the ops,
    every case used to pass: the batching rules' arithmetic promoted, then rounded to
    float32, or broadcast a wrong shape. (Through the functions, shapes were checked in
    Python already; rms_norm takes a float64 weight, as torch's does.)"""
    if entry == "function" and param == "rms_weight" and bad == "dtype":
        pytest.skip("rms_norm casts the weight to the input's dtype, as torch's rms_norm")
    x = torch.randn(3, 4, 8, device=device)
    size, dtype = (9, torch.float32) if bad == "shape" else (8, torch.float64)
    if bad == "shape" and entry == "op":
        size = 1  # broadcasts against the rows
    p = torch.randn(3, size, device=device, dtype=dtype)
    name = "weight" if param == "rms_weight" else param
    message = {"dtype": f"expected {name} to have the input's dtype \\(Float\\), but got Double",
               "shape": f"Expected {name} to be of same shape as normalized_shape"}[bad]

    def call(x, p):
        if param == "rms_weight":
            if entry == "op":
                return torch.ops.layernorm_ext.rms_forward(x, [8], p, None)[0]
            return rms_norm(x, (8,), p)
        if entry == "op":
            return torch.ops.layernorm_ext.forward(x, [8], *((p, None) if param == "weight"
                                                           else (None, p)), 1e-5)[0]
        return layer_norm(x, (8,), **{param: p})

    with pytest.raises(RuntimeError, match=message):
        call(x[0], p[0])
    with pytest.raises(RuntimeError, match=message):
        func.vmap(call)(x, p)


def test_cuda_autocast_casts_before_the_dtype_pairs_are_checked(device):
    """Under a transform the op's checks run in Python first: the dtype pairs must be left
    to the op, which sees the float32 tensors of CUDA autocast (as eager does)."""
    if device != "cuda":
        pytest.skip("CPU autocast leaves layer_norm alone")
    x = torch.randn(4, 8, device=device)
    w = torch.randn(8, device=device, dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = func.grad(lambda x: layer_norm(x, [8], w).sum())(x)
        theirs = func.grad(lambda x: F.layer_norm(x, [8], w).sum())(x)
    torch.testing.assert_close(ours, theirs)
