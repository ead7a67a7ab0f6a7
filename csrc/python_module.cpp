// The Python module layernorm_ext._C. Loading it runs the operators' static registrations
// (layernorm.cpp and the backends); the module itself holds the backward nodes' Python
// classes (autograd_python.h), the forward ops' eager entry points and two queries.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

#include "autograd_python.h"
#include "layernorm.h"

namespace layernorm_ext {
namespace {

// The eager entry points: layer_norm and rms_norm (ops.py) call the forward ops here with
// positional arguments. torch.ops parses its arguments against the schema into a stack of
// IValues and returns every output, ~1.9 us of a ~6 us call at the seed's 100x20; these
// read just the plain types below and call the same op through the dispatcher (autograd,
// autocast, modes, the profiler and the JIT tracer see it as before). For any other
// argument they return NotImplemented, and ops.py calls torch.ops, which takes it
// (symbolic sizes) or raises torch's error. Under torch.compile ops.py calls torch.ops,
// which Dynamo traces.

// A tuple or list of ints (int subclasses too, not bool) within int64, into `sizes`.
bool read_int_list(PyObject* arg, c10::SmallVector<int64_t, 4>& sizes) {
  const bool tuple = PyTuple_Check(arg);
  if (!tuple && !PyList_Check(arg)) return false;
  const Py_ssize_t size = tuple ? PyTuple_GET_SIZE(arg) : PyList_GET_SIZE(arg);
  for (Py_ssize_t i = 0; i < size; ++i) {
    PyObject* item = tuple ? PyTuple_GET_ITEM(arg, i) : PyList_GET_ITEM(arg, i);
    if (!PyLong_Check(item) || PyBool_Check(item)) return false;
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0) return false;
    sizes.push_back(value);
  }
  return true;
}

bool is_optional_tensor(PyObject* arg) { return arg == Py_None || THPVariable_Check(arg); }

std::optional<at::Tensor> optional_tensor(PyObject* arg) {
  if (arg == Py_None) return std::nullopt;
  return THPVariable_Unpack(arg);
}

void check_arg_count(Py_ssize_t given, Py_ssize_t expected, const char* function) {
  TORCH_CHECK_TYPE(given == expected, "layernorm_ext._C.", function, "() takes ", expected,
                   " positional arguments but ", given, " were given");
}

// forward_output(input, normalized_shape, weight, bias, eps): layernorm_ext::forward's
// output, or NotImplemented.
PyObject* forward_output(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_arg_count(nargs, 5, "forward_output");
  c10::SmallVector<int64_t, 4> normalized_shape;
  if (!THPVariable_Check(args[0]) || !read_int_list(args[1], normalized_shape) ||
      !is_optional_tensor(args[2]) || !is_optional_tensor(args[3]) ||
      !PyFloat_CheckExact(args[4])) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const auto weight = optional_tensor(args[2]);
  const auto bias = optional_tensor(args[3]);
  const double eps = PyFloat_AS_DOUBLE(args[4]);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("layernorm_ext::forward", "")
                             .typed<Tensor3(const at::Tensor&, at::IntArrayRef,
                                            const std::optional<at::Tensor>&,
                                            const std::optional<at::Tensor>&, double)>();
  at::Tensor output;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's own bindings
    output = std::get<0>(op.call(input, normalized_shape, weight, bias, eps));
  }
  return THPVariable_Wrap(std::move(output));
  END_HANDLE_TH_ERRORS
}

// rms_forward_output(input, normalized_shape, weight, eps): layernorm_ext::rms_forward's
// output (eps None or a float), or NotImplemented.
PyObject* rms_forward_output(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_arg_count(nargs, 4, "rms_forward_output");
  c10::SmallVector<int64_t, 4> normalized_shape;
  if (!THPVariable_Check(args[0]) || !read_int_list(args[1], normalized_shape) ||
      !is_optional_tensor(args[2]) || (args[3] != Py_None && !PyFloat_CheckExact(args[3]))) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const auto weight = optional_tensor(args[2]);
  const std::optional<double> eps =
      args[3] == Py_None ? std::nullopt : std::optional<double>(PyFloat_AS_DOUBLE(args[3]));
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("layernorm_ext::rms_forward", "")
                             .typed<Tensor2(const at::Tensor&, at::IntArrayRef,
                                            const std::optional<at::Tensor>&,
                                            std::optional<double>)>();
  at::Tensor output;
  {
    pybind11::gil_scoped_release no_gil;
    output = std::get<0>(op.call(input, normalized_shape, weight, eps));
  }
  return THPVariable_Wrap(std::move(output));
  END_HANDLE_TH_ERRORS
}

PyObject* cpu_kernels_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(layernorm_ext::cpu_kernels_isa());
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
       "forward_output(input, normalized_shape, weight, bias, eps): the output of "
       "torch.ops.layernorm_ext.forward, for eager calls; NotImplemented for arguments "
       "of other than the plain types."},
      {"rms_forward_output", fastcall(rms_forward_output), METH_FASTCALL,
       "rms_forward_output(input, normalized_shape, weight, eps): the output of "
       "torch.ops.layernorm_ext.rms_forward, for eager calls; NotImplemented for "
       "arguments of other than the plain types."},
      {"cpu_kernels_isa", cpu_kernels_isa, METH_NOARGS,
       "The instruction set of the CPU kernels: AVX512, AVX2 or DEFAULT."},
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
