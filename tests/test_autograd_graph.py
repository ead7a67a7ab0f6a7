"""The ops' C++ backward nodes in the autograd graph, as torch's own norms' nodes.

The nodes are hand-written torch::autograd::Node subclasses (csrc/autograd_common.h), so
what a C++ Function gave for free is checked here: the errors for a second backward and
for an input changed in place (against F.layer_norm / F.rms_norm), saved-tensor hooks,
the nodes' Python classes (their saved tensors, as torch's nodes show theirs),
activation checkpointing, gradients of any subset of the arguments (against torch's),
anomaly mode and compiled autograd.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from layernorm_cases import subprocess_env
from layernorm_ext import layer_norm, rms_norm

SHAPE, NORMALIZED = (6, 16), [16]


def _ours_rms(x, shape, weight=None, bias=None, eps=None):
    return rms_norm(x, shape, weight, eps)


def _torch_rms(x, shape, weight=None, bias=None, eps=None):
    return F.rms_norm(x, shape, weight, eps)


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


# What each node saves, in order: input, weight, bias, mean, rstd (RMSNorm: no bias, mean).
SAVED_SHAPES = {"layer_norm": [(6, 16), (16,), (16,), (6,), (6,)],
                "rms_norm": [(6, 16), (16,), (6,)]}


@pytest.mark.parametrize("norm", NORMS)
def test_saved_tensor_hooks_pack_and_unpack_what_the_node_saves(device, norm):
    # The hooks of torch.autograd.graph.saved_tensors_hooks (CPU offloading, compression)
    # see every tensor the node saves, and the backward uses what unpack returns: pack
    # hands over a copy in a box, so a saved tensor that bypassed unpack could not be used.
    ours = NORMS[norm][0]
    packed, unpacked = [], []

    def pack(t):
        packed.append(tuple(t.shape))
        return ("box", t.clone())

    def unpack(box):
        unpacked.append(tuple(box[1].shape))
        return box[1]

    leaves = _leaves(device, norm)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = _call(ours, leaves)
    assert packed == SAVED_SHAPES[norm]
    grads = torch.autograd.grad(y, leaves, _grad_out(device))
    assert sorted(unpacked) == sorted(packed)
    theirs = torch.autograd.grad(_call(NORMS[norm][1], leaves), leaves, _grad_out(device))
    torch.testing.assert_close(grads, theirs)


# The nodes' Python attributes for what they saved, named as NativeLayerNormBackward0's
# (the forward's outputs: result1, result2), plus the eps the double backward needs.
SAVED_NAMES = {"layer_norm": ["input", "weight", "bias", "result1", "result2"],
               "rms_norm": ["input", "weight", "result1"]}


@pytest.mark.parametrize("norm", NORMS)
def test_node_shows_what_it_saved_as_torchs_nodes_do(device, norm):
    leaves = _leaves(device, norm)
    y = _call(NORMS[norm][0], leaves)
    node = y.grad_fn
    class_name = {"layer_norm": "LayerNormBackward", "rms_norm": "RMSNormBackward"}[norm]
    assert type(node).__name__ == class_name and class_name in repr(node)
    x = leaves[0].detach()
    if norm == "layer_norm":
        _, mean, rstd = torch.ops.layernorm_ext.forward(x, NORMALIZED, *leaves[1:], 1e-5)
        statistics, eps = [mean, rstd], 1e-5
    else:
        _, rstd = torch.ops.layernorm_ext.rms_forward(x, NORMALIZED, leaves[1], None)
        statistics, eps = [rstd], torch.finfo(torch.float64).eps
    for name, expected in zip(SAVED_NAMES[norm], [*leaves, *statistics]):
        assert torch.equal(getattr(node, f"_saved_{name}"), expected), name
        assert type(getattr(node, f"_raw_saved_{name}")).__name__ == "SavedTensor"
    assert node._saved_normalized_shape == tuple(NORMALIZED) and node._saved_eps == eps
    if norm == "layer_norm":  # torch's node shows the same names (RMSNorm has none on the CPU)
        theirs = F.layer_norm(leaves[0], NORMALIZED, *leaves[1:]).grad_fn
        assert ({a for a in dir(theirs) if a.startswith(("_saved_", "_raw_saved_"))}
                <= {a for a in dir(node) if a.startswith(("_saved_", "_raw_saved_"))})
    y.sum().backward()
    with pytest.raises(RuntimeError, match="after they have already been freed"):
        node._saved_input


@pytest.mark.parametrize("norm", NORMS)
def test_hooks_on_one_saved_tensor_are_used_by_the_backward(device, norm):
    """_raw_saved_input.register_hooks, as on torch's nodes: the backward reads the input
    through the hook. Here it doubles it, which changes the gradients, as it changes those
    of torch's LayerNorm node (torch's CPU RMSNorm is composite: no node to compare)."""
    leaves = _leaves(device, norm)
    plain = torch.autograd.grad(_call(NORMS[norm][0], leaves), leaves, _grad_out(device))
    fns = NORMS[norm] if norm == "layer_norm" else NORMS[norm][:1]
    hooked = []
    for fn in fns:
        y = _call(fn, leaves)
        unpacked = []
        y.grad_fn._raw_saved_input.register_hooks(lambda t: t,
                                                   lambda t: unpacked.append(1) or 2 * t)
        hooked.append(torch.autograd.grad(y, leaves, _grad_out(device)))
        assert unpacked == [1]
    assert not torch.allclose(hooked[0][1], plain[1])
    if len(hooked) == 2:
        torch.testing.assert_close(hooked[0], hooked[1])


HOOK_READS_THE_NODE = r"""
import sys, torch, layernorm_ext
norm = getattr(layernorm_ext, sys.argv[1])
x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8, requires_grad=True)
y = norm(x, (8,), w)
node = y.grad_fn
def unpack(t):
    node._saved_weight  # a debugging hook that looks at the node
    return t
