// Autocast rules, matching torch's for layer_norm: on CUDA, layer_norm is on autocast's
// float32 list, so the input and parameters run (and the output comes back) in float32.
// On the CPU autocast leaves layer_norm alone, and so it leaves this op alone (no kernel
// is registered for AutocastCPU, the dispatcher falls through).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "layernorm.h"
#include "op_calls.h"

namespace layernorm_ext {
namespace {

Tensor3 forward_autocast_cuda(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  constexpr auto cuda = c10::DeviceType::CUDA;
  return call_forward(at::autocast::cached_cast(at::kFloat, input, cuda), normalized_shape,
                      at::autocast::cached_cast(at::kFloat, weight, cuda),
                      at::autocast::cached_cast(at::kFloat, bias, cuda), eps);
}

// rms_norm is on the same CUDA float32 list where torch has a rule for it (below), and,
// like layer_norm, has no CPU rule.
Tensor2 rms_forward_autocast_cuda(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                                  const std::optional<at::Tensor>& weight,
                                  std::optional<double> eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  constexpr auto cuda = c10::DeviceType::CUDA;
  return call_rms_forward(at::autocast::cached_cast(at::kFloat, input, cuda), normalized_shape,
                          at::autocast::cached_cast(at::kFloat, weight, cuda), eps);
}

// Whether the installed torch has an autocast rule for its own rms_norm on CUDA. Newer
// releases (2.14) put it on the float32 list; 2.11 has none, so its rms_norm runs in
// the input's dtype under autocast (a bfloat16 RMSNorm output on an H200, 2026-12-04).
// rms_forward follows whichever torch it is loaded into.
bool torch_autocasts_rms_norm() {
  const auto op = c10::Dispatcher::singleton().findOp({"aten::rms_norm", ""});
  return op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::AutocastCUDA);
}

}  // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, AutocastCUDA, m) {
  m.impl("forward", &forward_autocast_cuda);
  if (torch_autocasts_rms_norm()) m.impl("rms_forward", &rms_forward_autocast_cuda);
}

}  // namespace layernorm_ext
