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
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

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

inline std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The base of the two backward nodes: a node that saves kSaved tensors and the
// normalized shape and eps of its forward call, and returns kGradients gradients (input,
// weight[, bias]). NodeT has
//   kSavedIsOutput: which saved tensors are outputs of the forward (statistics), saved
//     with the node as torch's nodes save theirs;
//   gradients(grad_out, saved, normalized_shape, eps): every gradient, from the defined
//     grad_out and the unpacked saved tensors;
//   kSavedNames: the saved tensors' names in the node's Python class (autograd_python.h);
// and gets from the base the node's apply, its release of the saved tensors, and support
// for compiled autograd (torch._dynamo.compiled_autograd), which captures a backward graph
// from the nodes' compiled_args and apply_with_saved.
template <class NodeT, size_t kSaved, size_t kGradients>
struct NormBackwardNode : public torch::autograd::Node {
  using SavedTensors = std::array<at::Tensor, kSaved>;
  using variable_list = torch::autograd::variable_list;

  // Saves a forward call's tensors, in NodeT's order (an undefined one for a missing
  // weight or bias). Call it before attach_grad_fn.
  void save(const SavedTensors& tensors, c10::SymIntArrayRef normalized_shape, double eps) {
    for (size_t i = 0; i < kSaved; ++i) {
      saved_[i] = torch::autograd::SavedVariable(tensors[i], NodeT::kSavedIsOutput[i]);
    }
    normalized_shape_ = normalized_shape.vec();
    eps_ = eps;
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return variable_list(kGradients);
    SavedTensors saved;
    for (size_t i = 0; i < kSaved; ++i) {
      saved[i] = NodeT::kSavedIsOutput[i] ? saved_[i].unpack(getptr()) : saved_[i].unpack();
    }
    return only_wanted(NodeT::gradients(grads[0], saved, normalized_shape_, eps_),
                       wanted_gradients());
  }

  // What the node's Python class shows (autograd_python.h). A saved output is unpacked
  // with the node, as apply does; a freed one raises torch's error. No lock, as torch's
  // generated getters take none: apply holds mutex_ while unpack hooks run Python, and a
  // hook that reads the node (or another thread's getter holding the GIL) would deadlock.
  at::Tensor saved_tensor(size_t i) {
    return NodeT::kSavedIsOutput[i] ? saved_[i].unpack(getptr()) : saved_[i].unpack();
  }
  const torch::autograd::SavedVariable& saved_variable(size_t i) const { return saved_[i]; }
  const std::vector<c10::SymInt>& normalized_shape() const { return normalized_shape_; }
  double eps() const { return eps_; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& saved : saved_) saved.reset_data();
  }

  // Compiled autograd, capturing: what keys the captured graph (the constants; the key
  // has the node's type already) and what becomes its inputs (the saved tensors).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (size_t i = 0; i < kSaved; ++i) args.collect(saved_[i], NodeT::kSavedIsOutput[i]);
    args.collect(normalized_shape_);  // sizes: a dynamic one becomes a graph input
    args.collect(eps_);
  }

  // Compiled autograd, capturing: puts a call of apply_functional into the graph, with the
  // tracer's proxies for the saved tensors. The graph's compiler then traces that call
  // with fake tensors of the real shapes (the ops have fake kernels), as torch lifts its
  // own nodes. Running apply here instead would see placeholders for tensors that
  // saved-tensor hooks unpack.
  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& swap) override {
    for (auto& saved : saved_) swap.before(saved);
    swap.before(normalized_shape_);
    torch::dynamo::autograd::PackedArgs packed;
    for (const auto& saved : saved_) packed.pack(defined_or_none(saved.unpack()));
    packed.pack(normalized_shape_);
    packed.pack(eps_);
    packed.pack(wanted_gradients());
    const auto& args = packed.vec();
    std::vector<at::TypePtr> schema;
    for (const auto& arg : args) {
      schema.push_back(arg.isTensor() ? at::TensorType::get() : arg.type());
    }
    namespace ca = torch::dynamo::autograd;
    const auto& compiler = ca::getPyCompilerInterface();
    // Bound anew for each node a capture meets: is_custom_function numbers the names
    // (CppNode<name><n>), as torch does for C++ autograd Functions; ':' is no part of a
    // Python attribute name.
    std::string fn_name = name();
    std::replace(fn_name.begin(), fn_name.end(), ':', '_');
    fn_name = compiler->bind_function(swap.get_py_compiler(), fn_name, &apply_functional,
                                      schema, /*is_custom_function=*/true,
                                      /*is_traceable=*/true);
    auto grads = compiler->call_function(
        swap.get_py_compiler(), "apply_functional", fn_name, inputs, args,
        ca::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
            ca::get_input_metadata(next_edges())));
    for (auto& saved : saved_) swap.after(saved);
    swap.after(normalized_shape_);
    return grads;
  }

  // The node's apply as a function of its inputs and apply_with_saved's packed arguments.
  static variable_list apply_functional(const variable_list& grads,
                                        const std::vector<c10::IValue>& args) {
    torch::dynamo::autograd::PackedArgs packed(args);
    SavedTensors saved;
    for (auto& tensor : saved) {
      tensor = packed.unpack<std::optional<at::Tensor>>().value_or(at::Tensor());
    }
    const auto normalized_shape = packed.unpack<std::vector<c10::SymInt>>();
    const auto eps = packed.unpack<double>();
    const auto wanted = packed.unpack<std::array<bool, kGradients>>();
    if (!grads[0].defined()) return variable_list(kGradients);
    return only_wanted(NodeT::gradients(grads[0], saved, normalized_shape, eps), wanted);
  }

 private:
  // Which gradients the engine wants: those of next edges that autograd.grad's inputs
  // did not trim and that require grad.
  std::array<bool, kGradients> wanted_gradients() const {
    std::array<bool, kGradients> wanted;
    for (size_t i = 0; i < kGradients; ++i) wanted[i] = task_should_compute_output(i);
    return wanted;
  }

  // grads with an undefined tensor for each gradient not wanted.
  static variable_list only_wanted(variable_list grads,
                                   const std::array<bool, kGradients>& wanted) {
    for (size_t i = 0; i < kGradients; ++i) {
      if (!wanted[i]) grads[i] = at::Tensor();
    }
    return grads;
  }

  std::array<torch::autograd::SavedVariable, kSaved> saved_;
  std::vector<c10::SymInt> normalized_shape_;  // symbolic while torch.compile traces
  double eps_ = 0.0;
};

}  // namespace layernorm_ext
