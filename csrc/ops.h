// Host entry points of glm_awq._C, one per schema in ops.cpp.
#pragma once
#include <ATen/core/Tensor.h>

namespace glm_awq {

at::Tensor dequantize_int4(const at::Tensor& weight_packed, const at::Tensor& weight_scale, int64_t group_size,
                           at::ScalarType dtype);

// w4a16_gemm.cu: checkpoint int32 [(E,) N, K/8] -> the cuda layout int32 [(E,) K/16, N/64, 32, 4].
at::Tensor repack_int4(const at::Tensor& weight_packed);

// w4a16_gemm.cu: x [M, K] @ W^T (+ bias) with W repacked by repack_int4 and scales repacked to [G, N].
at::Tensor w4a16_gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                      const std::optional<at::Tensor>& bias, const at::Tensor& tickets, int64_t group_size,
                      int64_t block_n, int64_t splits);

}  // namespace glm_awq