node._raw_saved_input.register_hooks(lambda t: t, unpack)
node._saved_input  # unpacks through the hook, outside the backward
y.sum().backward()  # and in it, while apply holds the node's lock
raw = norm(x, (8,), w).grad_fn._raw_saved_weight  # the graph is gone but for raw's node:
raw.register_hooks(lambda t: t, lambda t: t)  # the SavedTensor keeps it alive
"""


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_an_unpack_hook_may_read_the_node(norm, tmp_path):
    """As with torch's nodes, in a child process: the getters took the node's lock, which
    apply holds while unpack hooks run, and this hung. And a SavedTensor outlives the rest
    of its graph (torch's would point into a freed node)."""
    # (cwd: `python -c` puts it first on sys.path, where the checkout would shadow CI's
    # CPU-torch build)
    subprocess.run([sys.executable, "-c", HOOK_READS_THE_NODE, norm], check=True, timeout=120,
                   cwd=tmp_path, env=subprocess_env())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputes_and_gives_the_plain_gradients(device, norm, use_reentrant):
    # Checkpointing runs the block again in the backward. The non-reentrant form does so
    # through saved-tensor hooks, so a node that saved its tensors around them would
    # never trigger the recomputation.
    ours = NORMS[norm][0]
    leaves = _leaves(device, norm)
    calls = []

    def block(x, *params):
        calls.append(None)
        return ours(x.sin(), NORMALIZED, *params).cos()

    def grads(run):  # .backward(): the reentrant form refuses autograd.grad
        for t in leaves:
            t.grad = None
        run().backward(_grad_out(device))
        return [t.grad for t in leaves]

    plain = grads(lambda: block(*leaves))
    calls.clear()
    checkpointed = grads(lambda: checkpoint(block, *leaves, use_reentrant=use_reentrant))
    assert len(calls) == 2  # the forward, then the recomputation in the backward
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("requiring", [(0,), (1,), (2,), (0, 1), (1, 2), (0, 2)])
def test_gradients_of_any_subset_of_the_arguments(device, norm, requiring):
    # Only some arguments require grad, or all do and autograd.grad asks for a subset
    # (the node then leaves the others out): the same gradients as torch's.
    if norm == "rms_norm" and 2 in requiring:
        pytest.skip("rms_norm has no bias")
    for ask_subset in (False, True):
        results = []
        for fn in NORMS[norm]:
            leaves = [t.detach() for t in _leaves(device, norm)]
            for i, t in enumerate(leaves):
                t.requires_grad_(ask_subset or i in requiring)
            wanted = [leaves[i] for i in requiring]
            results.append(torch.autograd.grad(_call(fn, leaves), wanted, _grad_out(device)))
        torch.testing.assert_close(results[0], results[1])


FUSED_BACKWARDS = {"layer_norm": "layernorm_ext.backward.default",
                   "rms_norm": "layernorm_ext.rms_backward.default"}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("hooks", [False, True])
def test_compiled_autograd_captures_the_fused_backward(device, norm, affine, hooks):
    # torch._dynamo.compiled_autograd captures a backward graph from each node's
    # compiled_args and apply_with_saved. Ours must enter it as their fused backward op
    # (traced by AOTAutograd with the real shapes, also when saved-tensor hooks unpack the
    # saved tensors), give eager's gradients bitwise, and a second backward of the same
    # structure must reuse the captured graph.
    from torch._dynamo import compiled_autograd
    from torch._dynamo.backends.common import aot_autograd

    ours = NORMS[norm][0]
    captures, aten_graphs = [], []

    def record_aten_graph(gm, example_inputs):
        aten_graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    def compiler(gm):
        captures.append(gm)
        return torch.compile(gm, backend=aot_autograd(fw_compiler=record_aten_graph),
                             fullgraph=True)

    def clone_in_a_box(t):
        return ("box", t.clone())

    torch._dynamo.reset()  # no graph captured by an earlier test
    try:
        for seed in (0, 1):
            leaves = _leaves(device, norm, seed)[: None if affine else 1]
            eager = torch.autograd.grad(_call(ours, leaves), leaves, _grad_out(device))
            if hooks:
                with torch.autograd.graph.saved_tensors_hooks(clone_in_a_box, lambda b: b[1]):
                    y = _call(ours, leaves)
            else:
                y = _call(ours, leaves)
            with compiled_autograd._enable(compiler):
                y.backward(_grad_out(device))
            torch.testing.assert_close([t.grad for t in leaves], list(eager), rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
    assert len(captures) == 1
    assert [graph.count(FUSED_BACKWARDS[norm]) for graph in aten_graphs] == [1]


@pytest.mark.parametrize("norm", NORMS)
def test_compiled_autograd_reuses_a_graph_only_where_the_result_would_not_change(device, norm):
    # One compiled-autograd cache over backwards that differ in what could be baked into a
    # captured graph: the batch, the gradients asked for, create_graph (whose backward
    # reads eps: a graph reused across eps would give the first eps's gradients). Each
    # must give eager's gradients.
    from torch._dynamo import compiled_autograd

    ours = NORMS[norm][0]
    # (rows, eps, which leaves autograd.grad asks for, create_graph)
    cases = [(6, 1e-5, (0, 1), False), (9, 1e-5, (0, 1), False), (6, 1e-5, (1,), False),
             (6, 1e-5, (0,), False), (6, 1e-5, (0, 1), True), (6, 0.5, (0, 1), True)]

    def grads(rows, eps, wanted, create_graph):
        g = torch.Generator().manual_seed(rows)
        x, grad_out = (torch.randn(rows, *NORMALIZED, generator=g, dtype=torch.float64)
                       .to(device) for _ in range(2))
        leaves = [x.requires_grad_(), *_leaves(device, norm)[1:]]
        y = ours(leaves[0], NORMALIZED, *leaves[1:], eps=eps)
        return torch.autograd.grad(y, [leaves[i] for i in wanted], grad_out,
                                   create_graph=create_graph)

    torch._dynamo.reset()
    try:
        for case in cases:
            eager = grads(*case)
            with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
                compiled = grads(*case)
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0,
                                       msg=lambda m, case=case: f"{case}: {m}")
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("norm", NORMS)
def test_compiled_autograd_across_hidden_sizes(device, norm):
    # Backwards of other hidden sizes under one compiled-autograd cache: each gives eager's
    # gradients bitwise (a graph reused with the first size baked in would not), and the
    # node's normalized_shape, SymInts as in torch's nodes, makes no more graphs than
    # torch's function does (one: the sizes become graph inputs).
    from torch._dynamo import compiled_autograd

    def grads(function, hidden):
        g = torch.Generator().manual_seed(hidden)
        x, weight, bias, grad_out = (torch.randn(shape, generator=g, dtype=torch.float64)
                                     .to(device) for shape in ((5, hidden), (hidden,),
                                                                (hidden,), (5, hidden)))
        leaves = [x, weight, bias][: 3 if norm == "layer_norm" else 2]
        for leaf in leaves:
            leaf.requires_grad_()
        return torch.autograd.grad(function(x, (hidden,), *leaves[1:]), leaves, grad_out)

    def captured_graphs(function, check_against_eager):
        captures = []

        def compiler(gm):
            captures.append(gm)
            return torch.compile(gm, backend="aot_eager", fullgraph=True)

        torch._dynamo.reset()
        try:
            for hidden in (8, 12, 20, 12):
                eager = grads(function, hidden)
                with compiled_autograd._enable(compiler):
                    compiled = grads(function, hidden)
                if check_against_eager:
                    torch.testing.assert_close(compiled, eager, rtol=0, atol=0,
                                               msg=lambda m, hidden=hidden: f"hidden {hidden}: {m}")
        finally:
            torch._dynamo.reset()
        return len(captures)

    ours, theirs = NORMS[norm]
    assert 1 <= captured_graphs(ours, check_against_eager=True) <= captured_graphs(theirs, False)


@pytest.mark.parametrize("norm", NORMS)
def test_anomaly_mode_names_the_node_and_its_forward(device, norm):
    # detect_anomaly checks each node's outputs: a NaN gradient raises naming our node,
    # with a warning that shows the forward call that created it (stored by the node).
    ours = NORMS[norm][0]
    leaves = _leaves(device, norm)
    with torch.autograd.detect_anomaly(check_nan=True):
        y = _call(ours, leaves)
        grad_out = torch.full_like(y, float("nan"))
        with pytest.warns(UserWarning, match=r"(?s)Error detected in layernorm_ext::\w+Backward"
                                             r".*Traceback of forward call.*_call\(ours"):
            with pytest.raises(RuntimeError, match=r"layernorm_ext::\w+Backward.*returned nan"):
                y.backward(grad_out)


LONG_CHAIN = """
import torch, layernorm_ext
x = torch.randn(1, 4, requires_grad=True)
y = x
for _ in range(100_000):
    y = layernorm_ext.{norm}(y, (4,))
print(y.grad_fn.name())
del y  # frees the whole chain of nodes
print("freed")
"""


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_a_long_chain_of_nodes_is_freed_without_deep_recursion(norm, tmp_path):
    """Freeing 100000 of our nodes in a row must not recurse once per node, which overflows
    the stack: the nodes need torch's deleter (csrc/autograd_common.h; on torch 2.11, which
    holds nodes in std::shared_ptr, the default deleter would recurse). In a subprocess, so
    that a crash fails this test rather than the session."""
    # Run from elsewhere: from the repository root, `python -c` would import the source
    # tree's layernorm_ext rather than the one under test (the CPU-only build of CI).
    run = subprocess.run([sys.executable, "-c", LONG_CHAIN.format(norm=norm)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [
        {"layer_norm": "layernorm_ext::LayerNormBackward",
         "rms_norm": "layernorm_ext::RMSNormBackward"}[norm], "freed"]
