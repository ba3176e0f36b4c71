// Dequantize compressed-tensors pack-quantized int4 to bf16/fp16: the simplest kernel of the extension.
// It proves the build path and serves prefill (dense GEMM on the dequantized weight) until the GEMM lands.
//
// Layout: weight_packed int32 [N, K/8]; nibble j of word w (bits 4j..4j+3) is element 8w+j, stored +8.
// One thread per word: one 4-byte load, eight conversions, one 16-byte store.
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "ops.h"

namespace glm_awq {
namespace {

// torch builds with __CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__: convert explicitly.
__device__ inline float to_float(__half v) { return __half2float(v); }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float to_float(float v) { return v; }

template <typename T>
__device__ inline T from_float(float v);
template <>
__device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, typename S>
__global__ void dequantize_int4_kernel(const int32_t* __restrict__ packed, const S* __restrict__ scale,
                                       T* __restrict__ out, int64_t words, int64_t words_per_row,
                                       int64_t groups_per_row, int64_t words_per_group) {
  const int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (w >= words) return;
  const int64_t row = w / words_per_row;
  const int64_t col = w % words_per_row;
  const float s = to_float(scale[row * groups_per_row + col / words_per_group]);
  const uint32_t word = static_cast<uint32_t>(packed[w]);
  alignas(16) T vals[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) vals[j] = from_float<T>(static_cast<float>(static_cast<int>((word >> (4 * j)) & 0xF) - 8) * s);
  *reinterpret_cast<uint4*>(out + w * 8) = *reinterpret_cast<const uint4*>(vals);
}

template <typename T>
void launch(const at::Tensor& packed, const at::Tensor& scale, at::Tensor& out, int64_t group_size) {
  const int64_t words = packed.numel();
  if (words == 0) return;
  const int threads = 256;
  const int64_t blocks = (words + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t wpr = packed.size(1), gpr = scale.size(1), wpg = group_size / 8;
  auto* o = reinterpret_cast<T*>(out.data_ptr());
  const auto* p = packed.data_ptr<int32_t>();
  switch (scale.scalar_type()) {
    case at::kBFloat16:
      dequantize_int4_kernel<T, __nv_bfloat16><<<blocks, threads, 0, stream>>>(
          p, reinterpret_cast<const __nv_bfloat16*>(scale.data_ptr()), o, words, wpr, gpr, wpg);
      break;
    case at::kHalf:
      dequantize_int4_kernel<T, __half><<<blocks, threads, 0, stream>>>(
          p, reinterpret_cast<const __half*>(scale.data_ptr()), o, words, wpr, gpr, wpg);
      break;
    case at::kFloat:
      dequantize_int4_kernel<T, float><<<blocks, threads, 0, stream>>>(p, scale.data_ptr<float>(), o, words, wpr, gpr, wpg);
      break;
    default:
      TORCH_CHECK(false, "dequantize_int4: weight_scale dtype ", scale.scalar_type(), " is not bf16, fp16 or fp32");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor dequantize_int4(const at::Tensor& weight_packed, const at::Tensor& weight_scale, int64_t group_size,
                           at::ScalarType dtype) {
  TORCH_CHECK(weight_packed.is_cuda() && weight_scale.is_cuda(), "dequantize_int4: tensors must be on a CUDA device");
  TORCH_CHECK(weight_packed.scalar_type() == at::kInt, "dequantize_int4: weight_packed must be int32, got ",
              weight_packed.scalar_type());
  TORCH_CHECK(weight_packed.dim() == 2 && weight_scale.dim() == 2, "dequantize_int4: expected 2-D tensors, got ",
              weight_packed.sizes(), " and ", weight_scale.sizes());
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, "dequantize_int4: group_size=", group_size,
              " must be a positive multiple of 8");
  const int64_t n = weight_packed.size(0), k = weight_packed.size(1) * 8;
  TORCH_CHECK(k % group_size == 0 && weight_scale.size(0) == n && weight_scale.size(1) == k / group_size,
              "dequantize_int4: weight_scale ", weight_scale.sizes(), " does not match weight_packed ",
              weight_packed.sizes(), " (K=", k, ") with group_size=", group_size);
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "dequantize_int4: dtype must be bf16 or fp16, got ", dtype);
  const c10::cuda::CUDAGuard guard(weight_packed.device());
  auto packed = weight_packed.contiguous();
  auto scale = weight_scale.contiguous();
  auto out = at::empty({n, k}, packed.options().dtype(dtype));
  if (dtype == at::kBFloat16)
    launch<__nv_bfloat16>(packed, scale, out, group_size);
  else
    launch<__half>(packed, scale, out, group_size);
  return out;
}

}  // namespace glm_awq
