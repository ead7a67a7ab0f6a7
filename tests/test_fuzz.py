"""Property-based tests: random calls of layer_norm against a high-precision reference.

hypothesis draws the leading shape (0-size and 1 included), the normalized shape (1-D
sizes around the vector widths, or 2-3 small dims, 0 included), the dtypes (fp32/fp64/
fp16/bf16, and fp32 parameters with fp16/bf16 input), the memory layout of the input,
grad_out and parameters (offset, transposed, sliced, expanded, broadcast), which of
weight/bias exist, whether the input needs a gradient, eps and the value range. Output
and the three gradients must be within 2x torch's own error (plus a few ulps) of the
reference (see layernorm_cases.reference_errors).

Runs are reproducible: derandomize=True fixes the examples, and a failure prints the
falsifying Case, which layernorm_cases.check_case(case, device) replays alone.
LAYERNORM_EXT_FUZZ_EXAMPLES raises the number of examples for a longer local run.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layernorm_cases import (BOUNDARY_CASES, DTYPE_PAIRS, EPS_VALUES,
                             EXTENDED_PRECISION_AVAILABLE, LAYOUTS, ROW_SIZES, VALUE_RANGES, Case,
                             check_case, extended_precision_reference, input_layouts,
                             make_inputs, subprocess_env)

EXAMPLES = int(os.environ.get("LAYERNORM_EXT_FUZZ_EXAMPLES", "250"))

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written into the work tree; derandomize makes runs repeatable
    print_blob=True,
    # `device` is a parametrized fixture: constant across the examples of one test.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

leading_shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)
normalized_shapes = st.one_of(
    st.sampled_from(ROW_SIZES).map(lambda n: (n,)),
    st.lists(st.integers(0, 6), min_size=2, max_size=3).map(tuple),
)


@st.composite
def cases(draw) -> Case:
    leading = draw(leading_shapes)
    dtype, param_dtype = draw(st.sampled_from(DTYPE_PAIRS))
    scale, offset = draw(st.sampled_from(VALUE_RANGES))
    return Case(
        leading=leading,
        normalized=draw(normalized_shapes),
        dtype=dtype,
        param_dtype=param_dtype,
        x_layout=draw(st.sampled_from(input_layouts(leading))),
        grad_layout=draw(st.sampled_from(LAYOUTS)),
        param_layout=draw(st.sampled_from(LAYOUTS)),
        has_weight=draw(st.booleans()),
        has_bias=draw(st.booleans()),
        input_requires_grad=draw(st.sampled_from([True, True, True, False])),
        eps=draw(st.sampled_from(EPS_VALUES)),
        scale=scale,
        offset=offset,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@FUZZ_SETTINGS
@given(case=cases())
def test_random_calls_match_reference(device, case):
    check_case(case, device)


@pytest.mark.parametrize("case", BOUNDARY_CASES,
                         ids=lambda c: f"{list(c.leading)}x{list(c.normalized)}")
def test_kernel_boundary_shapes_match_reference(device, case):
    check_case(case, device)


# RMSNorm runs the same kernels (Norm::kRms): the same cases, bias ignored, fewer of them.
@settings(FUZZ_SETTINGS, max_examples=max(1, EXAMPLES // 2))
@given(case=cases())
def test_random_rms_calls_match_reference(device, case):
    check_case(dataclasses.replace(case, norm="rms"), device)


@pytest.mark.parametrize("case", BOUNDARY_CASES,
                         ids=lambda c: f"{list(c.leading)}x{list(c.normalized)}")
def test_kernel_boundary_shapes_match_reference_rms(device, case):
    check_case(dataclasses.replace(case, norm="rms"), device)


@pytest.mark.skipif(not EXTENDED_PRECISION_AVAILABLE, reason="numpy long double is float64 here")
@pytest.mark.parametrize("normalized", [(7,), (64,), (3, 5)], ids=str)
def test_extended_precision_reference_agrees_with_torch_float64(normalized):
    """The float64 cases' reference is the LayerNorm math (same results as torch's)."""
    case = Case(leading=(4, 3), normalized=normalized, dtype=torch.float64,
                param_dtype=torch.float64, seed=3)
    x, weight, bias, grad_out = make_inputs(case, "cpu")
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    output = F.layer_norm(leaves[0], normalized, leaves[1], leaves[2], case.eps)
    output.backward(grad_out)
    expected = [output.detach()] + [t.grad for t in leaves]
    got = extended_precision_reference(x, weight, bias, grad_out, normalized, case.eps)
    for name, e, g in zip(["output", "grad_input", "grad_weight", "grad_bias"], expected, got):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12, msg=name)


def test_fuzz_cases_script_runs(device):
    """tests/fuzz_cuda_cases.py (the compute-sanitizer entry point) keeps working."""
    script = os.path.join(os.path.dirname(__file__), "fuzz_cuda_cases.py")
    proc = subprocess.run([sys.executable, script, "--device", device, "--cases", "5"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Every case once per norm (LayerNorm, RMSNorm).
    assert f"{2 * (len(BOUNDARY_CASES) + 5)} passed, 0 failed" in proc.stdout
