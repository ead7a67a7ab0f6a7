"""A table of invalid calls: each must fail as torch.nn.functional.layer_norm fails (and, run
for RMSNorm, rms_norm as F.rms_norm).

"As torch" means: where torch raises, ours raises an instance of torch's exception class
(so ``except <torch's class>`` still catches it) with torch's message where the case
says so, or else a message containing the case's key phrase; where torch returns (meta
tensors: shape inference), ours returns a tensor of the same shape, dtype and device.

The table runs in subprocesses (this file run as a script, one process per device,
restarted after a crash), so a segfault or abort is a failure of the case that caused
it instead of the end of the test session.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Callable

import numpy as np
import pytest
import torch

from layernorm_cases import subprocess_env, with_kernel_name

SAME_DEVICE = "Expected all tensors to be on the same device"
NOT_FLOAT = "must be float32, float64, float16 or bfloat16"
NO_KERNEL = "Could not run 'layernorm_ext::forward'"

@dataclasses.dataclass(frozen=True)
class BadCall:
    """``call(f, device)`` calls f (ours or torch's layer_norm) with the bad arguments."""

    call: Callable
    same_message: bool = False  # ours' first message line equals torch's
    phrase: str = ""  # else: ours' message contains this
    rms_phrase: str = ""  # rms_norm's, where it is not phrase
    devices: tuple[str, ...] = ("cpu", "cuda")
    bug: str = ""  # a known deviation: the case is a strict xfail


def x_on(device, dtype=torch.float32, shape=(4, 8)):
    return torch.randn(shape).to(device, dtype)


def ones(device, n=8, dtype=torch.float32):
    return torch.ones(n, device=device, dtype=dtype)


@functools.cache  # one tensor for torch's call and ours: same ragged size symbol
def nested(device, layout=torch.strided):
    return torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)], layout=layout,
                                      device=device)


META = ("cpu",)  # meta cases do not depend on the device under test: run them once

