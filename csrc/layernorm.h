// Declarations shared by the registration file and the backend kernels:
// input validation (one place, torch's messages) and the dtype dispatch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "layernorm_math.h"

namespace layernorm_ext {

// The problem seen as M rows of N contiguous elements.
struct RowShape {
  int64_t rows;  // M = prod(input.shape[:-len(normalized_shape)])
  int64_t cols;  // N = prod(normalized_shape)
};

// Validates the arguments of layer_norm (norm = kLayer) or rms_norm (kRms, no bias)
// exactly once per call, with torch's messages where torch has one, and returns the
// row view of the problem.
RowShape check_norm_inputs(Norm norm, const at::Tensor& input, at::IntArrayRef normalized_shape,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias);

// Checks the backward's extra tensors against the forward's arguments. mean is an
// undefined tensor for RMSNorm.
void check_layer_norm_backward_inputs(const at::Tensor& grad_out, const at::Tensor& input,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const RowShape& shape);

// dtype of mean/rstd and of the dgamma/dbeta partial sums: fp32 unless the input is fp64.
at::ScalarType stats_dtype(at::ScalarType input_dtype);

// rms_norm's eps: the given one, else torch's default, the machine epsilon of the
// computation type (float32's for float32/float16/bfloat16 input, float64's for float64).
double rms_norm_eps(at::ScalarType input_dtype, std::optional<double> eps);

// The value dtypes the kernels take: float32, float64, float16, bfloat16.
inline bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

// Whether the kernels take parameters of dtype `param` with input of dtype `input`: the
// input's own, or float32 for float16/bfloat16 input.
inline bool kernels_pair(at::ScalarType input, at::ScalarType param) {
  return param == input || (param == at::kFloat && (input == at::kHalf || input == at::kBFloat16));
}

// dtype of the affine parameters (and of their gradients): weight's, else bias's, else input's.
at::ScalarType param_dtype(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias);

// Shape of mean/rstd: the input's leading (non-normalized) dims.
std::vector<int64_t> stats_shape(const at::Tensor& input, at::IntArrayRef normalized_shape);

// Forward: (output, mean, rstd). Backward: (grad_input, grad_weight, grad_bias).
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// RMSNorm forward: (output, rstd). Backward: (grad_input, grad_weight).
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;

// Everything a forward kernel needs: contiguous inputs, allocated outputs.
// weight/bias are undefined tensors when absent; bias and mean always are for RMSNorm.
struct ForwardArgs {
  at::Tensor input, weight, bias;  // contiguous
  at::Tensor output, mean, rstd;   // freshly allocated
  RowShape shape;
  double eps;
  at::ScalarType param_dtype;
};

// Everything a backward kernel needs. grad_weight/grad_bias are allocated with the
// parameters' dtype; the kernel fills them (zeros when there are no rows). For RMSNorm
// mean and grad_bias are undefined.
struct BackwardArgs {
  at::Tensor grad_out, input, mean, rstd, weight;  // contiguous
  at::Tensor grad_input, grad_weight, grad_bias;   // freshly allocated
  RowShape shape;
  at::ScalarType param_dtype;
};

// The host side common to all backends and both norms: checks, .contiguous(), allocation.
ForwardArgs prepare_forward(Norm norm, const at::Tensor& input, at::IntArrayRef normalized_shape,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps);
BackwardArgs prepare_backward(Norm norm, const at::Tensor& grad_out, const at::Tensor& input,
                              at::IntArrayRef normalized_shape, const at::Tensor& mean,
                              const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias);

// The instruction set of the CPU row kernels this process runs: "AVX512", "AVX2" or
// "DEFAULT" (csrc/cpu/layernorm_cpu.cpp; Python: layernorm_ext.cpu_kernels_isa()).
const char* cpu_kernels_isa();

// Outputs of at least this many bytes the CPU kernels write past the cache, with
// non-temporal stores (layernorm_cpu.cpp; Python: layernorm_ext.cpu_stream_threshold()).
int64_t stream_threshold_bytes();

// Empty, or why LAYERNORM_EXT_STREAM_BYTES was ignored (layernorm_cpu.cpp): Python warns
// with it at import, where a C++ warning from an op would only reach stderr.
const std::string& stream_threshold_warning();

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

// The norm a kernel computes, as a type: kernels take it as their first argument.
template <Norm kNorm>
using NormTag = std::integral_constant<Norm, kNorm>;

// The host side of a backend's operators, written once for both norms: checks and
// allocation, the empty cases, the dtype dispatch, then
// `kernel(NormTag<kNorm>, TypeTag<T>, TypeTag<P>, args)`. Returns the filled arguments.
template <Norm kNorm, typename Kernel>
ForwardArgs run_forward(const at::Tensor& input, at::IntArrayRef normalized_shape,
                        const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, double eps,
                        const Kernel& kernel) {
  ForwardArgs args = prepare_forward(kNorm, input, normalized_shape, weight, bias, eps);
  if (args.shape.rows > 0) {
    LAYERNORM_DISPATCH_TYPES(input.scalar_type(), args.param_dtype, "layernorm_ext::forward",
                             [&](auto input_tag, auto param_tag) {
                               kernel(NormTag<kNorm>{}, input_tag, param_tag, args);
                             });
  }
  return args;
}

// Rows == 0 still runs the kernel: it must write zero parameter gradients.
template <Norm kNorm, typename Kernel>
BackwardArgs run_backward(const at::Tensor& grad_out, const at::Tensor& input,
                          at::IntArrayRef normalized_shape, const at::Tensor& mean,
                          const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const Kernel& kernel) {
  BackwardArgs args =
      prepare_backward(kNorm, grad_out, input, normalized_shape, mean, rstd, weight, bias);
  if (args.shape.cols > 0) {
    LAYERNORM_DISPATCH_TYPES(input.scalar_type(), args.param_dtype, "layernorm_ext::backward",
                             [&](auto input_tag, auto param_tag) {
                               kernel(NormTag<kNorm>{}, input_tag, param_tag, args);
                             });
  }
  return args;
}

// The four operators of a backend from its two kernel launchers (each a callable taking
// (NormTag, TypeTag<T>, TypeTag<P>, args)): LayerNorm's forward/backward and RMSNorm's.
template <typename ForwardKernel>
Tensor3 layer_norm_forward(const at::Tensor& input, at::IntArrayRef normalized_shape,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps) {
  const ForwardArgs a =
      run_forward<Norm::kLayer>(input, normalized_shape, weight, bias, eps, ForwardKernel{});
  return {a.output, a.mean, a.rstd};
}

template <typename BackwardKernel>
Tensor3 layer_norm_backward(const at::Tensor& grad_out, const at::Tensor& input,
                            at::IntArrayRef normalized_shape, const at::Tensor& mean,
                            const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias) {
  const BackwardArgs a = run_backward<Norm::kLayer>(grad_out, input, normalized_shape, mean,
                                                    rstd, weight, bias, BackwardKernel{});
  return {a.grad_input, a.grad_weight, a.grad_bias};
}

template <typename ForwardKernel>
Tensor2 rms_norm_forward(const at::Tensor& input, at::IntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight, std::optional<double> eps) {
  const ForwardArgs a =
      run_forward<Norm::kRms>(input, normalized_shape, weight, std::nullopt,
                              rms_norm_eps(input.scalar_type(), eps), ForwardKernel{});
  return {a.output, a.rstd};
}

template <typename BackwardKernel>
Tensor2 rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& input,
                          at::IntArrayRef normalized_shape, const at::Tensor& rstd,
                          const std::optional<at::Tensor>& weight) {
  const BackwardArgs a = run_backward<Norm::kRms>(grad_out, input, normalized_shape,
                                                  at::Tensor(), rstd, weight, std::nullopt,
                                                  BackwardKernel{});
  return {a.grad_input, a.grad_weight};
}

// The element type a TypeTag carries, for the backends' kernel lambdas.
#define LAYERNORM_TAG_TYPE(tag) typename decltype(tag)::type

}  // namespace layernorm_ext
