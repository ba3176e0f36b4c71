// The glm_awq op catalogue: every schema of glm_awq._C lives here (fakes: glm_awq/_fakes.py), with the checked
// entry points of the kernels whose launchers never throw (see ops.h).
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "ops.h"

namespace glm_awq {
namespace {

constexpr int64_t kBK = 128;  // the GEMM's K per pipeline stage (w4a16_gemm.cu)

void check_launch(const char* op, int err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error ", err, " (", cudaGetErrorString(static_cast<cudaError_t>(err)),
              ")");
}

void check_cuda_layout(const char* op, const at::Tensor& weight, const at::Tensor& scale, int64_t k,
                       int64_t group_size, at::ScalarType dtype) {
  TORCH_CHECK(weight.is_cuda() && scale.is_cuda() && weight.device() == scale.device(), op,
              ": weight and scale must be on one CUDA device, got ", weight.device(), " and ", scale.device());
  TORCH_CHECK(weight.scalar_type() == at::kInt && weight.dim() == 4 && weight.size(2) == 32 && weight.size(3) == 4 &&
                  weight.is_contiguous(),
              op, ": weight must be the contiguous repacked int32 [K/16, N/64, 32, 4], got ", weight.scalar_type(),
              " ", weight.sizes());
  const int64_t n = weight.size(1) * 64;
  TORCH_CHECK(weight.size(0) * 16 == k, op, ": K=", k, " but the weight was packed for K=", weight.size(0) * 16);
  TORCH_CHECK(k % kBK == 0 && group_size > 0 && group_size % kBK == 0 && k % group_size == 0, op, ": K=", k,
              " and group_size=", group_size, " must be multiples of ", kBK,
              " (K a multiple of group_size); use the triton backend for this shape");
  TORCH_CHECK(scale.scalar_type() == dtype && scale.dim() == 2 && scale.size(0) == k / group_size &&
                  scale.size(1) == n && scale.is_contiguous(),
              op, ": scale must be the repacked contiguous [G=", k / group_size, ", N=", n, "] in ", dtype, ", got ",
              scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(n <= INT32_MAX && k <= INT32_MAX, op, ": N=", n, " and K=", k, " must fit in int32");
}

}  // namespace

at::Tensor repack_int4(const at::Tensor& weight_packed) {
  TORCH_CHECK(weight_packed.is_cuda(), "repack_int4: weight_packed must be on a CUDA device");
  TORCH_CHECK(weight_packed.scalar_type() == at::kInt, "repack_int4: weight_packed must be int32, got ",
              weight_packed.scalar_type());
  TORCH_CHECK(weight_packed.dim() == 2 || weight_packed.dim() == 3,
              "repack_int4: weight_packed must be [N, K/8] or [E, N, K/8], got ", weight_packed.sizes());
  const int64_t n = weight_packed.size(-2), k = weight_packed.size(-1) * 8;
  TORCH_CHECK(n % 64 == 0 && k % 16 == 0, "repack_int4: N=", n, " must be a multiple of 64 and K=", k,
              " a multiple of 16 for the cuda layout; use the triton backend for this shape");
  TORCH_CHECK(weight_packed.numel() < INT32_MAX * int64_t{4}, "repack_int4: ", weight_packed.numel(),
              " words is too many for one call; repack experts in chunks");
  const c10::cuda::CUDAGuard guard(weight_packed.device());
  auto src = weight_packed.contiguous();
  std::vector<int64_t> shape;
  if (src.dim() == 3) shape.push_back(src.size(0));
  shape.insert(shape.end(), {k / 16, n / 64, 32, 4});
  auto dst = at::empty(shape, src.options());
  check_launch("repack_int4", launch_repack_int4(src, dst, n, k));
  return dst;
}

at::Tensor dequantize_cuda_layout(const at::Tensor& weight, const at::Tensor& scale, int64_t group_size) {
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 || scale.scalar_type() == at::kHalf,
              "dequantize_cuda_layout: scale must be bf16 or fp16 (it sets the output dtype), got ",
              scale.scalar_type());
  TORCH_CHECK(weight.dim() == 4, "dequantize_cuda_layout: weight must be [K/16, N/64, 32, 4], got ", weight.sizes());
  const int64_t k = weight.size(0) * 16, n = weight.size(1) * 64;
  check_cuda_layout("dequantize_cuda_layout", weight, scale, k, group_size, scale.scalar_type());
  const c10::cuda::CUDAGuard guard(weight.device());
  auto out = at::empty({n, k}, scale.options());
  check_launch("dequantize_cuda_layout", launch_dequantize_cuda_layout(weight, scale, out, group_size));
  return out;
}

at::Tensor w4a16_gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                      const std::optional<at::Tensor>& bias, const at::Tensor& tickets, int64_t group_size,
                      int64_t block_n, int64_t splits, int64_t variant, bool weight_settled) {
  TORCH_CHECK(x.is_cuda() && tickets.is_cuda(), "w4a16_gemm: x and tickets must be on a CUDA device");
  TORCH_CHECK(x.dim() == 2, "w4a16_gemm: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "w4a16_gemm: x must be bf16 or fp16, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 4, "w4a16_gemm: weight must be [K/16, N/64, 32, 4], got ", weight.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(1) * 64;
  TORCH_CHECK(k > 0, "w4a16_gemm: K=0 (x ", x.sizes(), "): a layer needs at least one input feature");
  check_cuda_layout("w4a16_gemm", weight, scale, k, group_size, x.scalar_type());
  TORCH_CHECK(x.device() == weight.device() && tickets.device() == weight.device(),
              "w4a16_gemm: x, weight and tickets must be on one device, got ", x.device(), ", ", weight.device(),
              " and ", tickets.device());
  TORCH_CHECK(tickets.scalar_type() == at::kInt && tickets.is_contiguous(), "w4a16_gemm: tickets must be int32");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->numel() == n &&
                    bias->is_contiguous(),
                "w4a16_gemm: bias must be contiguous [N=", n, "] in x's dtype ", x.scalar_type(), " on ",
                x.device(), ", got ", bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  }
  TORCH_CHECK(block_n == 0 || block_n == 64 || block_n == 128 || block_n == 256 || block_n == 512,
              "w4a16_gemm: block_n=", block_n, " must be 0 (auto), 64, 128, 256 or 512");
  TORCH_CHECK(block_n == 0 || n % block_n == 0, "w4a16_gemm: N=", n, " is not a multiple of block_n=", block_n);
  TORCH_CHECK(m <= INT32_MAX, "w4a16_gemm: M=", m, " must fit in int32");
  TORCH_CHECK(variant >= 0 && variant <= 3, "w4a16_gemm: variant=", variant, " must be 0, 1, 2 or 3");
  TORCH_CHECK(variant != 3 || (m <= 16 && block_n <= 256), "w4a16_gemm: the skinny kernel (variant=3) takes M <= 16 "
              "and block_n <= 256, got M=", m, " and block_n=", block_n, "; use variant=0");
  TORCH_CHECK(variant != 3 || skinny_supported(x.get_device()), "w4a16_gemm: the skinny kernel (variant=3) needs 200 KB "
              "of shared memory per block (sm_90 / sm_100); ", x.device(), " allows less; use variant=0");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  auto xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16) xc = xc.clone();  // cp.async reads 16-byte chunks
  const GemmLaunch args{xc, weight, scale, bias.has_value() ? &*bias : nullptr, out, tickets,
                        static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size),
                        splits, static_cast<int>(variant), weight_settled};
  check_launch("w4a16_gemm", launch_w4a16_gemm(args, static_cast<int>(block_n)));
  return out;
}

