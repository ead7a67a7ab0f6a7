// The operator schemas. Kernels register per backend in csrc/cpu and csrc/cuda; the
// argument checks are in layernorm_checks.cpp; fake (meta) and autograd registrations
// live in Python (layernorm_ext/ops.py).
#include <Python.h>
#include <torch/library.h>

#include "autograd_python.h"
#include "layernorm.h"

// The extension is loaded as the Python module layernorm_ext._C; loading it runs the
// static registrations below. The module holds the backward nodes' Python classes and
// two functions: which CPU kernels run, and why LAYERNORM_EXT_STREAM_BYTES was ignored.
extern "C" {
static PyObject* cpu_kernels_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(layernorm_ext::cpu_kernels_isa());
}

static PyObject* stream_threshold_warning(PyObject*, PyObject*) {
  // The variable's bytes need not be UTF-8: shown as \xNN escapes, not an import error.
  const std::string& warning = layernorm_ext::stream_threshold_warning();
  return PyUnicode_DecodeUTF8(warning.data(), static_cast<Py_ssize_t>(warning.size()),
                              "backslashreplace");
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_kernels_isa", cpu_kernels_isa, METH_NOARGS,
       "The instruction set of the CPU kernels: AVX512, AVX2 or DEFAULT."},
      {"stream_threshold_warning", stream_threshold_warning, METH_NOARGS,
       "Empty, or why LAYERNORM_EXT_STREAM_BYTES was ignored."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  try {
    layernorm_ext::add_layer_norm_backward_class(module);
    layernorm_ext::add_rms_norm_backward_class(module);
  } catch (const std::exception& e) {
    Py_DECREF(module);
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return module;
}
}

namespace layernorm_ext {

TORCH_LIBRARY(layernorm_ext, m) {
  // Returns (output, mean, rstd); mean/rstd have the input's leading dims and are
  // float32 (float64 for float64 input).
  m.def(
      "forward(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias). The parameter gradients have
  // normalized_shape and the parameters' dtype, and are computed even for a missing
  // parameter (the fused kernel gets them almost for free).
  m.def(
      "backward(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor mean, "
      "Tensor rstd, Tensor? weight, Tensor? bias) -> (Tensor, Tensor, Tensor)");
  // RMSNorm, from the same kernels: returns (output, rstd), rstd as above. eps=None is
  // torch's default (rms_norm_eps in layernorm.h).
  m.def(
      "rms_forward(Tensor input, int[] normalized_shape, Tensor? weight, float? eps) "
      "-> (Tensor, Tensor)");
  // Returns (grad_input, grad_weight); grad_weight as backward's.
  m.def(
      "rms_backward(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor rstd, "
      "Tensor? weight) -> (Tensor, Tensor)");
}

}  // namespace layernorm_ext
