// W4A16 GEMM, Marlin-style: y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias), int4 symmetric weights in groups
// along K, bf16/fp16 activations, fp32 accumulation on mma.sync m16n8k16. Also the weight repack it needs.
//
// Legend: M tokens, N output features, K input features, G = K / group_size.
//
// Repacked weight ("cuda layout"), int32 [K/16, N/64, 32, 4] (a leading E for stacked experts):
//   one 16x64 (k x n) sub-tile is 512 bytes = 32 lanes x 16 bytes, so each lane of a warp fetches the B operands
//   of eight m16n8k16 mmas (n8 blocks 0..7 of the sub-tile) with one 16-byte load. In lane l (g = l / 4,
//   t = l % 4), int i holds n8 blocks 2i and 2i+1 of column g, nibble j (bits 4j..4j+3, value q + 8) is
//     n8 block 2i + ((j >> 1) & 1),  k row 2t + (j >> 2) + 8 * (j & 1)   (rows of the 16-deep k step).
//   So nibbles (0,4) are the two halves of the first b register of block 2i, (1,5) its second, (2,6) and (3,7)
//   those of block 2i+1: exactly the pairs the lop3 dequant below extracts from one word. The twin in
//   glm_awq/quant.py (repack_for_cuda) writes the same bits; tests compare them.
// Repacked scale, [G, N] in the activation dtype: inside each 64-column block, position 8 * g + b holds column
//   8 * b + g, so the lane with column g reads the scales of its eight n8 blocks with one 16-byte load.
//
// Work split: a CTA computes a BM x BN tile over a contiguous range of K (split-K when M is small, so that the
// grid fills every SM). Its 8 warps are WN along N (64 columns each) by WK = 8 / WN along K: each warp runs its
// share of the 16-deep k steps of every stage, and the WK partial tiles are summed in shared memory in a fixed
// order. Split-K partials go to an fp32 workspace; the CTA that finishes a tile last (an atomic ticket per
// tile) sums the splits in split order, adds the bias and writes the output, then resets the ticket to zero.
// Every sum has a fixed order, so the output bits do not depend on scheduling.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "ops.h"

