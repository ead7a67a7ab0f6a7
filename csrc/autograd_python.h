// Python classes for the backward nodes, as torch gives its generated ones
// (NativeLayerNormBackward0): `y.grad_fn` is a layernorm_ext._C.LayerNormBackward, not
// an anonymous CppFunction, and shows what it saved as torch's nodes do:
// _saved_<name> (the tensor: what torchviz's show_saved and users read),
// _raw_saved_<name> (torch's SavedTensor, whose register_hooks sets hooks on that one
// tensor), _saved_normalized_shape and _saved_eps. Reading a saved tensor after the
// backward freed it raises torch's error. The classes are added to the module by
// PyInit__C (csrc/python_module.cpp).
#pragma once

#include <torch/csrc/autograd/python_cpp_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <string>
#include <vector>

namespace layernorm_ext {

// Defined next to each node (layernorm_autograd.cpp, rms_norm_autograd.cpp).
void add_layer_norm_backward_class(PyObject* module);
void add_rms_norm_backward_class(PyObject* module);

namespace node_class {

template <class NodeT>
NodeT& node_of(PyObject* self) {
  return static_cast<NodeT&>(*reinterpret_cast<torch::autograd::THPCppFunction*>(self)->cdata);
}

// The getters' closure is the saved tensor's index.
template <class NodeT>
PyObject* saved_tensor(PyObject* self, void* index) {
  HANDLE_TH_ERRORS
  return THPVariable_Wrap(node_of<NodeT>(self).saved_tensor(reinterpret_cast<uintptr_t>(index)));
  END_HANDLE_TH_ERRORS
}

template <class NodeT>
PyObject* raw_saved_tensor(PyObject* self, void* index) {
  HANDLE_TH_ERRORS
  const auto& saved = node_of<NodeT>(self).saved_variable(reinterpret_cast<uintptr_t>(index));
  // A reference into the node, which the SavedTensor keeps alive (torch's does not).
  return pybind11::cast(saved, pybind11::return_value_policy::reference_internal,
                        pybind11::handle(self))
      .release()
      .ptr();
  END_HANDLE_TH_ERRORS
}

template <class NodeT>
PyObject* saved_normalized_shape(PyObject* self, void*) {
  HANDLE_TH_ERRORS
  const auto& shape = node_of<NodeT>(self).normalized_shape();
  pybind11::tuple tuple(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    // An int, or a torch.SymInt for a size that compiled autograd traces symbolically.
    tuple[i] = pybind11::cast(shape[i]);
  }
  return tuple.release().ptr();
  END_HANDLE_TH_ERRORS
}

template <class NodeT>
PyObject* saved_eps(PyObject* self, void*) {
  HANDLE_TH_ERRORS
  return PyFloat_FromDouble(node_of<NodeT>(self).eps());
  END_HANDLE_TH_ERRORS
}

// CppFunction's own _set_sequence_nr, which libtorch_python does not export.
inline PyObject* set_sequence_nr(PyObject* self, PyObject* sequence_nr) {
  HANDLE_TH_ERRORS
  const unsigned long long value = PyLong_AsUnsignedLongLong(sequence_nr);
  if (PyErr_Occurred()) return nullptr;
  reinterpret_cast<torch::autograd::THPCppFunction*>(self)->cdata->set_sequence_nr(value);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// NodeT's properties: torch's defaults, then _saved_<name> and _raw_saved_<name> for
// each saved tensor, _saved_normalized_shape and _saved_eps. Python keeps pointers to
// the names and definitions, so both are built once and live as long as the process.
template <class NodeT>
PyGetSetDef* properties() {
  using namespace torch::autograd;  // the names torch's THP_FUNCTION_DEFAULT_PROPERTIES uses
  static const std::vector<std::string> names = [] {
    std::vector<std::string> names;
    for (const char* saved : NodeT::kSavedNames) {
      names.push_back(std::string("_saved_") + saved);
      names.push_back(std::string("_raw_saved_") + saved);
    }
    return names;
  }();
  static std::vector<PyGetSetDef> defs = [] {
    std::vector<PyGetSetDef> defs = {THP_FUNCTION_DEFAULT_PROPERTIES};
    for (size_t i = 0; i < NodeT::kSavedNames.size(); ++i) {
      void* index = reinterpret_cast<void*>(static_cast<uintptr_t>(i));
      defs.push_back({names[2 * i].c_str(), &saved_tensor<NodeT>, nullptr, nullptr, index});
      defs.push_back({names[2 * i + 1].c_str(), &raw_saved_tensor<NodeT>, nullptr, nullptr, index});
    }
    defs.push_back({"_saved_normalized_shape", &saved_normalized_shape<NodeT>, nullptr, nullptr,
                    nullptr});
    defs.push_back({"_saved_eps", &saved_eps<NodeT>, nullptr, nullptr, nullptr});
    defs.push_back({nullptr, nullptr, nullptr, nullptr, nullptr});
    return defs;
  }();
  return defs.data();
}

// THP_FUNCTION_DEFAULT_METHODS, less _set_sequence_nr's function, which torch does not export.
inline PyMethodDef* methods() {
  using namespace torch::autograd;
  static PyMethodDef defs[] = {
      {"_register_hook_dict", THPCppFunction_register_hook_dict, METH_O, nullptr},
      {"register_hook", THPCppFunction_register_hook, METH_O, nullptr},
      {"register_prehook", THPCppFunction_register_prehook, METH_O, nullptr},
      {"name", THPCppFunction_name, METH_NOARGS, nullptr},
      {"_sequence_nr", THPCppFunction_sequence_nr, METH_NOARGS, nullptr},
      {"_set_sequence_nr", &set_sequence_nr, METH_O, nullptr},
      {nullptr, nullptr, 0, nullptr}};
  return defs;
}

}  // namespace node_class

// Adds NodeT's class to `module` (layernorm_ext._C) as `name` and makes it the Python
// type of NodeT's nodes. NodeT::kSavedNames names its saved tensors as torch's nodes do
// (input, weight, bias, result1 for the forward's second output, ...).
template <class NodeT>
void add_node_class(PyObject* module, const char* name) {
  static PyTypeObject type;
  static bool ready = false;  // an import retried after a failure adds the same class
  if (!ready) {
    static const std::string qualified_name = std::string("layernorm_ext._C.") + name;
    torch::autograd::_initFunctionPyTypeObject(type, qualified_name.c_str(),
                                               node_class::properties<NodeT>(),
                                               node_class::methods());
    torch::autograd::registerCppFunction(typeid(NodeT), &type);
    ready = true;
  }
  Py_INCREF(&type);
  if (PyModule_AddObject(module, name, reinterpret_cast<PyObject*>(&type)) < 0) {
    Py_DECREF(&type);
    throw python_error();
  }
}

}  // namespace layernorm_ext
