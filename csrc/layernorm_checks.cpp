// The argument checks and the host-side preparation shared by every backend and both
// norms (declared in layernorm.h): one place, torch's messages. Separate from the
// operator schemas (layernorm.cpp) so a test build can link them without registering
// the operators a second time (tests/cuda_emulator/).
#include <c10/util/irange.h>

#include <limits>

#include "layernorm.h"

namespace layernorm_ext {

namespace {

void check_floating(const at::Tensor& t, const char* what) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(is_kernel_dtype(dtype), "layernorm_ext: ", what,
                              " must be float32, float64, float16 or bfloat16, but got ", dtype);
}

void check_same_device(const at::Tensor& input, const at::Tensor& other) {
  TORCH_CHECK(input.device() == other.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ",
              input.device(), " and ", other.device(), "!");
}

void check_param_shape(const std::optional<at::Tensor>& param, const char* name,
                       at::IntArrayRef normalized_shape) {
  if (!param.has_value() || !param->defined()) return;
  TORCH_CHECK(param->sizes() == normalized_shape, "Expected ", name,
              " to be of same shape as normalized_shape, but got ", name, " of shape ",
              param->sizes(), " and normalized_shape = ", normalized_shape);
}

void check_param(const at::Tensor& input, const at::Tensor& param, const char* name) {
  check_same_device(input, param);
  check_floating(param, name);
  const auto in = input.scalar_type();
  const auto p = param.scalar_type();
  const bool reduced_input = in == at::kHalf || in == at::kBFloat16;
  TORCH_CHECK(kernels_pair(in, p), "mixed dtype: expected ", name, " to have the input's dtype (",
              in, ")", reduced_input ? " or float32" : "", ", but got ", p);
}

// The shape messages: layer_norm's, and rms_norm's, which torch words differently
// ("[*5, 4]"; a ValueError for an input with too few dims).
void check_input_shape(Norm norm, const at::Tensor& input, at::IntArrayRef normalized_shape) {
  const int64_t normalized_ndim = normalized_shape.size();
  const auto input_shape = input.sizes();
  const int64_t input_ndim = input.dim();
  if (norm == Norm::kRms) {
    TORCH_CHECK_VALUE(input_ndim >= normalized_ndim, "Input tensor must have at least ",
                      normalized_ndim, " dimensions, but got ", input_ndim);
  }
  if (input_ndim < normalized_ndim ||
      !input_shape.slice(input_ndim - normalized_ndim).equals(normalized_shape)) {
    std::stringstream ss;
    ss << "Given normalized_shape=" << normalized_shape << ", expected input with shape [*";
    for (const auto i : c10::irange(normalized_ndim)) {
      ss << (norm == Norm::kLayer || i > 0 ? ", " : "") << normalized_shape[i];
    }
    ss << "], but got input of size" << input_shape;
    TORCH_CHECK(false, ss.str());
  }
}

}  // namespace

RowShape check_norm_inputs(Norm norm, const at::Tensor& input, at::IntArrayRef normalized_shape,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias) {
  const int64_t normalized_ndim = normalized_shape.size();
  TORCH_CHECK(normalized_ndim >= 1,
              "Expected normalized_shape to be at least 1-dimensional, i.e., ",
              "containing at least one element, but got normalized_shape = ", normalized_shape);
  // torch's order: the parameters' shapes, then the input's, then the dtypes.
  check_param_shape(weight, "weight", normalized_shape);
  check_param_shape(bias, "bias", normalized_shape);
  check_input_shape(norm, input, normalized_shape);
  if (norm == Norm::kRms) {
    const auto dtype = input.scalar_type();
    TORCH_CHECK_NOT_IMPLEMENTED(is_kernel_dtype(dtype), "\"rms_norm\" not implemented for '",
                                c10::toString(dtype), "'");
  }
  check_floating(input, "input");
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_INTERNAL_ASSERT(norm == Norm::kLayer || !has_bias, "RMSNorm has no bias");
  if (has_weight) check_param(input, *weight, "weight");
  if (has_bias) check_param(input, *bias, "bias");
  if (has_weight && has_bias) {
    TORCH_CHECK(weight->scalar_type() == bias->scalar_type(),
                "mixed dtype: expected weight and bias to have the same dtype, but got ",
                weight->scalar_type(), " and ", bias->scalar_type());
  }
  const int64_t axis = input.dim() - normalized_ndim;
  return {c10::multiply_integers(input.sizes().slice(0, axis)),
          c10::multiply_integers(input.sizes().slice(axis))};
}