namespace glm_awq {
namespace {

constexpr int kThreads = 256;  // 8 warps per CTA
constexpr int kStages = 4;     // cp.async pipeline depth: 3 k-tiles in flight while one is computed
constexpr int kBK = 128;       // K per pipeline stage (one scale row per stage: group_size % kBK == 0)

// ------------------------------------------------------------------------------------------------ PTX helpers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that skips L1; src_bytes = 0 zero-fills (rows past M) without reading memory.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}

// Weights are read once per call: mark them evict-first so they do not push activations and partials out of L2.
__device__ __forceinline__ void cp_async16_stream(void* smem, const void* gmem) {
  asm volatile(
      "{\n"
      "  .reg .b64 pol;\n"
      "  createpolicy.fractional.L2::evict_first.b64 pol, 1.0;\n"
      "  cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, pol;\n"
      "}\n" ::"r"(smem_u32(smem)),
      "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices: the whole 16x16 A operand of one mma in one instruction.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// (a & b) | c in one instruction (LUT 0xEA = (0xF0 & 0xCC) | 0xAA): picks nibbles and plants the float exponent.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// ---------------------------------------------------------------------------------------- dtype vocabulary

template <typename T>
struct Num;

template <>
struct Num<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  // Word of 8 nibbles (value q + 8) -> four half2 of q: (n0,n4), (n1,n5), (n2,n6), (n3,n7).
  // 0x6400 | n is the fp16 1024 + n (ulp 1 at 1024), so subtracting 1032 leaves n - 8 exactly; a nibble four
  // bits up reads as 1024 + 16n, and fma(x, 1/16, -72) = n - 8. Two nibble pairs per lop3, no int->float cvt.
  static __device__ __forceinline__ void dequant(uint32_t q, uint32_t (&w)[4]) {
    const uint32_t lo0 = and_or(q, 0x000f000fu, 0x64006400u), hi0 = and_or(q, 0x00f000f0u, 0x64006400u);
    q >>= 8;
    const uint32_t lo1 = and_or(q, 0x000f000fu, 0x64006400u), hi1 = and_or(q, 0x00f000f0u, 0x64006400u);
    const uint32_t k1032 = 0x64086408u, k1_16 = 0x2c002c00u, km72 = 0xd480d480u;
    const __half2 sub = *reinterpret_cast<const __half2*>(&k1032);
    const __half2 mul = *reinterpret_cast<const __half2*>(&k1_16), add = *reinterpret_cast<const __half2*>(&km72);
    __half2 r0 = __hsub2(*reinterpret_cast<const __half2*>(&lo0), sub);
    __half2 r1 = __hfma2(*reinterpret_cast<const __half2*>(&hi0), mul, add);
    __half2 r2 = __hsub2(*reinterpret_cast<const __half2*>(&lo1), sub);
    __half2 r3 = __hfma2(*reinterpret_cast<const __half2*>(&hi1), mul, add);
    w[0] = *reinterpret_cast<uint32_t*>(&r0);
    w[1] = *reinterpret_cast<uint32_t*>(&r1);
    w[2] = *reinterpret_cast<uint32_t*>(&r2);
    w[3] = *reinterpret_cast<uint32_t*>(&r3);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Num<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  // bf16 has 7 mantissa bits, so only the lowest nibble of each half fits under the exponent: 0x4300 | n is
  // 128 + n (ulp 1 at 128) and subtracting 136 leaves n - 8 exactly. One lop3 per nibble pair, shifting by 4.
  static __device__ __forceinline__ void dequant(uint32_t q, uint32_t (&w)[4]) {
    const uint32_t k136 = 0x43084308u;
    const __nv_bfloat162 sub = *reinterpret_cast<const __nv_bfloat162*>(&k136);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const uint32_t v = and_or(q >> (4 * p), 0x000f000fu, 0x43004300u);
      __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v), sub);
      w[p] = *reinterpret_cast<uint32_t*>(&r);
    }
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// -------------------------------------------------------------------------------------------------- GEMM

template <int M_BLOCKS, int WN>
struct Tile {
  static constexpr int WK = 8 / WN;               // warps splitting each stage's K
  static constexpr int KPW = kBK / 16 / WK;       // 16-deep k steps per warp per stage
  static constexpr int BM = 16 * M_BLOCKS, BN = 64 * WN;
  static constexpr int A_CHUNKS = BM * kBK / 8;   // 16-byte chunks of activations per stage
  static constexpr int B_CHUNKS = kBK * BN / 32;  // 16-byte chunks of int4 weights per stage
  static constexpr int S_CHUNKS = BN / 8;         // 16-byte chunks of scales per stage
  static constexpr int SMEM = kStages * (A_CHUNKS + B_CHUNKS + S_CHUNKS) * 16;
  static constexpr int RED = WN * M_BLOCKS * 32 * 32 * 4;  // bytes of the cross-warp K reduction buffer
  static_assert(RED <= SMEM, "the K reduction reuses the pipeline's shared memory");
};

template <typename T,      // activation, scale, bias and output dtype: __half or __nv_bfloat16
          int M_BLOCKS,    // 16-row token blocks per CTA tile: BM = 16 * M_BLOCKS (1..4)
          int WN>          // warps along N, 64 columns each: BN = 64 * WN (1 or 2); the other 8 / WN warps split K
__global__ void __launch_bounds__(kThreads) w4a16_gemm_kernel(
    const T* __restrict__ x,       // [M, K] row-major, 16-byte aligned rows
    const int4* __restrict__ wq,   // [K/16, N/64, 32] int4 chunks: the cuda layout above
    const T* __restrict__ wsc,     // [G, N] repacked scales
    const T* __restrict__ bias,    // [N] or nullptr
    T* __restrict__ out,           // [M, N]
    float* __restrict__ partial,   // [splits, M, N] fp32 when gridDim.z > 1
    int* __restrict__ tickets,     // [m_tiles * n_tiles] zeros, left zero
    int M, int N, int K, int group_size, int k_tiles_per_split) {
  using Cfg = Tile<M_BLOCKS, WN>;
  using V = Num<T>;
  constexpr int WK = Cfg::WK, KPW = Cfg::KPW, BM = Cfg::BM, BN = Cfg::BN;
  constexpr int A_CHUNKS = Cfg::A_CHUNKS, B_CHUNKS = Cfg::B_CHUNKS, S_CHUNKS = Cfg::S_CHUNKS;

  extern __shared__ int4 smem[];
  int4* sA = smem;                          // [kStages][BM rows][16 chunks], chunk XOR-swizzled by row % 8
  int4* sB = sA + kStages * A_CHUNKS;       // [kStages][8 k16 steps][WN][32 lanes]
  int4* sS = sB + kStages * B_CHUNKS;       // [kStages][BN / 8]
  __shared__ int last_cta;

  const int mt = blockIdx.x, nt = blockIdx.y, split = blockIdx.z;
  const int m0 = mt * BM, n0 = nt * BN;
  const int k_tiles = K / kBK;
  const int kt0 = split * k_tiles_per_split;
  const int iters = min(k_tiles, kt0 + k_tiles_per_split) - kt0;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int n64 = N / 64;

  // Issue the copies of k-tile kt0 + it into stage slot it % kStages; always commit a group, even an empty
  // one, so that wait_group<kStages - 2> below always means "the tile about to be computed has landed".
  auto fetch = [&](int it) {
    if (it < iters) {
      const int slot = it % kStages, kt = kt0 + it;
#pragma unroll
      for (int c = tid; c < A_CHUNKS; c += kThreads) {
        // 16 chunks per 128-wide row; the XOR swizzle puts the 8 rows one ldmatrix phase reads in 8 bank groups.
        const int r = c / 16, cc = c % 16, row = m0 + r;
        const bool valid = row < M;
        const T* src = x + static_cast<size_t>(valid ? row : 0) * K + kt * kBK + cc * 8;
        cp_async16(&sA[slot * A_CHUNKS + r * 16 + (cc ^ (r & 7))], src, valid);
      }
#pragma unroll
      for (int c = tid; c < B_CHUNKS; c += kThreads) {
        // Each k16 row of the tile is WN sub-tiles = WN * 512 contiguous bytes of the repacked weight.
        const int r = c / (WN * 32), cc = c % (WN * 32);
        cp_async16_stream(&sB[slot * B_CHUNKS + c], wq + (static_cast<size_t>(kt * 8 + r) * n64 + nt * WN) * 32 + cc);
      }
      if (tid < S_CHUNKS) {
        const int g = kt * kBK / group_size;
        cp_async16(&sS[slot * S_CHUNKS + tid], wsc + static_cast<size_t>(g) * N + n0 + tid * 8, true);
      }
    }
    cp_async_commit();
  };

  float acc[M_BLOCKS][8][4];
#pragma unroll
  for (int mb = 0; mb < M_BLOCKS; ++mb)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mb][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) fetch(s);

  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // the tile `it` is visible to all warps, and every warp is done with slot (it - 1)
    fetch(it + kStages - 1);
    const int slot = it % kStages;
    // Scales of my column g in n8 blocks 0..7 (the repack put them side by side): word i = blocks (2i, 2i+1).
    const int4 sv = sS[slot * S_CHUNKS + wn * 8 + (lane >> 2)];
    const uint32_t sw[4] = {static_cast<uint32_t>(sv.x), static_cast<uint32_t>(sv.y), static_cast<uint32_t>(sv.z),
                            static_cast<uint32_t>(sv.w)};
#pragma unroll
    for (int kk = 0; kk < KPW; ++kk) {
      const int ks = wk * KPW + kk;  // 16-deep k step inside the stage
      uint32_t a[M_BLOCKS][4];
#pragma unroll
      for (int mb = 0; mb < M_BLOCKS; ++mb) {
        // ldmatrix: lanes 0-15 address rows 0-15 at k 0..7 of the step, lanes 16-31 the same rows at k 8..15.
        const int r = mb * 16 + (lane & 15), cc = ks * 2 + (lane >> 4);
        ldmatrix_x4(a[mb], &sA[slot * A_CHUNKS + r * 16 + (cc ^ (r & 7))]);
      }
      const int4 bq = sB[slot * B_CHUNKS + (ks * WN + wn) * 32 + lane];
      const uint32_t q[4] = {static_cast<uint32_t>(bq.x), static_cast<uint32_t>(bq.y), static_cast<uint32_t>(bq.z),
                             static_cast<uint32_t>(bq.w)};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t w[4];
        V::dequant(q[i], w);
        const uint32_t s_lo = __byte_perm(sw[i], 0, 0x1010), s_hi = __byte_perm(sw[i], 0, 0x3232);  // broadcast
        w[0] = V::mul(w[0], s_lo);
        w[1] = V::mul(w[1], s_lo);
        w[2] = V::mul(w[2], s_hi);
        w[3] = V::mul(w[3], s_hi);
#pragma unroll
        for (int mb = 0; mb < M_BLOCKS; ++mb) {
          V::mma(acc[mb][2 * i], a[mb], w[0], w[1]);
          V::mma(acc[mb][2 * i + 1], a[mb], w[2], w[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers are free: reuse them for the K reduction

  // Sum the WK warps' partial tiles in a fixed order: warp row WK-1 stores, WK-2 .. 1 add, 0 adds last.
  if constexpr (WK > 1) {
    float* red = reinterpret_cast<float*>(smem);
#pragma unroll 1
    for (int w = WK - 1; w >= 1; --w) {
      if (wk == w) {
#pragma unroll
        for (int mb = 0; mb < M_BLOCKS; ++mb)
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float* p = &red[((wn * M_BLOCKS + mb) * 32 + j * 4 + e) * 32 + lane];
              *p = (w == WK - 1) ? acc[mb][j][e] : acc[mb][j][e] + *p;
            }
      }
      __syncthreads();
    }
    if (wk == 0) {
#pragma unroll
      for (int mb = 0; mb < M_BLOCKS; ++mb)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mb][j][e] += red[((wn * M_BLOCKS + mb) * 32 + j * 4 + e) * 32 + lane];
    }
  }

  // C fragment of an m16n8 block: (row g, cols 2t, 2t+1) in c0, c1 and row g + 8 in c2, c3.
  const int g = lane >> 2, t = lane & 3;
  if (gridDim.z == 1) {
    if (wk == 0) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = n0 + wn * 64 + j * 8 + 2 * t;
        const float b0 = bias ? V::to_float(bias[col]) : 0.f, b1 = bias ? V::to_float(bias[col + 1]) : 0.f;
#pragma unroll
        for (int mb = 0; mb < M_BLOCKS; ++mb) {
          const int row = m0 + mb * 16 + g;
          if (row < M)
            *reinterpret_cast<uint32_t*>(&out[static_cast<size_t>(row) * N + col]) =
                V::pack(acc[mb][j][0] + b0, acc[mb][j][1] + b1);
          if (row + 8 < M)
            *reinterpret_cast<uint32_t*>(&out[static_cast<size_t>(row + 8) * N + col]) =
                V::pack(acc[mb][j][2] + b0, acc[mb][j][3] + b1);
        }
      }
    }
    return;
  }

  // Split-K: publish this split's partial tile, then the last CTA of the tile sums all splits in split order.
  const size_t plane = static_cast<size_t>(M) * N;
  if (wk == 0) {
    float* part = partial + split * plane;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int col = n0 + wn * 64 + j * 8 + 2 * t;
#pragma unroll
      for (int mb = 0; mb < M_BLOCKS; ++mb) {
        const int row = m0 + mb * 16 + g;
        if (row < M)
          *reinterpret_cast<float2*>(&part[static_cast<size_t>(row) * N + col]) = make_float2(acc[mb][j][0], acc[mb][j][1]);
        if (row + 8 < M)
          *reinterpret_cast<float2*>(&part[static_cast<size_t>(row + 8) * N + col]) =
              make_float2(acc[mb][j][2], acc[mb][j][3]);
      }
    }
  }
  __threadfence();  // partials reach L2 before the ticket says so
  __syncthreads();
  int* ticket = &tickets[mt * gridDim.y + nt];
  if (tid == 0) last_cta = atomicAdd(ticket, 1) == static_cast<int>(gridDim.z) - 1;
  __syncthreads();
  if (!last_cta) return;
  __threadfence();
  const int rows = min(BM, M - m0);
  for (int e = tid; e < rows * (BN / 4); e += kThreads) {
    const int r = e / (BN / 4), c = (e % (BN / 4)) * 4;
    const size_t off = static_cast<size_t>(m0 + r) * N + n0 + c;
    float4 s = __ldcg(reinterpret_cast<const float4*>(partial + off));
    for (int sp = 1; sp < static_cast<int>(gridDim.z); ++sp) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(partial + sp * plane + off));
      s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
    }
    if (bias) {
      s.x += V::to_float(bias[n0 + c]), s.y += V::to_float(bias[n0 + c + 1]);
      s.z += V::to_float(bias[n0 + c + 2]), s.w += V::to_float(bias[n0 + c + 3]);
    }
    uint2 o;
    o.x = V::pack(s.x, s.y);
    o.y = V::pack(s.z, s.w);
    *reinterpret_cast<uint2*>(&out[static_cast<size_t>(m0 + r) * N + n0 + c]) = o;
  }
  if (tid == 0) *ticket = 0;  // ready for the next call (and for CUDA-graph replays)
}

