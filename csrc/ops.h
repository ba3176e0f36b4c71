// Host entry points of glm_awq._C, one per schema in ops.cpp, and the raw launchers behind them.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace glm_awq {

at::Tensor dequantize_int4(const at::Tensor& weight_packed, const at::Tensor& weight_scale, int64_t group_size,
                           at::ScalarType dtype);

// Checked entry points (ops.cpp): validate, allocate, launch, raise with the numbers.
at::Tensor repack_int4(const at::Tensor& weight_packed);
at::Tensor dequantize_cuda_layout(const at::Tensor& weight, const at::Tensor& scale, int64_t group_size);
at::Tensor w4a16_gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                      const std::optional<at::Tensor>& bias, const at::Tensor& tickets, int64_t group_size,
                      int64_t block_n, int64_t splits, int64_t variant, bool weight_settled);
at::Tensor moe_gemm(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& sorted,
                    const at::Tensor& counts, const at::Tensor& topk_weights, int64_t top_k, int64_t block_m,
                    int64_t mode, int64_t group_size, int64_t variant);
at::Tensor moe_per_token(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& w2,
                         const at::Tensor& s2, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                         const std::optional<at::Tensor>& expert_map, const at::Tensor& tickets, int64_t group_size,
                         int64_t block_n1, int64_t splits1, int64_t block_n2, int64_t splits2);
at::Tensor moe_sum(const at::Tensor& y, const at::Tensor& local, int64_t top_k);

// Raw launchers (w4a16_gemm.cu): trust their inputs, never throw, return a cudaError_t as int. The checks and
// every error message live in ops.cpp, compiled by the host C++ compiler (an exception thrown from nvcc-built
// host code crashed the process on the device machine's toolchain).
struct GemmLaunch {
  const at::Tensor& x;        // [M, K] bf16/fp16, contiguous, 16-byte aligned
  const at::Tensor& weight;   // int32 [K/16, N/64, 32, 4]
  const at::Tensor& scale;    // [G, N] in x's dtype
  const at::Tensor* bias;     // [N] in x's dtype, or nullptr
  const at::Tensor& out;      // [M, N] in x's dtype
  const at::Tensor& tickets;  // int32 zeros
  int m, n, k, group_size;
  int64_t splits;             // 0: auto
  int variant;                // 0: default, 1: scales into B, 2: scales folded after each stage, 3: skinny
  bool weight_settled;        // nothing queued or running on the stream writes `weight` (the op's schema says more)
};
int launch_w4a16_gemm(const GemmLaunch& args, int block_n);
// The skinny kernel (w4a16_skinny.cu): M <= 16, block_n 0 (auto) | 64 | 128 | 256; skinny_preferred says whether
// variant 0 (the default) takes it for these arguments.
int launch_w4a16_skinny(const GemmLaunch& args, int block_n);
bool skinny_preferred(const GemmLaunch& args, int block_n);
// Whether `device` lets a block opt into the 200 KB of shared memory the skinny kernel is built for (sm_90 and
// sm_100 do; sm_80 / 86 / 89 / 120 do not, and take the tile kernel).
bool skinny_supported(int device);
// Programmatic dependent launch of the dense skinny GEMM on sm_90+: 0 off, 1 on (default; it waits for the previous
// kernel before its first load, except that a settled weight's first batch (GemmLaunch::weight_settled) is loaded
// before that wait), 2 on with the first weight batch loaded before that wait, settled or not (benchmarks and tests
// only). Read at launch: a captured CUDA graph keeps the mode it was captured with.
void set_skinny_pdl(int mode);