at::Tensor moe_gemm(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& sorted,
                    const at::Tensor& counts, const at::Tensor& topk_weights, int64_t top_k, int64_t block_m,
                    int64_t mode, int64_t group_size, int64_t variant) {
  TORCH_CHECK(mode == 1 || mode == 2, "moe_gemm: mode=", mode, " must be 1 (gate/up + SiLU) or 2 (down x weight)");
  TORCH_CHECK(a.is_cuda() && a.dim() == 2 && (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf),
              "moe_gemm: a must be a 2-D bf16/fp16 CUDA tensor, got ", a.scalar_type(), " ", a.sizes(), " on ",
              a.device());
  TORCH_CHECK(weight.dim() == 5 && scale.dim() == 3 && weight.size(0) == scale.size(0),
              "moe_gemm: weight must be [E, K/16, N/64, 32, 4] and scale [E, G, N], got ", weight.sizes(), " and ",
              scale.sizes());
  const int64_t e = weight.size(0), k = a.size(1), n = weight.size(2) * 64;
  check_cuda_layout("moe_gemm", weight[0], scale[0], k, group_size, a.scalar_type());
  TORCH_CHECK(weight.is_contiguous() && scale.is_contiguous(), "moe_gemm: weight and scale must be contiguous");
  TORCH_CHECK(n % 128 == 0, "moe_gemm: N=", n, " must be a multiple of 128 (the MoE tile width)");
  TORCH_CHECK(block_m == 8 || block_m == 16 || block_m == 32 || block_m == 48 || block_m == 64, "moe_gemm: block_m=",
              block_m, " must be 8, 16, 32, 48 or 64");
  TORCH_CHECK(block_m != 8 || moe_skinny_fits(k, 8, a.get_device()), "moe_gemm: block_m=8 (the skinny kernel) stages "
              "[8, K] rows in 200 KB of shared memory (sm_90 / sm_100); K=", k, " on ", a.device(),
              " does not fit; use block_m=16 (variant 0)");
  TORCH_CHECK(variant >= 0 && variant <= 6, "moe_gemm: variant=", variant, " must be 0 (default), 1 (tile kernel, "
              "scales into B), 2 (tile kernel, scales folded), 3 (skinny at block_m=16), 4 (wgmma), 5 (tile kernel, "
              "scales folded, as wide as N allows) or 6 (block_m=8: skinny for experts of <= 8 slots, wgmma for the "
              "rest)");
  TORCH_CHECK(variant != 6 || block_m == 8, "moe_gemm: variant=6 (split) takes the sort's blocks of 8; got block_m=",
              block_m);
  TORCH_CHECK(variant != 4 || ((block_m == 64 || block_m == 32) && moe_wgmma_supported(a, weight, scale)),
              "moe_gemm: variant=4 (the wgmma kernel) needs block_m=64 or 32 (got ", block_m, "), at most ",
              kMoeWgmmaMaxExperts, " experts (got ", e,
              "), a and scale of < 2^31 elements and weight of < 2^31 16-byte chunks (got ", a.numel(), ", ",
              scale.numel(), " and ", weight.numel() / 4, ") and an sm_90 GPU with a build that includes sm_90a (",
              a.device(), "); use variant=0");
  const int64_t slots = mode == 1 ? a.size(0) * top_k : a.size(0);
  TORCH_CHECK(top_k >= 1 && sorted.scalar_type() == at::kInt && sorted.dim() == 1 && sorted.numel() % block_m == 0 &&
                  counts.scalar_type() == at::kInt && counts.numel() == e && topk_weights.scalar_type() == at::kFloat &&
                  topk_weights.numel() == slots && sorted.is_contiguous() && counts.is_contiguous() &&
                  topk_weights.is_contiguous(),
              "moe_gemm: expected top_k >= 1 (got ", top_k, "), int32 sorted [blocks * ", block_m, "] (got ",
              sorted.scalar_type(), " ", sorted.sizes(), "), int32 counts [E=", e, "] (got ", counts.sizes(),
              ") and fp32 topk_weights [S=", slots, "] (got ", topk_weights.scalar_type(), " ", topk_weights.sizes(),
              ")");
  TORCH_CHECK(sorted.device() == a.device() && counts.device() == a.device() && topk_weights.device() == a.device() &&
                  weight.device() == a.device(),
              "moe_gemm: all tensors must be on ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({slots, mode == 1 ? n / 2 : n}, a.options());
  if (slots == 0) return out;
  auto ac = a.contiguous();
  if (reinterpret_cast<uintptr_t>(ac.data_ptr()) % 16) ac = ac.clone();
  at::Tensor workspace;
  if (moe_gemm_uses_wgmma(ac, weight, scale, static_cast<int>(block_m), static_cast<int>(variant)))
    workspace = at::empty({moe_wgmma_workspace_bytes(sorted.numel(), slots, e, static_cast<int>(block_m))},
                          a.options().dtype(at::kByte));
  const MoeLaunch args{ac, weight, scale, out, sorted, counts, topk_weights, static_cast<int>(top_k),
                       static_cast<int>(block_m), static_cast<int>(mode), static_cast<int>(group_size),
                       static_cast<int>(variant), workspace};
  check_launch("moe_gemm", launch_moe_gemm(args));
  return out;
}

at::Tensor moe_per_token(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& w2,
                         const at::Tensor& s2, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                         const std::optional<at::Tensor>& expert_map, const at::Tensor& tickets, int64_t group_size,
                         int64_t block_n1, int64_t splits1, int64_t block_n2, int64_t splits2) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "moe_per_token: x must be a 2-D bf16/fp16 CUDA tensor [T, H], got ", x.scalar_type(), " ", x.sizes(),
              " on ", x.device());
  TORCH_CHECK(w13.dim() == 5 && s13.dim() == 3 && w2.dim() == 5 && s2.dim() == 3 && w13.size(0) == s13.size(0) &&
                  w2.size(0) == w13.size(0) && s2.size(0) == w13.size(0),
              "moe_per_token: w13 and w2 must be [E, K/16, N/64, 32, 4] and their scales [E, G, N] with one E, got ",
              w13.sizes(), ", ", s13.sizes(), ", ", w2.sizes(), " and ", s2.sizes());
  const int64_t t = x.size(0), hid = x.size(1), inter = w2.size(1) * 16;
  TORCH_CHECK(w13.size(0) > 0 && hid > 0 && inter > 0, "moe_per_token: E=", w13.size(0), ", H=", hid, " and I=", inter,
              " must be positive");
  check_cuda_layout("moe_per_token (w13)", w13[0], s13[0], hid, group_size, x.scalar_type());
  check_cuda_layout("moe_per_token (w2)", w2[0], s2[0], inter, group_size, x.scalar_type());
  TORCH_CHECK(w13.size(2) * 64 == 2 * inter && w2.size(2) * 64 == hid, "moe_per_token: w13 must have N = 2I = ",
              2 * inter, " (got ", w13.size(2) * 64, ") and w2 N = H = ", hid, " (got ", w2.size(2) * 64, ")");
  TORCH_CHECK(w13.is_contiguous() && s13.is_contiguous() && w2.is_contiguous() && s2.is_contiguous(),
              "moe_per_token: w13, s13, w2 and s2 must be contiguous (as prepare_experts leaves them)");
  TORCH_CHECK(skinny_supported(x.get_device()), "moe_per_token: the skinny kernel needs 200 KB of shared memory per "
              "block (sm_90 / sm_100), which ", x.device(), " does not give; use moe_gemm");
  const int64_t top_k = topk_ids.dim() == 2 ? topk_ids.size(1) : 0;
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt && topk_ids.dim() == 2 && topk_ids.size(0) == t && top_k >= 1 &&
                  top_k <= kMaxTopK && topk_ids.is_contiguous(),
              "moe_per_token: topk_ids must be contiguous int32 [T=", t, ", top_k] with 1 <= top_k <= ", kMaxTopK,
              ", got ",
              topk_ids.scalar_type(), " ", topk_ids.sizes());
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat && topk_weights.sizes() == topk_ids.sizes() &&
                  topk_weights.is_contiguous(),
              "moe_per_token: topk_weights must be contiguous fp32 ", topk_ids.sizes(), ", got ",
              topk_weights.scalar_type(), " ", topk_weights.sizes());
  TORCH_CHECK(!expert_map || (expert_map->scalar_type() == at::kInt && expert_map->dim() == 1 &&
                              expert_map->is_contiguous() && expert_map->device() == x.device()),
              "moe_per_token: expert_map must be a contiguous int32 [E_global] on ", x.device(), ", got ",
              expert_map ? expert_map->scalar_type() : at::kInt, " ", expert_map ? expert_map->sizes() : x.sizes(),
              " on ", expert_map ? expert_map->device() : x.device());
  const int64_t need = t * std::max(top_k * 2 * inter, hid) / 64;
  TORCH_CHECK(tickets.scalar_type() == at::kInt && tickets.is_contiguous() && tickets.numel() >= need,
              "moe_per_token: tickets must be int32 zeros, at least T * max(top_k * 2I, H) / 64 = ", need,
              " of them, got ",
              tickets.scalar_type(), " ", tickets.sizes(), " (CudaBackend.prepare_experts allocates them)");
  for (const at::Tensor* v : {&w13, &s13, &w2, &s2, &topk_ids, &topk_weights, &tickets})
    TORCH_CHECK(v->device() == x.device(), "moe_per_token: all tensors must be on ", x.device(), ", got ", v->device());
  for (const int64_t bn : {block_n1, block_n2})
    TORCH_CHECK(bn == 0 || bn == 64 || bn == 128 || bn == 256, "moe_per_token: block_n=", bn,
                " must be 0 (auto), 64, 128 or 256");
  TORCH_CHECK(hid % std::max<int64_t>(block_n2, 64) == 0, "moe_per_token: H=", hid, " is not a multiple of block_n2=",
              block_n2);
  TORCH_CHECK(splits1 >= 0 && splits2 >= 0, "moe_per_token: splits must be >= 0 (0: auto), got ", splits1, " and ",
              splits2);
  TORCH_CHECK(t * top_k <= INT32_MAX / std::max<int64_t>(2 * inter, 1) && t * hid <= INT32_MAX,
              "moe_per_token: T=", t, " is too many tokens for one call; split x and the routing along T");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({t, hid}, x.options());
  if (t == 0) return out;
  auto h = at::empty({t * top_k, inter}, x.options());
  auto xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16) xc = xc.clone();
  const TokenLaunch args{xc, w13, s13, w2, s2, topk_ids, topk_weights, expert_map ? &*expert_map : nullptr, tickets,
                         h, out, static_cast<int>(group_size), static_cast<int>(block_n1), static_cast<int>(block_n2),
                         splits1, splits2};
  check_launch("moe_per_token", launch_moe_per_token(args));
  return out;
}