// ------------------------------------------------------------------------------------------------ repack

// One thread per int32 of the cuda layout: gathers its 8 nibbles from the checkpoint layout (see the header).
__global__ void repack_int4_kernel(const uint32_t* __restrict__ src,  // [B, N, K/8] checkpoint layout
                                   uint32_t* __restrict__ dst,        // [B, K/16, N/64, 32, 4] cuda layout
                                   int N, int K, int64_t total) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= total) return;
  const int i = idx % 4, lane = (idx / 4) % 32;
  const int64_t sub = idx / 128;  // (b, kb, nb) flattened
  const int nb = sub % (N / 64);
  const int64_t kbb = sub / (N / 64);
  const int kb = kbb % (K / 16);
  const int64_t b = kbb / (K / 16);
  const int g = lane / 4, t = lane % 4;
  const uint32_t* base = src + b * static_cast<int64_t>(N) * (K / 8);
  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int n = nb * 64 + (2 * i + ((j >> 1) & 1)) * 8 + g;
    const int k = kb * 16 + 2 * t + (j >> 2) + 8 * (j & 1);
    const uint32_t nib = (base[static_cast<int64_t>(n) * (K / 8) + k / 8] >> (4 * (k % 8))) & 0xFu;
    word |= nib << (4 * j);
  }
  dst[idx] = word;
}

