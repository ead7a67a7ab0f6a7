// Declarations shared by the registration file and the backend kernels:
// input validation (one place, torch's messages) and the dtype dispatch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <tuple>
#include <type_traits>

namespace layernorm_ext {

// The problem seen as M rows of N contiguous elements.
struct RowShape {
  int64_t rows;  // M = prod(input.shape[:-len(normalized_shape)])
  int64_t cols;  // N = prod(normalized_shape)
};

// Validates the arguments of layer_norm exactly once per call, with torch's messages
// where torch has one, and returns the row view of the problem.
RowShape check_layer_norm_inputs(const at::Tensor& input, at::IntArrayRef normalized_shape,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias);

// Checks the backward's extra tensors against the forward's arguments.
void check_layer_norm_backward_inputs(const at::Tensor& grad_out, const at::Tensor& input,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const RowShape& shape);

// dtype of mean/rstd and of the dgamma/dbeta partial sums: fp32 unless the input is fp64.
at::ScalarType stats_dtype(at::ScalarType input_dtype);

// dtype of the affine parameters (and of their gradients): weight's, else bias's, else input's.
at::ScalarType param_dtype(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias);

// Shape of mean/rstd: the input's leading (non-normalized) dims.
std::vector<int64_t> stats_shape(const at::Tensor& input, at::IntArrayRef normalized_shape);

// Forward: (output, mean, rstd). Backward: (grad_input, grad_weight, grad_bias).
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Everything a forward kernel needs: contiguous inputs, allocated outputs.
// weight/bias are undefined tensors when absent.
struct ForwardArgs {
  at::Tensor input, weight, bias;  // contiguous
  at::Tensor output, mean, rstd;   // freshly allocated
  RowShape shape;
  double eps;
  at::ScalarType param_dtype;
};

// Everything a backward kernel needs. grad_weight/grad_bias are allocated with the
// parameters' dtype; the kernel fills them (zeros when there are no rows).
struct BackwardArgs {
  at::Tensor grad_out, input, mean, rstd, weight;  // contiguous
  at::Tensor grad_input, grad_weight, grad_bias;   // freshly allocated
  RowShape shape;
  at::ScalarType param_dtype;
};

// The host side common to all backends: checks, .contiguous(), allocation.
ForwardArgs prepare_forward(const at::Tensor& input, at::IntArrayRef normalized_shape,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps);
BackwardArgs prepare_backward(const at::Tensor& grad_out, const at::Tensor& input,
                              at::IntArrayRef normalized_shape, const at::Tensor& mean,
                              const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias);

}  // namespace layernorm_ext

namespace layernorm_ext {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>, TypeTag<P>) with P, the parameters' element type: T itself, or
// float for half/bf16 input with fp32 parameters. The checks rule out every other pair.
template <typename T, typename F>
void dispatch_param_type(at::ScalarType param_dtype, const F& fn) {
  if (param_dtype == c10::CppTypeToScalarType<T>::value) {
    fn(TypeTag<T>{}, TypeTag<T>{});
  } else if constexpr (!std::is_same_v<T, at::opmath_type<T>>) {
    fn(TypeTag<T>{}, TypeTag<float>{});
  }
}

}  // namespace layernorm_ext

// Calls the generic lambda `...` as fn(TypeTag<input element type>,
// TypeTag<parameter element type>). Input: float32, float64, float16, bfloat16.
#define LAYERNORM_DISPATCH_TYPES(INPUT_DTYPE, PARAM_DTYPE, NAME, ...)                 \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, INPUT_DTYPE, NAME, [&] { \
    layernorm_ext::dispatch_param_type<scalar_t>(PARAM_DTYPE, __VA_ARGS__);           \
  })

namespace layernorm_ext {

// The host side of a backend's operators, written once: checks and allocation, the
// empty cases, the dtype dispatch, then `kernel(TypeTag<T>, TypeTag<P>, args)`.
template <typename Kernel>
Tensor3 run_forward(const at::Tensor& input, at::IntArrayRef normalized_shape,
                    const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, double eps, const Kernel& kernel) {
  ForwardArgs args = prepare_forward(input, normalized_shape, weight, bias, eps);
  if (args.shape.rows > 0) {
    LAYERNORM_DISPATCH_TYPES(input.scalar_type(), args.param_dtype, "layernorm_ext::forward",
                             [&](auto input_tag, auto param_tag) {
                               kernel(input_tag, param_tag, args);
                             });
  }
  return {args.output, args.mean, args.rstd};
}

// Rows == 0 still runs the kernel: it must write zero parameter gradients.
template <typename Kernel>
Tensor3 run_backward(const at::Tensor& grad_out, const at::Tensor& input,
                     at::IntArrayRef normalized_shape, const at::Tensor& mean,
                     const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const Kernel& kernel) {
  BackwardArgs args =
      prepare_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias);
  if (args.shape.cols > 0) {
    LAYERNORM_DISPATCH_TYPES(input.scalar_type(), args.param_dtype, "layernorm_ext::backward",
                             [&](auto input_tag, auto param_tag) {
                               kernel(input_tag, param_tag, args);
                             });
  }
  return {args.grad_input, args.grad_weight, args.grad_bias};
}

// The element type a TypeTag carries, for the backends' kernel lambdas.
#define LAYERNORM_TAG_TYPE(tag) typename decltype(tag)::type

}  // namespace layernorm_ext