at::Tensor moe_sum(const at::Tensor& y, const at::Tensor& local, int64_t top_k) {
  TORCH_CHECK(y.is_cuda() && y.dim() == 2 && (y.scalar_type() == at::kBFloat16 || y.scalar_type() == at::kHalf) &&
                  y.is_contiguous(),
              "moe_sum: y must be a contiguous 2-D bf16/fp16 CUDA tensor, got ", y.scalar_type(), " ", y.sizes());
  TORCH_CHECK(top_k >= 1 && y.size(0) % top_k == 0 && y.size(1) % 8 == 0, "moe_sum: y ", y.sizes(),
              " must be [T * top_k, H] with top_k=", top_k, " and H a multiple of 8");
  TORCH_CHECK(local.scalar_type() == at::kInt && local.numel() == y.size(0) && local.is_contiguous() &&
                  local.device() == y.device(),
              "moe_sum: local must be int32 [S=", y.size(0), "] on ", y.device(), ", got ", local.scalar_type(), " ",
              local.sizes());
  const c10::cuda::CUDAGuard guard(y.device());
  auto out = at::empty({y.size(0) / top_k, y.size(1)}, y.options());
  check_launch("moe_sum", launch_moe_sum(y, local, out, static_cast<int>(top_k)));
  return out;
}

}  // namespace glm_awq