struct MoeLaunch {
  const at::Tensor& a;        // GEMM1 (mode 1): x [T, H]; GEMM2 (mode 2): h [S, I]; bf16/fp16, contiguous, aligned
  const at::Tensor& weight;   // int32 [E, K/16, N/64, 32, 4]; GEMM1's rows interleaved 32 gate / 32 up
  const at::Tensor& scale;    // [E, G, N] in a's dtype
  const at::Tensor& out;      // GEMM1: [S, N/2]; GEMM2: [S, N]
  const at::Tensor& sorted;   // int32 [max_blocks * block_m] from the token sort
  const at::Tensor& counts;   // int32 [E]
  const at::Tensor& weights;  // fp32 [S]
  int top_k, block_m, mode, group_size, variant;
  // uint8 [moe_wgmma_workspace_bytes] where moe_gemm_uses_wgmma, else unused: allocated by the caller (ops.cpp),
  // since the launchers never throw
  const at::Tensor& workspace;
  // Set by launch_moe_gemm for the split variant: the skinny kernel takes only experts of at most max_count slots,
  // the wgmma kernel only experts of more than min_count.
  int max_count = 0, min_count = 0;
};
int launch_moe_gemm(const MoeLaunch& args);
// Whether launch_moe_gemm takes the wgmma kernel for these arguments (block_m 64 or 32 with variant 0 or 4, or
// block_m 8 with variant 6, the split; and moe_wgmma_supported), and the workspace that kernel needs: its work
// list, at most one record per tile.
bool moe_gemm_uses_wgmma(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& scale, int block_m,
                         int variant);
int64_t moe_wgmma_workspace_bytes(int64_t sorted_numel, int64_t slots, int64_t experts, int block_m);
// block_m = 8 (under the split, variant 6, only its experts of at most 8 slots: MoeLaunch::max_count), and
// block_m = 16 under variant 3 where it fits, run the skinny kernel (w4a16_skinny.cu); it stages a block's x rows
// [block_m, K] in shared memory, so K is bounded: moe_skinny_fits(K, block_m, device) says whether it is (and
// whether the device runs it at all).
int launch_moe_skinny(const MoeLaunch& args);
// The MoE layer for a few tokens without the sort (w4a16_skinny.cu): GEMM1 for every (token, slot) pair, then GEMM2
// with the slot sum through split-K, two launches of the skinny kernel. Needs skinny_supported.
constexpr int kMaxTopK = 32;  // slots per token moe_per_token takes (the kernel keeps their experts in shared memory)
struct TokenLaunch {
  const at::Tensor& x;           // [T, H] bf16/fp16, contiguous, 16-byte aligned
  const at::Tensor& w13;         // int32 [E, H/16, 2I/64, 32, 4], rows interleaved 32 gate / 32 up
  const at::Tensor& s13;         // [E, H/group, 2I] in x's dtype
  const at::Tensor& w2;          // int32 [E, I/16, H/64, 32, 4]
  const at::Tensor& s2;          // [E, I/group, H] in x's dtype
  const at::Tensor& ids;         // int32 [T, top_k]: global expert ids (negative: none), top_k <= kMaxTopK
  const at::Tensor& weights;     // fp32 [T, top_k]
  const at::Tensor* expert_map;  // int32 [E_global] (-1: held elsewhere) or nullptr
  const at::Tensor& tickets;     // int32 zeros, T * max(top_k 2I, H) / 64 of them; left zero
  const at::Tensor& h;           // [T * top_k, I] in x's dtype: GEMM1's output, GEMM2's input
  const at::Tensor& out;         // [T, H] in x's dtype
  int group_size;
  int block_n1, block_n2;        // tile widths of GEMM1 and GEMM2: 0 (auto), 64, 128 or 256
  int64_t splits1, splits2;      // 0: auto
};
int launch_moe_per_token(const TokenLaunch& args);
bool moe_skinny_fits(int64_t k, int block_m, int device);
// The Hopper MoE kernel (w4a16_wgmma.cu): blocks of 64 or 32 slots on an sm_90 device with sm_90a code in this build
// (wgmma_device_supported), N % 128 == 0, at most kMoeWgmmaMaxExperts local experts (its work-list kernel scans them
// in 2 E + 1 ints of shared memory), and a, scale (elements) and weight (16-byte chunks) below 2^31 (its copy
// addresses are 32-bit offsets): moe_wgmma_supported says whether all of that holds.
constexpr int kMoeWgmmaMaxExperts = 4096;
int launch_moe_wgmma(const MoeLaunch& args);
bool wgmma_device_supported(int device);
bool moe_wgmma_supported(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& scale);
void set_moe_wgmma_grid_cap(int64_t ctas);
int launch_moe_sum(const at::Tensor& y, const at::Tensor& local, const at::Tensor& out, int top_k);
int launch_repack_int4(const at::Tensor& src, const at::Tensor& dst, int64_t n, int64_t k);
int launch_dequantize_cuda_layout(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& out,
                                  int64_t group_size);

}  // namespace glm_awq