CASES: dict[str, BadCall] = {
    # dtypes
    **{f"input_{dt}": BadCall(lambda f, d, dt=dt: f(x_on(d).to(getattr(torch, dt)), [8]),
                              phrase=NOT_FLOAT)
       for dt in ("int64", "int32", "uint8", "bool", "complex64", "float8_e4m3fn")},
    "weight_int64": BadCall(lambda f, d: f(x_on(d), [8], ones(d, dtype=torch.int64)),
                            phrase="weight " + NOT_FLOAT),
    # rms_norm: torch's refusal (its composite does not promote float8), not a cast
    "weight_float8_e4m3fn": BadCall(
        lambda f, d: f(x_on(d), [8], ones(d, dtype=torch.float8_e4m3fn)),
        phrase="weight " + NOT_FLOAT, rms_phrase="Promotion for Float8 Types is not supported"),
    "bias_complex64": BadCall(lambda f, d: f(x_on(d), [8], None, ones(d, dtype=torch.complex64)),
                              phrase="bias " + NOT_FLOAT),
    "weight_float64_for_float32": BadCall(
        lambda f, d: f(x_on(d), [8], ones(d, dtype=torch.float64)), phrase="mixed dtype"),
    "weight_float16_for_float32": BadCall(
        lambda f, d: f(x_on(d), [8], ones(d, dtype=torch.float16)), phrase="mixed dtype"),
    "bias_float64_for_float32": BadCall(
        lambda f, d: f(x_on(d), [8], None, ones(d, dtype=torch.float64)), phrase="mixed dtype"),
    "weight_float32_for_float64": BadCall(
        lambda f, d: f(x_on(d, torch.float64), [8], ones(d)), phrase="mixed dtype"),
    "weight_bfloat16_for_float16": BadCall(
        lambda f, d: f(x_on(d, torch.float16), [8], ones(d, dtype=torch.bfloat16)),
        phrase="mixed dtype"),
    "weight_float32_bias_bfloat16": BadCall(
        lambda f, d: f(x_on(d, torch.bfloat16), [8], ones(d), ones(d, dtype=torch.bfloat16)),
        phrase="mixed dtype"),
    # devices
    "weight_on_meta": BadCall(lambda f, d: f(x_on(d), [8], ones("meta")), phrase=SAME_DEVICE),
    "bias_on_meta": BadCall(lambda f, d: f(x_on(d), [8], None, ones("meta")),
                            phrase=SAME_DEVICE),
    "input_on_meta_weight_on_device": BadCall(lambda f, d: f(x_on("meta"), [8], ones(d)),
                                              phrase=SAME_DEVICE),
    "weight_on_cpu_input_on_cuda": BadCall(lambda f, d: f(x_on(d), [8], ones("cpu")),
                                           phrase=SAME_DEVICE, devices=("cuda",)),
    # meta tensors alone: shape inference, as torch's
    "meta_float32": BadCall(lambda f, d: f(x_on("meta"), [8], ones("meta"), ones("meta")),
                            devices=META),
    "meta_float64_no_params": BadCall(lambda f, d: f(x_on("meta", torch.float64), [8]),
                                      devices=META),
    "meta_bfloat16_float32_params": BadCall(
        lambda f, d: f(x_on("meta", torch.bfloat16, (2, 3, 8)), [3, 8], ones("meta", (3, 8)),
                       ones("meta", (3, 8))), devices=META),
    "meta_wrong_trailing_shape": BadCall(lambda f, d: f(x_on("meta"), [7]), phrase="[*, 7]",
                                         devices=META),
    "meta_empty_normalized_shape": BadCall(lambda f, d: f(x_on("meta"), []),
                                           same_message=True, devices=META),
    "meta_wrong_weight_shape": BadCall(lambda f, d: f(x_on("meta"), [8], ones("meta", 7)),
                                       phrase="Expected weight to be of same shape",
                                       devices=META),
    "meta_weight_and_input_shape": BadCall(lambda f, d: f(x_on("meta"), [7], ones("meta")),
                                           phrase="Expected weight to be of same shape",
                                           devices=META),
    "meta_int64_input": BadCall(lambda f, d: f(x_on("meta", torch.int64), [8]),
                                phrase=NOT_FLOAT, devices=META),
    # layouts without a kernel
    "sparse_coo_input": BadCall(lambda f, d: f(x_on(d).to_sparse(), [8]), phrase=NO_KERNEL),
    "sparse_csr_input": BadCall(lambda f, d: f(x_on(d).to_sparse_csr(), [8]), phrase=NO_KERNEL),
    "sparse_weight": BadCall(lambda f, d: f(x_on(d), [8], ones(d).to_sparse()),
                             phrase=NO_KERNEL),
    "quantized_input": BadCall(
        lambda f, d: f(torch.quantize_per_tensor(x_on(d), 0.1, 0, torch.qint8), [8]),
        phrase=NO_KERNEL, devices=("cpu",)),
    # (torch's rms_norm fails with an internal error here; ours names the layout it takes)
    "nested_input_no_params": BadCall(lambda f, d: f(nested(d), [8]), devices=("cpu",),
                                      phrase="NestedTensor layer_norm requires weight and bias",
                                      rms_phrase="nested tensors need layout=torch.jagged"),
    "nested_jagged_input": BadCall(lambda f, d: f(nested(d, torch.jagged), [8], ones(d),
                                                  ones(d)), devices=("cpu",)),
    # shapes
    "trailing_shape_mismatch": BadCall(lambda f, d: f(x_on(d), [7]), same_message=True),
    "more_normalized_dims_than_input": BadCall(lambda f, d: f(x_on(d), [2, 4, 8]),
                                               same_message=True),
    "empty_normalized_shape": BadCall(lambda f, d: f(x_on(d), []), same_message=True),
    "zero_dim_input_empty_shape": BadCall(lambda f, d: f(x_on(d, shape=()), []),
                                          same_message=True),
    "zero_dim_input_shape_1": BadCall(lambda f, d: f(x_on(d, shape=()), [1]),
                                      same_message=True),
    "negative_size": BadCall(lambda f, d: f(x_on(d), [-8]), same_message=True),
    "negative_one_size": BadCall(lambda f, d: f(x_on(d), [-1]), same_message=True),
    "negative_inner_size": BadCall(lambda f, d: f(x_on(d), [4, -8]), same_message=True),
    "huge_size": BadCall(lambda f, d: f(x_on(d), [2**62]), same_message=True),
    "weight_shape": BadCall(lambda f, d: f(x_on(d), [8], ones(d, 7)), same_message=True),
    "bias_shape": BadCall(lambda f, d: f(x_on(d), [8], None, ones(d, 7)), same_message=True),
    "weight_2d": BadCall(lambda f, d: f(x_on(d), [8], ones(d, (1, 8))), same_message=True),
    "weight_0d": BadCall(lambda f, d: f(x_on(d), [8], ones(d, ())), same_message=True),
    # two faults: torch checks the parameters' shapes before the input's
    "weight_and_input_shape": BadCall(lambda f, d: f(x_on(d), [7], ones(d)), same_message=True),
    "bias_and_input_shape": BadCall(lambda f, d: f(x_on(d), [7], None, ones(d)),
                                    same_message=True),
    "weight_shape_and_input_dims": BadCall(lambda f, d: f(x_on(d), [2, 4, 8], ones(d)),
                                           same_message=True),
    # 1 PiB: more than a 47-bit address space, so no overcommit setting lets it through.
    "output_too_large_to_allocate": BadCall(
        lambda f, d: f(torch.zeros(1, 8, device=d).expand(2**45, 8), [8]),
        phrase="allocate", devices=("cpu",)),
    # arguments that are not what the signature says
    "input_list": BadCall(lambda f, d: f([[1.0] * 8], [8]), devices=META, same_message=True),
    "input_none": BadCall(lambda f, d: f(None, [8]), devices=META, same_message=True),
    "normalized_shape_float": BadCall(lambda f, d: f(x_on(d), 8.0), same_message=True),
    "normalized_shape_none": BadCall(lambda f, d: f(x_on(d), None), same_message=True),
    "normalized_shape_float_list": BadCall(lambda f, d: f(x_on(d), [8.0]), same_message=True),
    "normalized_shape_bool_list": BadCall(lambda f, d: f(x_on(d), [True]), same_message=True),
    "normalized_shape_bool_tensor_list": BadCall(lambda f, d: f(x_on(d), [torch.tensor(True)]),
                                                 same_message=True),
    "normalized_shape_str": BadCall(lambda f, d: f(x_on(d), "8"), same_message=True),
    "normalized_shape_tensor": BadCall(lambda f, d: f(x_on(d), torch.tensor([8])),
                                       same_message=True),
    # torch's message: "failed to unpack the object at pos 1", and a C++ backtrace
    "normalized_shape_overflow": BadCall(lambda f, d: f(x_on(d), [2**63]),
                                         phrase="at pos 0 does not fit in int64"),
    # Below -2^62 a size is no plain c10::SymInt: torch's layer_norm refuses it with the
    # dispatcher's error (its source line and "expected to contain only concrete
    # integers"), and so do ours (SymInt[] schemas, as torch's); torch's composite
    # rms_norm checks the shape before its sizes become ints and gives its shape error.
    "normalized_shape_below_plain_symints": BadCall(
        lambda f, d: f(x_on(d), [-(2**62) - 5]),
        phrase="SymIntArrayRef expected to contain only concrete integers"),
    "normalized_shape_numpy_int": BadCall(lambda f, d: f(x_on(d), np.int64(8)),
                                          same_message=True),
    "normalized_shape_numpy_float_list": BadCall(lambda f, d: f(x_on(d), [np.float64(8)]),
                                                 same_message=True),
    "normalized_shape_float_tensor_list": BadCall(lambda f, d: f(x_on(d), [torch.tensor(8.0)]),
                                                  same_message=True),
    "weight_list": BadCall(lambda f, d: f(x_on(d), [8], [1.0] * 8), same_message=True),
    "weight_float": BadCall(lambda f, d: f(x_on(d), [8], 1.0), same_message=True),
    "bias_int": BadCall(lambda f, d: f(x_on(d), [8], None, 2), same_message=True),
    "eps_str": BadCall(lambda f, d: f(x_on(d), [8], None, None, "1e-5"), same_message=True),
    "eps_none": BadCall(lambda f, d: f(x_on(d), [8], None, None, None), same_message=True),
    "eps_complex": BadCall(lambda f, d: f(x_on(d), [8], None, None, 1e-5 + 0j),
                           same_message=True),
    "eps_numpy_array": BadCall(lambda f, d: f(x_on(d), [8], None, None, np.array(1e-5)),
                               same_message=True),
    "eps_one_dim_tensor": BadCall(lambda f, d: f(x_on(d), [8], None, None, torch.tensor([1e-5])),
                                  same_message=True),
    "eps_complex_tensor": BadCall(lambda f, d: f(x_on(d), [8], None, None, torch.tensor(1 + 1j)),
                                  same_message=True),
    "eps_tensor_requiring_grad": BadCall(
        lambda f, d: f(x_on(d), [8], None, None, torch.tensor(1e-5, requires_grad=True)),
        same_message=True),
    # What torch's parser takes for a float: the call returns (tests/test_ops.py checks
    # that the value is used).
    "eps_bool": BadCall(lambda f, d: f(x_on(d), [8], None, None, True)),
    "eps_numpy_float32": BadCall(lambda f, d: f(x_on(d), [8], None, None, np.float32(1e-5))),
    "eps_zero_dim_tensor": BadCall(lambda f, d: f(x_on(d), [8], None, None, torch.tensor(1e-5))),
    # Not test cases: they kill or hang the process, for the runner's own test.
    "_abort": BadCall(lambda f, d: os.abort(), devices=()),
    "_hang": BadCall(lambda f, d: time.sleep(3600), devices=()),
}


