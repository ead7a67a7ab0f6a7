// The Python module layernorm_ext._C. Loading it runs the operators' static registrations
// (layernorm.cpp and the backends); the module itself holds the backward nodes' Python
// classes (autograd_python.h), the forward ops' eager entry points and two queries.
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

#include "autograd_python.h"
#include "layernorm.h"
#include "op_calls.h"

namespace layernorm_ext {
namespace {

// The eager entry points: layer_norm and rms_norm (ops.py) first hand their arguments,
// as the caller gave them, to these, which call the forward op through the dispatcher
// (autograd, autocast, dispatch modes, the profiler and the JIT tracer see it as always).
// They take only the common call, for which layer_norm's Python checks would find nothing
// to do: plain tensors, a tuple, list or int of sizes, a float eps, no torch function
// mode or functorch transform. For anything else they return NotImplemented, and ops.py
// goes its long way (its checks, then torch.ops, which takes symbolic sizes and raises
// torch's errors). torch.ops parses its arguments against the schema into a stack of
// IValues and returns every output: with layer_norm's checks, ~2.5 us more a call than
// this at the seed's 100x20. ops.py does not call these under torch.compile (Dynamo
// would break the graph at an unknown builtin) or while forward AD is active.

// torch.Tensor or nn.Parameter (torch's THPVariable_CheckExact): types that take no
// __torch_function__ of their own, and not nested (ops.py handles those).
bool is_plain_tensor(PyObject* arg) {
  return THPVariable_CheckExact(arg) && !THPVariable_Unpack(arg).is_nested();
}

bool is_plain_optional_tensor(PyObject* arg) { return arg == Py_None || is_plain_tensor(arg); }

std::optional<at::Tensor> optional_tensor(PyObject* arg) {
  if (arg == Py_None) return std::nullopt;
  return THPVariable_Unpack(arg);
}

// The pending skip; torch 2.13 has the flag (torch 2.11, the GPU machines' image, does
// not, and there no call sets one).
template <typename TLS = at::impl::PythonTorchFunctionTLS>
bool skip_next_pending() {
  if constexpr (requires { TLS::peek_skip_next(); }) {
    return TLS::peek_skip_next();
  } else {
    return false;
  }
}

// Nothing that layer_norm's Python would hand to another implementation, or would change
// by checking: no torch function mode (a TorchFunctionMode, torch.set_default_device's),
// no pending skip of one __torch_function__ hop (torch.overrides.redispatch_function sets
// it for the next has_torch_function check, which the Python makes and so consumes), and
// no functorch transform (vmap, grad, jvp: their wrapped tensors are plain to Python).
// This mirrors what torch's has_torch_function reads of its thread-local state, with the
// argument types (is_plain_tensor), and torch._C._are_functorch_transforms_active.
bool no_override_active() {
  if (at::impl::torch_function_mode_enabled() || skip_next_pending()) return false;
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return !included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// An int, or a tuple or list of ints (int subclasses too, not bool), within int64 and
// above -2^62 (plain c10::SymInts).
bool read_sizes(PyObject* arg, c10::SmallVector<int64_t, 4>& sizes) {
  const auto read = [&sizes](PyObject* item) {
    if (!PyLong_Check(item) || PyBool_Check(item)) return false;
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
    sizes.push_back(value);
    // Below -2^62 a c10::SymInt is no plain int (the range that marks a symbolic one).
    return overflow == 0 && c10::SymInt::check_range(value);
  };
  if (PyLong_Check(arg)) return read(arg);  // layer_norm(x, 768), as nn.LayerNorm takes it
  const bool tuple = PyTuple_Check(arg);
  if (!tuple && !PyList_Check(arg)) return false;
  const Py_ssize_t size = tuple ? PyTuple_GET_SIZE(arg) : PyList_GET_SIZE(arg);
  for (Py_ssize_t i = 0; i < size; ++i) {
    if (!read(tuple ? PyTuple_GET_ITEM(arg, i) : PyList_GET_ITEM(arg, i))) return false;
  }
  return true;
}

void check_arg_count(Py_ssize_t given, Py_ssize_t expected, const char* function) {
  TORCH_CHECK_TYPE(given == expected, "layernorm_ext._C.", function, "() takes ", expected,
                   " positional arguments but ", given, " were given");
}

// The first output of `call(args...)`, made with the GIL released as torch's own bindings
// do.
template <typename Call, typename... Args>
PyObject* wrapped_output(Call call, const Args&... args) {
  at::Tensor output;
  {
    pybind11::gil_scoped_release no_gil;
    output = std::get<0>(call(args...));
  }
  return THPVariable_Wrap(std::move(output));
}

// forward_output(input, normalized_shape, weight, bias, eps): layer_norm's output, or
// NotImplemented.
PyObject* forward_output(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_arg_count(nargs, 5, "forward_output");
  c10::SmallVector<int64_t, 4> normalized_shape;
  if (!is_plain_tensor(args[0]) || !read_sizes(args[1], normalized_shape) ||
      !is_plain_optional_tensor(args[2]) || !is_plain_optional_tensor(args[3]) ||
      !PyFloat_CheckExact(args[4]) || !no_override_active()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const auto weight = optional_tensor(args[2]);
  const auto bias = optional_tensor(args[3]);
  const double eps = PyFloat_AS_DOUBLE(args[4]);
  return wrapped_output(call_forward, input, c10::fromIntArrayRefUnchecked(normalized_shape),
                        weight, bias, eps);
  END_HANDLE_TH_ERRORS
}

// rms_forward_output(input, normalized_shape, weight, eps): rms_norm's output (eps None or
// a float), or NotImplemented.
PyObject* rms_forward_output(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_arg_count(nargs, 4, "rms_forward_output");
  c10::SmallVector<int64_t, 4> normalized_shape;
  if (!is_plain_tensor(args[0]) || !read_sizes(args[1], normalized_shape) ||
      !is_plain_optional_tensor(args[2]) || (args[3] != Py_None && !PyFloat_CheckExact(args[3])) ||
      !no_override_active()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const auto weight = optional_tensor(args[2]);
  // Only the dtypes the kernels pair: rms_norm casts other weights, and hands complex
  // input or a weight of no kernel dtype to torch's rms_norm.
  if (!is_kernel_dtype(input.scalar_type()) ||
      (weight && !kernels_pair(input.scalar_type(), weight->scalar_type()))) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const std::optional<double> eps =
      args[3] == Py_None ? std::nullopt : std::optional<double>(PyFloat_AS_DOUBLE(args[3]));
  return wrapped_output(call_rms_forward, input,
                        c10::fromIntArrayRefUnchecked(normalized_shape), weight, eps);
  END_HANDLE_TH_ERRORS
}

PyObject* cpu_kernels_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(layernorm_ext::cpu_kernels_isa());
}

PyObject* stream_threshold_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(layernorm_ext::stream_threshold_bytes());
}

PyObject* stream_threshold_warning(PyObject*, PyObject*) {
  // The variable's bytes need not be UTF-8: shown as \xNN escapes, not an import error.
  const std::string& warning = layernorm_ext::stream_threshold_warning();
  return PyUnicode_DecodeUTF8(warning.data(), static_cast<Py_ssize_t>(warning.size()),
                              "backslashreplace");
}

}  // namespace
}  // namespace layernorm_ext

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  using namespace layernorm_ext;
  // METH_FASTCALL functions are stored as PyCFunction, through a cast to a generic pointer.
  const auto fastcall = [](auto function) {
    return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(function));
  };
  static PyMethodDef methods[] = {
      {"forward_output", fastcall(forward_output), METH_FASTCALL,
       "forward_output(input, normalized_shape, weight, bias, eps): layer_norm's common "
       "eager call, the output of torch.ops.layernorm_ext.forward; NotImplemented for any "
       "other call."},
      {"rms_forward_output", fastcall(rms_forward_output), METH_FASTCALL,
       "rms_forward_output(input, normalized_shape, weight, eps): rms_norm's common eager "
       "call, the output of torch.ops.layernorm_ext.rms_forward; NotImplemented for any "
       "other call."},
      {"cpu_kernels_isa", cpu_kernels_isa, METH_NOARGS,
       "The instruction set of the CPU kernels: AVX512, AVX2 or DEFAULT."},
      {"stream_threshold_bytes", stream_threshold_bytes, METH_NOARGS,
       "Outputs of at least this many bytes the CPU kernels write past the cache."},
      {"stream_threshold_warning", stream_threshold_warning, METH_NOARGS,
       "Empty, or why LAYERNORM_EXT_STREAM_BYTES was ignored."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  try {
    add_layer_norm_backward_class(module);
    add_rms_norm_backward_class(module);
  } catch (const std::exception& e) {
    Py_DECREF(module);
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return module;
}