TORCH_LIBRARY(glm_awq, m) {
  // int32 [N, K/8] pack-quantized + scale [N, K/group_size] -> dense [N, K] in `dtype` (bf16 or fp16).
  m.def("dequantize_int4(Tensor weight_packed, Tensor weight_scale, int group_size, ScalarType dtype) -> Tensor");
  // int32 [(E,) N, K/8] checkpoint layout -> int32 [(E,) K/16, N/64, 32, 4] cuda layout (w4a16_gemm.cu header).
  m.def("repack_int4(Tensor weight_packed) -> Tensor");
  // cuda layout [K/16, N/64, 32, 4] + repacked scale [G, N] -> dense [N, K] in the scale's dtype, bit for bit the
  // weights the GEMM's mma path uses (the large-M path runs a dense matmul on it).
  m.def("dequantize_cuda_layout(Tensor weight, Tensor scale, int group_size) -> Tensor");
  // x [M, K] bf16/fp16 @ W^T + bias -> [M, N]. weight: repack_int4's [K/16, N/64, 32, 4]; scale: [G, N] repacked
  // (glm_awq.quant.repack_scales_for_cuda) in x's dtype; tickets: int32 zeros the kernel uses for split-K (the
  // skinny kernel takes one per N tile) and leaves zero; block_n 0 (auto; the skinny kernel picks the width for its
  // auto split, also when splits is given) | 64 | 128 | 256 | 512, splits 0 (auto) or >= 1, variant 0 (default:
  // skinny at M <= 16, else 1) | 1 (scales multiplied into the dequantized B) | 2 (scales folded into the fp32
  // accumulators after each k tile) | 3 (skinny: weights as the mma A operand streamed to registers, M <= 16,
  // w4a16_skinny.cu).
  // weight_settled: the caller promises that no work still queued or running on the stream writes `weight` (it was
  // written before a synchronize, as prepare_linear does); the skinny kernel on sm_90+ then reads its first weights
  // before waiting for the previous kernel to finish (programmatic dependent launch). Leave it False otherwise.
  m.def(
      "w4a16_gemm(Tensor x, Tensor weight, Tensor scale, Tensor? bias, Tensor tickets, int group_size, int block_n, "
      "int splits, int variant=0, bool weight_settled=False) -> Tensor");
  // MoE grouped GEMM over token-slots sorted by expert (glm_awq.kernels.moe._sort with block_m rows per block;
  // block_m = 8 runs the skinny kernel, 16 too under variant 3 where [16, K] rows fit in shared memory, 64 and 32
  // the wgmma kernel on sm_90 (variant 0 or 4), else the tile kernel; at block_m = 16 variant 0 folds the scales in
  // on tiles up to 512 wide while the grid stays large, variant 5 on the widest tile that divides N; variant 6 at
  // block_m = 8 splits the experts: at most 8 slots on the skinny kernel, more on the wgmma kernel's tiles of 32).
  // mode 1: a = x [T, H], weight = w13 [E, H/16, 2I/64, 32, 4] with rows interleaved 32 gate / 32 up
  // (CudaBackend.prepare_experts) -> h [T * top_k, I] = silu(gate) * up. mode 2: a = h [S, I], weight = w2
  // -> y [S, H] = topk_weights[s] * (h[s] @ down^T). Rows of slots whose expert is elsewhere stay unwritten.
  m.def(
      "moe_gemm(Tensor a, Tensor weight, Tensor scale, Tensor sorted, Tensor counts, Tensor topk_weights, int top_k, "
      "int block_m, int mode, int group_size, int variant=0) -> Tensor");
  // The whole MoE layer for a few tokens, per token, without the sort: x [T, H] -> [T, H] =
  // sum_a topk_weights[t, a] * expert_{topk_ids[t, a]}(x[t]). GEMM1 runs the token's top_k (expert, 2I) weights as
  // one [top_k 2I, H] GEMM with SiLU * up and the routing weight in its epilogue (h [T top_k, I]); GEMM2 runs h's row
  // of top_k I as the K of one [H, top_k I] GEMM, summing the slots through split-K in a fixed order. Weights as in
  // moe_gemm (w13 rows interleaved 32 gate / 32 up); topk_ids int32 global ids (negative: none), mapped through
  // expert_map (-1: held elsewhere, contributes nothing); tickets int32 zeros, T * max(top_k 2I, H) / 64 of them,
  // left zero; block_n / splits 0 for auto. The skinny kernel, so sm_90 / sm_100 only (skinny_supported).
  m.def(
      "moe_per_token(Tensor x, Tensor w13, Tensor s13, Tensor w2, Tensor s2, Tensor topk_ids, Tensor topk_weights, "
      "Tensor? expert_map, Tensor tickets, int group_size, int block_n1=0, int splits1=0, int block_n2=0, "
      "int splits2=0) -> Tensor");
  // y [T * top_k, H] -> [T, H]: each token's slots summed in slot order in fp32, slots with local < 0 skipped.
  m.def("moe_sum(Tensor y, Tensor local, int top_k) -> Tensor");
}

