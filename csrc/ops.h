// Host entry points of glm_awq._C, one per schema in ops.cpp.
#pragma once
#include <ATen/core/Tensor.h>

namespace glm_awq {

at::Tensor dequantize_int4(const at::Tensor& weight_packed, const at::Tensor& weight_scale, int64_t group_size,
                           at::ScalarType dtype);

}  // namespace glm_awq
