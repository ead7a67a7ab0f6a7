// The forward ops called through the dispatcher from C++, from wherever the dispatch
// stands: the autograd kernels below autograd, the autocast kernels past autocast, the
// eager entry points (python_module.cpp) from the top. Defined with the schemas
// (layernorm.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>

#include <optional>

#include "layernorm.h"

namespace layernorm_ext {

Tensor3 call_forward(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                     const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, double eps);

Tensor2 call_rms_forward(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight, std::optional<double> eps);

}  // namespace layernorm_ext
