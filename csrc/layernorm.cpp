// The operator schemas, and the forward ops' calls from C++ (op_calls.h). Kernels
// register per backend in csrc/cpu and csrc/cuda; the argument checks are in
// layernorm_checks.cpp; autograd in layernorm_autograd.cpp and rms_norm_autograd.cpp,
// fake (meta) kernels in Python (layernorm_ext/ops.py). The Python module that loads them
// all is python_module.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "layernorm.h"
#include "op_calls.h"

namespace layernorm_ext {

TORCH_LIBRARY(layernorm_ext, m) {
  // normalized_shape is SymInt[], as in aten::native_layer_norm: torch.compile and export
  // can keep the normalized sizes symbolic (a dynamic hidden size). The backends take it
  // as int64 (the dispatcher hands them concrete sizes); the autograd and autocast
  // kernels, which tracing runs with symbolic ones, take c10::SymIntArrayRef.
  // Returns (output, mean, rstd); mean/rstd have the input's leading dims and are
  // float32 (float64 for float64 input).
  m.def(
      "forward(Tensor input, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias). The parameter gradients have
  // normalized_shape and the parameters' dtype, and are computed even for a missing
  // parameter (the fused kernel gets them almost for free).
  m.def(
      "backward(Tensor grad_out, Tensor input, SymInt[] normalized_shape, Tensor mean, "
      "Tensor rstd, Tensor? weight, Tensor? bias) -> (Tensor, Tensor, Tensor)");
  // RMSNorm, from the same kernels: returns (output, rstd), rstd as above. eps=None is
  // torch's default (rms_norm_eps in layernorm.h).
  m.def(
      "rms_forward(Tensor input, SymInt[] normalized_shape, Tensor? weight, float? eps) "
      "-> (Tensor, Tensor)");
  // Returns (grad_input, grad_weight); grad_weight as backward's.
  m.def(
      "rms_backward(Tensor grad_out, Tensor input, SymInt[] normalized_shape, Tensor rstd, "
      "Tensor? weight) -> (Tensor, Tensor)");
}

Tensor3 call_forward(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                     const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("layernorm_ext::forward", "")
                             .typed<decltype(call_forward)>();
  return op.call(input, normalized_shape, weight, bias, eps);
}

Tensor2 call_rms_forward(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight, std::optional<double> eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("layernorm_ext::rms_forward", "")
                             .typed<decltype(call_rms_forward)>();
  return op.call(input, normalized_shape, weight, eps);
}

}  // namespace layernorm_ext