TORCH_LIBRARY_IMPL(glm_awq, CUDA, m) {
  m.impl("dequantize_int4", &glm_awq::dequantize_int4);
  m.impl("repack_int4", &glm_awq::repack_int4);
  m.impl("dequantize_cuda_layout", &glm_awq::dequantize_cuda_layout);
  m.impl("w4a16_gemm", &glm_awq::w4a16_gemm);
  m.impl("moe_gemm", &glm_awq::moe_gemm);
  m.impl("moe_per_token", &glm_awq::moe_per_token);
  m.impl("moe_sum", &glm_awq::moe_sum);
}

// glm_awq._C.wgmma_supported(device) -> bool: whether moe_gemm's wgmma kernel (variant 4) runs on that device with
// this build (an sm_90 GPU and sm_90a code). Not an op: it takes no tensor and never runs under torch.compile.
static PyObject* py_wgmma_supported(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
  return PyBool_FromLong(glm_awq::wgmma_device_supported(static_cast<int>(device)));
}

// glm_awq._C.set_wgmma_grid_cap(ctas): at most `ctas` CTAs in the wgmma kernel's persistent grid (0, the default:
// as many as fit the SMs, one per SM or four for the tiles of 32 slots), so that a small test problem runs many tiles
// per CTA.
static PyObject* py_set_wgmma_grid_cap(PyObject*, PyObject* arg) {
  const long long ctas = PyLong_AsLongLong(arg);
  if (ctas == -1 && PyErr_Occurred()) return nullptr;
  if (ctas < 0) {
    PyErr_Format(PyExc_ValueError, "set_wgmma_grid_cap: ctas=%lld must be >= 0 (0 = as many as fit the SMs)", ctas);
    return nullptr;
  }
  glm_awq::set_moe_wgmma_grid_cap(ctas);
  Py_RETURN_NONE;
}