# Cases that have no RMSNorm counterpart, and why.
LAYER_NORM_ONLY = {
    "bias_shape": "RMSNorm has no bias",
    "bias_complex64": "RMSNorm has no bias",
    "bias_float64_for_float32": "RMSNorm has no bias",
    "bias_on_meta": "RMSNorm has no bias",
    "bias_int": "RMSNorm has no bias",
    "bias_and_input_shape": "RMSNorm has no bias",
    "weight_float32_bias_bfloat16": "RMSNorm has no bias",
    "nested_jagged_input": "passes a bias (tests/test_rms_norm.py has the jagged case)",
}
# Known deviations of rms_norm from F.rms_norm (strict xfails; none today: complex input and
# integer weights, which torch's composite computes, go to torch's own rms_norm).
RMS_DEVIATIONS: dict[str, str] = {}


def outcome(fn: Callable[[], torch.Tensor]) -> dict:
    """What a call did: the exception it raised, or what it returned."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sparse/nested/quantized "beta" warnings
            result = fn()
    except Exception as error:  # noqa: BLE001 - recording any exception is the point
        return {"raised": type(error).__name__,
                "classes": [cls.__name__ for cls in type(error).__mro__],
                "message": str(error).strip().splitlines()[0] if str(error).strip() else ""}
    # Sizes as strings: a nested tensor's are symbolic (not JSON).
    return {"returned": [[str(size) for size in result.shape], str(result.dtype),
                         str(result.device)]}


def as_rms_norm(rms_norm: Callable) -> Callable:
    """A layer_norm-shaped call of an rms_norm: the cases' bias (always None in the cases
    run for RMSNorm) is dropped, eps passed on."""
    def call(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        return rms_norm(input, normalized_shape, weight, eps)
    return call


def run_cases(device: str, names: list[str], norm: str = "layer") -> None:
    """The subprocess side: one JSON line as each case starts and as it ends."""
    import torch.nn.functional as F

    import layernorm_ext

    if norm == "rms":
        theirs, ours = as_rms_norm(F.rms_norm), as_rms_norm(layernorm_ext.rms_norm)
    else:
        theirs, ours = F.layer_norm, layernorm_ext.layer_norm
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        case = CASES[name]
        record = {"case": name,
                  "torch": outcome(lambda: case.call(theirs, device)),
                  "ours": outcome(lambda: case.call(ours, device))}
        print(json.dumps(record), flush=True)


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def run_table(device: str, names: list[str], timeout: float = 120,
              norm: str = "layer") -> dict[str, dict]:
    """Every named case's record. A case that kills or hangs its process gets
    {"crashed": exit status or "timeout"} and the cases after it run in a new process."""
    pending = list(names)
    results: dict[str, dict] = {}
    while pending:
        try:
            proc = subprocess.run([sys.executable, __file__, f"--norm={norm}", device, *pending],
                                  capture_output=True, text=True, timeout=timeout,
                                  env=subprocess_env())
            stdout, stderr, status = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as expired:
            stdout, stderr, status = _text(expired.stdout), _text(expired.stderr), "timeout"
        started = None
        for line in stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                results[record["case"]] = record
        unfinished = [name for name in pending if name not in results]
        if status != 0 or unfinished:
            died = {"crashed": status, "stderr": stderr[-2000:]}
            if not unfinished:  # died after its last case (at exit): blame them all
                results.update({name: died for name in pending})
            else:
                results[started if started in unfinished else unfinished[0]] = died
        pending = [name for name in pending if name not in results]
    return results


@functools.lru_cache(maxsize=None)
def table_results(device: str, norm: str = "layer") -> dict[str, dict]:
    names = [name for name, case in CASES.items() if device in case.devices
             and (norm == "layer" or name not in LAYER_NORM_ONLY)]
    return run_table(device, names, norm=norm)


def case_param(name: str, case: BadCall, norm: str):
    bug = case.bug if norm == "layer" else RMS_DEVIATIONS.get(name, "")
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(name, norm, id=name if norm == "layer" else f"{name}-rms", marks=marks)


@pytest.mark.parametrize("name,norm", [case_param(n, c, norm) for norm in ("layer", "rms")
                                       for n, c in CASES.items() if not n.startswith("_")])
def test_bad_call_fails_as_torch(device, name, norm):
    """Each case for layer_norm vs F.layer_norm and for rms_norm vs F.rms_norm."""
    case = CASES[name]
    if device not in case.devices:
        pytest.skip(f"runs on {', '.join(case.devices)} only")
    if norm == "rms" and name in LAYER_NORM_ONLY:
        pytest.skip(LAYER_NORM_ONLY[name])
    record = table_results(device, norm)[name]
    assert "crashed" not in record, (
        f"the process died with exit status {record.get('crashed')}:\n{record.get('stderr')}")
    theirs, ours = record["torch"], record["ours"]
    if "returned" in theirs:
        assert ours == theirs, f"torch returned {theirs['returned']}, ours: {ours}"
        return
    assert "raised" in ours, f"torch raised {theirs['raised']}, ours returned {ours['returned']}"
    assert theirs["raised"] in ours["classes"], (
        f"torch raised {theirs['raised']}: {theirs['message']}\n"
        f"ours raised {ours['raised']}: {ours['message']}")
    assert case.same_message or case.phrase, "a case that raises must say what ours says"
    if case.same_message:
        assert ours["message"] == theirs["message"]
    elif norm == "rms":  # rms_norm: torch's message, else the case's phrase
        phrase = case.rms_phrase or case.phrase.replace("::forward", "::rms_forward")
        assert (ours["message"] in (theirs["message"],
                                    with_kernel_name(theirs["message"], "rms_norm"))
                or phrase in ours["message"]), (
            f"{ours['message']!r}: neither torch's ({theirs['message']!r}) nor {phrase!r}")
    else:
        assert case.phrase in ours["message"], ours["message"]


def test_a_crash_or_hang_is_reported_as_a_failure_of_its_case():
    """The runner itself: a case that kills or hangs its process is blamed, and the rest
    still run."""
    results = run_table("cpu", ["trailing_shape_mismatch", "_abort", "negative_size"])
    assert results["_abort"]["crashed"] < 0  # killed by SIGABRT
    for name in ("trailing_shape_mismatch", "negative_size"):
        assert results[name]["ours"]["raised"] == "RuntimeError"
    # After a hang, the same path as after a crash runs the rest.
    assert run_table("cpu", ["_hang"], timeout=5)["_hang"]["crashed"] == "timeout"


if __name__ == "__main__":
    norm_flag, device_arg, *case_names = sys.argv[1:]
    run_cases(device_arg, case_names, norm_flag.removeprefix("--norm="))
