// Autograd for layernorm_ext::rms_forward, in C++ for the same reason as LayerNorm's
// (layernorm_autograd.cpp): a Python autograd.Function costs more per call than the
// kernel of a small layer.
//
// First-order gradients come from the fused rms_backward kernel. Under create_graph=True
// the backward is computed from differentiable ATen ops instead, so autograd can
// differentiate it again (double backward).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <numeric>

#include "autograd_common.h"
#include "autograd_python.h"
#include "layernorm.h"
#include "op_calls.h"

namespace layernorm_ext {
namespace {

// The fused backward, with grad mode off: below autograd, as call_backward in
// layernorm_autograd.cpp.
Tensor2 call_rms_backward(const at::Tensor& grad_out, const at::Tensor& input,
                          c10::SymIntArrayRef normalized_shape, const at::Tensor& rstd,
                          const std::optional<at::Tensor>& weight) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("layernorm_ext::rms_backward", "")
                             .typed<decltype(call_rms_backward)>();
  return op.call(grad_out, input, normalized_shape, rstd, weight);
}

// The RMSNorm backward as differentiable ATen ops, rstd recomputed from the input so its
// dependence on the input is part of the graph. Returns (dx, dw):
//   dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * w,  xhat = x * rstd
//   dw = sum over rows of dy * xhat
Tensor2 differentiable_rms_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                    c10::SymIntArrayRef normalized_shape, const at::Tensor& weight,
                                    double eps) {
  const int64_t axis = input.dim() - static_cast<int64_t>(normalized_shape.size());
  std::vector<int64_t> row_dims(axis), col_dims(normalized_shape.size());
  std::iota(row_dims.begin(), row_dims.end(), 0);
  std::iota(col_dims.begin(), col_dims.end(), axis);
  const auto acc = at::toOpMathType(input.scalar_type());
  const at::Tensor x = input.to(acc);
  const at::Tensor dy = grad_out.to(acc);
  const at::Tensor rstd = (x.square().mean(col_dims, /*keepdim=*/true) + eps).rsqrt();
  const at::Tensor xhat = x * rstd;
  const at::Tensor g = weight.defined() ? dy * weight.to(acc) : dy;
  const at::Tensor dx = rstd * (g - xhat * (g * xhat).mean(col_dims, /*keepdim=*/true));
  const auto param_dtype = weight.defined() ? weight.scalar_type() : input.scalar_type();
  // An empty dim list would reduce every dim: without leading dims there is one row.
  const at::Tensor dw = axis > 0 ? (dy * xhat).sum(row_dims) : dy * xhat;
  return {dx.to(input.scalar_type()), dw.to(param_dtype)};
}

// The backward node of an rms_forward call, as LayerNormBackward: the gradient of the
// output in, the gradients of (input, weight) out.
struct RMSNormBackward : public NormBackwardNode<RMSNormBackward, 3, 2> {
  // Saved: input, weight, and the forward's output rstd.
  static constexpr std::array<bool, 3> kSavedIsOutput = {false, false, true};
  // As torch's fused RMSNorm node (the forward's output 1 is rstd).
  static constexpr std::array<const char*, 3> kSavedNames = {"input", "weight", "result1"};

  std::string name() const override { return "layernorm_ext::RMSNormBackward"; }

  // eps: the resolved one (rms_norm_eps).
  static variable_list gradients(const at::Tensor& grad_out, const SavedTensors& saved,
                                 c10::SymIntArrayRef normalized_shape, double eps) {
    const auto& [input, weight, rstd] = saved;
    // Grad mode is on here when the backward must itself be differentiable: the engine
    // enables it only for create_graph=True (a direct call of the node keeps the caller's).
    auto [grad_input, grad_weight] =
        c10::GradMode::is_enabled()
            ? differentiable_rms_backward(grad_out, input, normalized_shape, weight, eps)
            : call_rms_backward(grad_out, input, normalized_shape, rstd,
                                defined_or_none(weight));
    return {std::move(grad_input), std::move(grad_weight)};
  }
};

Tensor2 rms_forward_autograd(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                             const std::optional<at::Tensor>& weight,
                             std::optional<double> eps) {
  if (!needs_autograd(input, {&weight})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_rms_forward(input, normalized_shape, weight, eps);
  }
  auto grad_fn = make_grad_fn<RMSNormBackward>("layernorm_ext::rms_forward", input, weight);
  Tensor2 outputs;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    outputs = call_rms_forward(input, normalized_shape, weight, eps);
  }
  const auto& [output, rstd] = outputs;
  grad_fn->save({input, weight.value_or(at::Tensor()), rstd}, normalized_shape,
                rms_norm_eps(input.scalar_type(), eps));
  attach_grad_fn(output, grad_fn);
  return outputs;
}

}  // namespace

void add_rms_norm_backward_class(PyObject* module) {
  add_node_class<RMSNormBackward>(module, "RMSNormBackward");
}

TORCH_LIBRARY_IMPL(layernorm_ext, Autograd, m) {
  m.impl("rms_forward", &rms_forward_autograd);
  // Called directly with inputs that require grad, the backward op has no derivative:
  // raise at backward time instead of silently returning zeros.
  m.impl("rms_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace layernorm_ext