void check_layer_norm_backward_inputs(const at::Tensor& grad_out, const at::Tensor& input,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const RowShape& shape) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "Expected grad_out of shape ", input.sizes(),
              ", but got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "Expected grad_out of dtype ",
              input.scalar_type(), ", but got ", grad_out.scalar_type());
  const auto stats = stats_dtype(input.scalar_type());
  for (const at::Tensor* t : {&grad_out, &mean, &rstd}) {
    if (t->defined()) check_same_device(input, *t);  // RMSNorm: no mean
  }
  for (const at::Tensor* t : {&mean, &rstd}) {
    if (!t->defined()) continue;
    TORCH_CHECK(t->numel() == shape.rows && t->scalar_type() == stats,
                "Expected mean and rstd with ", shape.rows, " elements of dtype ", stats,
                ", but got ", t->numel(), " elements of dtype ", t->scalar_type());
  }
}

at::ScalarType stats_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

double rms_norm_eps(at::ScalarType input_dtype, std::optional<double> eps) {
  if (eps.has_value()) return *eps;
  return input_dtype == at::kDouble ? std::numeric_limits<double>::epsilon()
                                    : std::numeric_limits<float>::epsilon();
}

at::ScalarType param_dtype(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias) {
  if (weight.has_value() && weight->defined()) return weight->scalar_type();
  if (bias.has_value() && bias->defined()) return bias->scalar_type();
  return input.scalar_type();
}

std::vector<int64_t> stats_shape(const at::Tensor& input, at::IntArrayRef normalized_shape) {
  const auto sizes = input.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end() - normalized_shape.size());
}

namespace {
at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}
}  // namespace

ForwardArgs prepare_forward(Norm norm, const at::Tensor& input, at::IntArrayRef normalized_shape,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps) {
  const RowShape shape = check_norm_inputs(norm, input, normalized_shape, weight, bias);
  ForwardArgs args;
  args.input = input.contiguous();
  args.weight = contiguous_or_undefined(weight);
  args.bias = contiguous_or_undefined(bias);
  args.output = at::empty(input.sizes(), input.options(), at::MemoryFormat::Contiguous);
  const auto stats_options = input.options().dtype(stats_dtype(input.scalar_type()));
  const auto mean_shape = stats_shape(input, normalized_shape);
  if (norm == Norm::kLayer) args.mean = at::empty(mean_shape, stats_options);
  args.rstd = at::empty(mean_shape, stats_options);
  args.shape = shape;
  args.eps = eps;
  args.param_dtype = param_dtype(input, weight, bias);
  return args;
}

BackwardArgs prepare_backward(Norm norm, const at::Tensor& grad_out, const at::Tensor& input,
                              at::IntArrayRef normalized_shape, const at::Tensor& mean,
                              const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias) {
  const RowShape shape = check_norm_inputs(norm, input, normalized_shape, weight, bias);
  check_layer_norm_backward_inputs(grad_out, input, mean, rstd, shape);
  BackwardArgs args;
  args.grad_out = grad_out.contiguous();
  args.input = input.contiguous();
  if (norm == Norm::kLayer) args.mean = mean.contiguous();
  args.rstd = rstd.contiguous();
  args.weight = contiguous_or_undefined(weight);
  args.grad_input = at::empty(input.sizes(), input.options(), at::MemoryFormat::Contiguous);
  args.param_dtype = param_dtype(input, weight, bias);
  const auto param_options = input.options().dtype(args.param_dtype);
  args.grad_weight = at::empty(normalized_shape, param_options);
  if (norm == Norm::kLayer) args.grad_bias = at::empty(normalized_shape, param_options);
  args.shape = shape;
  return args;
}

}  // namespace layernorm_ext
