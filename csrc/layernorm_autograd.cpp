// Autograd for layernorm_ext::forward, in C++ (torchvision registers its ops' autograd in
// C++ too): the per-call cost of a Python autograd.Function is larger than the whole
// kernel for the small layers of the training example. The backward is a hand-written
// Node, as torch's generated code has (autograd_common.h says why). Fake kernels stay in
// Python (ops.py).
//
// First-order gradients come from the fused backward kernel. When the backward itself
// must be differentiable (create_graph=True: gradient penalties, Hessian-vector
// products), it is computed instead from differentiable ATen ops, so autograd can
// differentiate it again.
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

// The fused backward, called from LayerNormBackward::apply with grad mode off. It
// dispatches below autograd: the op's Autograd kernel (the not-implemented fallback)
// would only check and wrap its outputs, a few microseconds per call.
Tensor3 call_backward(const at::Tensor& grad_out, const at::Tensor& input,
                      c10::SymIntArrayRef normalized_shape, const at::Tensor& mean,
                      const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("layernorm_ext::backward", "")
                             .typed<decltype(call_backward)>();
  return op.call(grad_out, input, normalized_shape, mean, rstd, weight, bias);
}

// The LayerNorm backward as differentiable ATen ops (statistics recomputed from the
// input, so their dependence on it is part of the graph). Returns (dx, dw, db).
Tensor3 differentiable_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                c10::SymIntArrayRef normalized_shape, const at::Tensor& weight,
                                const at::Tensor& bias, double eps) {
  const int64_t axis = input.dim() - static_cast<int64_t>(normalized_shape.size());
  std::vector<int64_t> row_dims(axis), col_dims(normalized_shape.size());
  std::iota(row_dims.begin(), row_dims.end(), 0);
  std::iota(col_dims.begin(), col_dims.end(), axis);
  const auto acc = at::toOpMathType(input.scalar_type());
  const at::Tensor x = input.to(acc);
  const at::Tensor dy = grad_out.to(acc);
  const at::Tensor mean = x.mean(col_dims, /*keepdim=*/true);
  const at::Tensor centered = x - mean;
  const at::Tensor var = centered.square().mean(col_dims, /*keepdim=*/true);
  const at::Tensor rstd = (var + eps).rsqrt();
  const at::Tensor xhat = centered * rstd;
  const at::Tensor g = weight.defined() ? dy * weight.to(acc) : dy;
  const at::Tensor dx =
      rstd * (g - g.mean(col_dims, true) - xhat * (g * xhat).mean(col_dims, true));
  // The parameters' dtype (float32 weight/bias may come with a bf16/fp16 input).
  const auto param_dtype = weight.defined() ? weight.scalar_type()
                           : bias.defined() ? bias.scalar_type()
                                            : input.scalar_type();
  // An empty dim list would reduce every dim: without leading dims there is one row.
  const auto sum_rows = [&](const at::Tensor& t) { return axis > 0 ? t.sum(row_dims) : t; };
  return {dx.to(input.scalar_type()), sum_rows(dy * xhat).to(param_dtype),
          sum_rows(dy).to(param_dtype)};
}

// The backward node of a forward call (see autograd_common.h for why a Node, not a
// Function). Its inputs: the gradient of the output; its outputs: the gradients of
// (input, weight, bias).
struct LayerNormBackward : public NormBackwardNode<LayerNormBackward, 5, 3> {
  // Saved: input, weight, bias, and the forward's outputs mean and rstd.
  static constexpr std::array<bool, 5> kSavedIsOutput = {false, false, false, true, true};
  // As NativeLayerNormBackward0's (the forward's outputs 1 and 2 are mean and rstd).
  static constexpr std::array<const char*, 5> kSavedNames = {"input", "weight", "bias",
                                                             "result1", "result2"};

  std::string name() const override { return "layernorm_ext::LayerNormBackward"; }

  static variable_list gradients(const at::Tensor& grad_out, const SavedTensors& saved,
                                 c10::SymIntArrayRef normalized_shape, double eps) {
    const auto& [input, weight, bias, mean, rstd] = saved;
    // Grad mode is on here when the backward must itself be differentiable: the engine
    // enables it only for create_graph=True (a direct call of the node keeps the caller's).
    auto [grad_input, grad_weight, grad_bias] =
        c10::GradMode::is_enabled()
            ? differentiable_backward(grad_out, input, normalized_shape, weight, bias, eps)
            : call_backward(grad_out, input, normalized_shape, mean, rstd,
                            defined_or_none(weight), defined_or_none(bias));
    return {std::move(grad_input), std::move(grad_weight), std::move(grad_bias)};
  }
};

Tensor3 forward_autograd(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, double eps) {
  if (!needs_autograd(input, {&weight, &bias})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(input, normalized_shape, weight, bias, eps);
  }
  auto grad_fn = make_grad_fn<LayerNormBackward>("layernorm_ext::forward", input, weight, bias);
  Tensor3 outputs;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    outputs = call_forward(input, normalized_shape, weight, bias, eps);
  }
  const auto& [output, mean, rstd] = outputs;
  grad_fn->save({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, rstd},
                normalized_shape, eps);
  attach_grad_fn(output, grad_fn);
  return outputs;
}

}  // namespace

void add_layer_norm_backward_class(PyObject* module) {
  add_node_class<LayerNormBackward>(module, "LayerNormBackward");
}

TORCH_LIBRARY_IMPL(layernorm_ext, Autograd, m) {
  m.impl("forward", &forward_autograd);
  // Called directly with inputs that require grad, the backward op has no derivative:
  // raise at backward time instead of silently returning zeros.
  m.impl("backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace layernorm_ext
