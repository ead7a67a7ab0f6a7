// Shared by the two autograd registrations (layernorm_autograd.cpp, rms_norm_autograd.cpp).
//
// Each op's backward is a hand-written torch::autograd::Node, as torch's generated code
// (NativeLayerNormBackward0) has, rather than a C++ torch::autograd::Function: a
// Function's CppNode keeps an AutogradContext with a string-keyed saved_data map, the
// metadata of every input and output and IValue copies of the non-tensor arguments, and
// building and freeing that costs more than the whole 100x20 forward kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/version.h>

#include <initializer_list>
#include <memory>
#include <optional>
#include <type_traits>

namespace layernorm_ext {

// torch 2.13 and 2.14 hold autograd nodes in c10::intrusive_ptr, older releases (2.11,
// the torch of the GPU machines' image) in std::shared_ptr. NodePtr is whichever this
// torch uses, so the extension builds against both.
inline constexpr bool kIntrusiveNodes =
    std::is_base_of_v<c10::intrusive_ptr_target, torch::autograd::Node>;
template <class NodeT>
using NodePtr =
    std::conditional_t<kIntrusiveNodes, c10::intrusive_ptr<NodeT>, std::shared_ptr<NodeT>>;

// Whether a forward call must build a backward node: grad mode is on and an argument
// requires grad, or an argument carries a forward-mode tangent (which make_grad_fn then
// rejects). Otherwise the node would only add its bookkeeping to the call.
inline bool needs_autograd(const at::Tensor& input,
                           std::initializer_list<const std::optional<at::Tensor>*> params) {
  const bool grad_mode = c10::GradMode::is_enabled();
  const auto needs = [&](const at::Tensor& t) {
    return (grad_mode && t.requires_grad()) || t._fw_grad(/*level=*/0).defined();
  };
  if (needs(input)) return true;
  for (const auto* param : params) {
    if (param->has_value() && (*param)->defined() && needs(**param)) return true;
  }
  return false;
}

// A new backward node of type NodeT whose next edges lead to (input, params...), the
// tensors it returns gradients for, in that order. Raises where a C++ Function would:
// under a functorch gradient transform (layer_norm() routes those to Python first) and
// for forward-mode tangents, which the fused kernels have no jvp for.
template <class NodeT, class... Params>
NodePtr<NodeT> make_grad_fn(const char* op, const at::Tensor& input,
                            const Params&... params) {
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
    functorch->checkSupportsCppAutogradFunction();
  }
  TORCH_CHECK(!(torch::autograd::isFwGradDefined(input) ||
                (torch::autograd::isFwGradDefined(params) || ...)),
              "jvp is not implemented for ", op,
              " (forward-mode AD goes through layernorm_ext.layer_norm/rms_norm)");
  NodePtr<NodeT> grad_fn;
  if constexpr (kIntrusiveNodes) {
    grad_fn = c10::make_intrusive<NodeT>();
  } else {
    // torch's own deleter (torch::autograd::deleteNode, found by argument-dependent
    // lookup: newer torch has none), as torch's nodes have: it frees a long graph
    // without recursing once per node.
    grad_fn = std::shared_ptr<NodeT>(new NodeT(), [](NodeT* node) { deleteNode(node); });
  }
  grad_fn->set_next_edges(torch::autograd::collect_next_edges(input, params...));
  return grad_fn;
}

// Makes grad_fn the gradient function of output, its only differentiable output (the
// statistics stay plain tensors: not differentiable). Call it once the node's saved
// variables are stored: node-creation hooks see the finished node.
inline void attach_grad_fn(const at::Tensor& output,
                           const NodePtr<torch::autograd::Node>& grad_fn) {
  torch::autograd::set_history(output, grad_fn);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 14)
  torch::autograd::fire_node_creation_hooks(grad_fn);  // new in torch 2.14
#endif
}

// A node's result: grads[i] for each next edge i the engine wants a gradient for, an
// undefined tensor for the others (trimmed by autograd.grad's inputs, or not requiring
// grad).
inline torch::autograd::variable_list wanted_gradients(torch::autograd::Node& node,
                                                       torch::autograd::variable_list grads) {
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!node.task_should_compute_output(i)) grads[i] = at::Tensor();
  }
  return grads;
}

inline std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace layernorm_ext