// ------------------------------------------------------------------------------------------------ launch

int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 64 && cache[device]) return cache[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cache[device] = n;
  return n;
}

template <typename T, int M_BLOCKS, int WN>
void launch(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wsc, const T* bias, at::Tensor& out,
            float* partial, int* tickets, int m, int n, int k, int group_size, int m_tiles, int splits,
            int k_per_split, cudaStream_t stream) {
  using Cfg = Tile<M_BLOCKS, WN>;
  auto kernel = w4a16_gemm_kernel<T, M_BLOCKS, WN>;
  static bool configured = false;  // per instantiation; the attribute is per function, not per device
  if (!configured) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM));
    configured = true;
  }
  const dim3 grid(m_tiles, n / Cfg::BN, splits);
  kernel<<<grid, kThreads, Cfg::SMEM, stream>>>(
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const int4*>(wq.data_ptr()),
      reinterpret_cast<const T*>(wsc.data_ptr()), bias, reinterpret_cast<T*>(out.data_ptr()), partial, tickets, m,
      n, k, group_size, k_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The instantiation table: dtype x M_BLOCKS {1, 2, 3, 4} x WN {1 (BN = 64), 2 (BN = 128)}.
template <typename T>
void dispatch(int m_blocks, int wn, const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wsc, const T* bias,
              at::Tensor& out, float* partial, int* tickets, int m, int n, int k, int group_size, int m_tiles,
              int splits, int k_per_split, cudaStream_t stream) {
#define GLM_AWQ_GEMM_CASE(MB, W)                                                                                   \
  if (m_blocks == MB && wn == W)                                                                                   \
    return launch<T, MB, W>(x, wq, wsc, bias, out, partial, tickets, m, n, k, group_size, m_tiles, splits,          \
                            k_per_split, stream);
  GLM_AWQ_GEMM_CASE(1, 1) GLM_AWQ_GEMM_CASE(2, 1) GLM_AWQ_GEMM_CASE(3, 1) GLM_AWQ_GEMM_CASE(4, 1)
  GLM_AWQ_GEMM_CASE(1, 2) GLM_AWQ_GEMM_CASE(2, 2) GLM_AWQ_GEMM_CASE(3, 2) GLM_AWQ_GEMM_CASE(4, 2)
#undef GLM_AWQ_GEMM_CASE
  TORCH_CHECK(false, "w4a16_gemm: no kernel instantiated for m_blocks=", m_blocks, ", block_n=", 64 * wn);
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
  const c10::cuda::CUDAGuard guard(weight_packed.device());
  auto src = weight_packed.contiguous();
  std::vector<int64_t> shape;
  if (src.dim() == 3) shape.push_back(src.size(0));
  shape.insert(shape.end(), {k / 16, n / 64, 32, 4});
  auto dst = at::empty(shape, src.options());
  const int64_t total = dst.numel();
  if (total == 0) return dst;
  const int threads = 256;
  repack_int4_kernel<<<(total + threads - 1) / threads, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint32_t*>(src.data_ptr()), reinterpret_cast<uint32_t*>(dst.data_ptr()),
      static_cast<int>(n), static_cast<int>(k), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dst;
}

at::Tensor w4a16_gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                      const std::optional<at::Tensor>& bias, const at::Tensor& tickets, int64_t group_size,
                      int64_t block_n, int64_t splits) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda() && scale.is_cuda() && tickets.is_cuda(),
              "w4a16_gemm: all tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 2, "w4a16_gemm: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "w4a16_gemm: x must be bf16 or fp16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kInt && weight.dim() == 4 && weight.size(2) == 32 && weight.size(3) == 4,
              "w4a16_gemm: weight must be the repacked int32 [K/16, N/64, 32, 4], got ", weight.scalar_type(), " ",
              weight.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(1) * 64;
  TORCH_CHECK(weight.size(0) * 16 == k, "w4a16_gemm: x has K=", k, " but the weight was packed for K=",
              weight.size(0) * 16);
  TORCH_CHECK(k % kBK == 0 && group_size > 0 && group_size % kBK == 0 && k % group_size == 0,
              "w4a16_gemm: K=", k, " and group_size=", group_size, " must be multiples of ", kBK,
              " (K a multiple of group_size); use the triton backend for this shape");
  TORCH_CHECK(scale.scalar_type() == x.scalar_type() && scale.dim() == 2 && scale.size(0) == k / group_size &&
                  scale.size(1) == n && scale.is_contiguous(),
              "w4a16_gemm: scale must be the repacked contiguous [G=", k / group_size, ", N=", n, "] in x's dtype ",
              x.scalar_type(), ", got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(weight.is_contiguous(), "w4a16_gemm: weight must be contiguous");
  TORCH_CHECK(tickets.scalar_type() == at::kInt && tickets.is_contiguous(), "w4a16_gemm: tickets must be int32");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == n && bias->is_contiguous(),
                "w4a16_gemm: bias must be contiguous [N=", n, "] in x's dtype ", x.scalar_type(), ", got ",
                bias->scalar_type(), " ", bias->sizes());
  }
  TORCH_CHECK(block_n == 0 || block_n == 64 || block_n == 128, "w4a16_gemm: block_n=", block_n,
              " must be 0 (auto), 64 or 128");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  auto xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16) xc = xc.clone();  // cp.async reads 16-byte chunks

  const int wn = block_n == 64 ? 1 : block_n == 128 ? 2 : (n % 128 == 0 ? 2 : 1);
  TORCH_CHECK(n % (64 * wn) == 0, "w4a16_gemm: N=", n, " is not a multiple of block_n=", 64 * wn);
  const int m_blocks = static_cast<int>(std::min<int64_t>(4, (m + 15) / 16));
  const int64_t m_tiles = (m + 16 * m_blocks - 1) / (16 * m_blocks);
  const int64_t n_tiles = n / (64 * wn), k_tiles = k / kBK;
  TORCH_CHECK(m_tiles <= 65535 * 1024, "w4a16_gemm: M=", m, " is too large");

  // Split K until the grid is about two CTAs per SM (what fits beside each other at small M); never more
  // splits than k tiles, and only while the tile grid is small enough for the tickets.
  int64_t s = splits;
  if (s <= 0) {
    const int64_t tiles = m_tiles * n_tiles, target = 2 * sm_count(x.get_device());
    s = tiles >= target ? 1 : std::min<int64_t>(16, target / tiles);
  }
  s = std::max<int64_t>(1, std::min(s, k_tiles));
  if (m_tiles * n_tiles > tickets.numel()) s = 1;
  const int64_t k_per_split = (k_tiles + s - 1) / s;
  s = (k_tiles + k_per_split - 1) / k_per_split;  // no empty splits

  at::Tensor partial;
  if (s > 1) partial = at::empty({s, m, n}, x.options().dtype(at::kFloat));
  float* partial_ptr = s > 1 ? partial.data_ptr<float>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k), gs = static_cast<int>(group_size);
  if (x.scalar_type() == at::kBFloat16) {
    const auto* b = bias.has_value() ? reinterpret_cast<const __nv_bfloat16*>(bias->data_ptr()) : nullptr;
    dispatch<__nv_bfloat16>(m_blocks, wn, xc, weight, scale, b, out, partial_ptr, tickets.data_ptr<int>(), mi, ni, ki,
                            gs, static_cast<int>(m_tiles), static_cast<int>(s), static_cast<int>(k_per_split), stream);
  } else {
    const auto* b = bias.has_value() ? reinterpret_cast<const __half*>(bias->data_ptr()) : nullptr;
    dispatch<__half>(m_blocks, wn, xc, weight, scale, b, out, partial_ptr, tickets.data_ptr<int>(), mi, ni, ki, gs,
                     static_cast<int>(m_tiles), static_cast<int>(s), static_cast<int>(k_per_split), stream);
  }
  return out;
}

}  // namespace glm_awq