// glm_awq._C.set_skinny_pdl(mode): the dense skinny GEMM's programmatic dependent launch (sm_90+): 0 off, 1 on (the
// default), 2 on with the first weight batch loaded before the wait for the previous kernel (ops.h says when that is
// safe). Read at each launch, so a CUDA graph keeps the mode of its capture. Benchmarks and tests.
static PyObject* py_set_skinny_pdl(PyObject*, PyObject* arg) {
  const long mode = PyLong_AsLong(arg);
  if (mode == -1 && PyErr_Occurred()) return nullptr;
  if (mode < 0 || mode > 2) {
    PyErr_Format(PyExc_ValueError, "set_skinny_pdl: mode=%ld must be 0 (off), 1 (on) or 2 (on, weights first)", mode);
    return nullptr;
  }
  glm_awq::set_skinny_pdl(static_cast<int>(mode));
  Py_RETURN_NONE;
}

// `import glm_awq._C` needs a module init; the ops register themselves through the static initializers above.
extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"wgmma_supported", py_wgmma_supported, METH_O, "wgmma_supported(device: int) -> bool"},
      {"set_wgmma_grid_cap", py_set_wgmma_grid_cap, METH_O,
       "set_wgmma_grid_cap(ctas: int) -> None (0: as many as fit the SMs)"},
      {"set_skinny_pdl", py_set_skinny_pdl, METH_O,
       "set_skinny_pdl(mode: int) -> None (0 off, 1 on: default, 2 weights first)"},
      {nullptr, nullptr, 0, nullptr}};
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "glm_awq CUDA kernels (see torch.ops.glm_awq)", -1,
                               methods};
  return PyModule_Create(&module);
}
