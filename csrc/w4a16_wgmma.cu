// Hopper (sm_90a) MoE GEMM for many tokens per expert: the int4 weights are wgmma's A operand straight from
// registers, the token rows its B operand in shared memory. Same cuda layout, modes and sort as w4a16_gemm.cu;
// the mma.sync tile kernel there is mma-rate bound from ~128 slots per expert (benchmarks/NOTES.md), and wgmma
// has twice its tensor-core rate on this card.
//
// Legend: BT = 64 token-slots per block (one expert's sorted run, kernels/moe.py _sort), N output features,
// K input features, WGS warpgroups per CTA, 256 output features each.
//
// Data flow of one CTA (an expert block of BT slots x 256 WGS features, the whole K):
//  - A = weights, m64 x k16 per wgmma, in registers. In the cuda layout a lane's 16-byte chunk of a 16 x 64
//    (k x n) sub-tile holds, in int i, the A fragment of features 16i .. 16i+15 (w4a16_skinny.cu's header works
//    it out: A = {w0, w2, w1, w3} of the dequantized nibble pairs). Warp w of a warpgroup takes 64-feature block
//    w, so wgmma i (i < 4) multiplies features {64 w + 16 i + r}: a fixed row permutation the epilogue undoes.
//    The scale is multiplied in before the wgmma (one bf16/fp16 rounding of q * s, as the tile kernel).
//  - B = x rows of the block's slots, [BT, 128] per stage, K-major with the 128-byte swizzle (16-byte chunk c of
//    row r stored at chunk c ^ (r % 8)), two 64-wide halves; one descriptor per k16 step (a 32-byte offset).
//  - A cp.async pipeline of STAGES slots of (x tile, weight chunks, scales), STAGES - 1 in flight. The one barrier
//    per stage sits in its last k16 step, after the wait for step 6's wgmmas: it publishes the next stage and frees
//    the slot of the previous one (whose last wgmmas every warp waited for in this stage's first step), which is
//    refilled right after it.
//  - Per k16 step: fence, four m64n64k16 wgmmas (async), commit, wait for the previous step's group, then
//    dequantize the next step's chunk (the next stage's first, in the last step) into the other A register set
//    while this one's wgmmas run.
//  - Epilogue: SiLU(gate) * up (GEMM1: features 16i+r of a 64-block, i < 2, are gate columns 32 b + 16 i + r, and
//    i + 2 the matching up rows, in the same thread) or routing weight * acc (GEMM2), staged through shared memory
//    so that each slot's row is written with 16-byte stores.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "w4a16_common.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GLM_AWQ_WGMMA_DEVICE 1  // this pass compiles for sm_90a: the wgmma instructions exist
#endif

namespace glm_awq {
namespace {

constexpr int kBT = 64;          // token-slots per block (wgmma N)
constexpr int kOutPad = 8;       // elements of padding per staged output row

template <int WGS, int STAGES>
struct Wg {
  static constexpr int THREADS = 128 * WGS, ROWS = 256 * WGS, NB = ROWS / 64;  // NB 64-feature blocks
  static constexpr int A_BYTES = kBT * kBK * 2;     // x tile of a stage: 16 KB
  static constexpr int B_BYTES = 8 * NB * 512;      // weight chunks of a stage: 8 k16 steps x NB blocks x 32 lanes
  static constexpr int S_BYTES = ROWS * 2;          // scales of a stage
  static constexpr int PREFETCH = STAGES - 1;       // stages in flight while one is computed
  static constexpr int PIPE = STAGES * (A_BYTES + B_BYTES + S_BYTES);
  static constexpr int OUT = kBT * (ROWS + kOutPad) * 2;  // staged output tile (reuses the pipeline)
  static constexpr int SMEM = 1024 + (PIPE > OUT ? PIPE : OUT);  // + alignment of the swizzled x tiles
  static constexpr int MIN_BLOCKS = 2 * (SMEM + 2048) <= kSmemPerSM ? 2 : 1;  // CTAs per SM (__launch_bounds__)
  static_assert(A_BYTES % 1024 == 0, "x tiles stay 1024-byte aligned (the swizzle pattern repeats every 1 KB)");
  static_assert(STAGES >= 3, "one stage computed, one landing, one being issued at least");
};

// ---------------------------------------------------------------------------------------------- wgmma helpers

#ifdef GLM_AWQ_WGMMA_DEVICE
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes through the generic proxy and wgmma reads shared memory through the async proxy: each writer
// fences before the barrier that publishes a stage.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Shared-memory descriptor of a K-major [rows, 64] bf16/fp16 tile with the 128-byte swizzle: 8-row core groups
// 1024 bytes apart (stride byte offset); the leading byte offset is unused for swizzled K-major tiles.
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

#define GLM_AWQ_WGMMA_ACC32                                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"
#define GLM_AWQ_WGMMA_OUTS(d)                                                                                     \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),     \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),      \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),     \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// d[64 x 64] += a[64 x 16] (registers, this warp's 16 rows) . B[16 x 64] (shared memory, K-major): D row 16 w + g
// (+8) of warp w, column 8 j + 2 t (+1) in d[4 j + (0, 1) (+2)].
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], const uint32_t (&a)[4], uint64_t desc);
template <>
__device__ __forceinline__ void wgmma_m64n64k16<__nv_bfloat16>(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " GLM_AWQ_WGMMA_ACC32
               ", {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"
               : GLM_AWQ_WGMMA_OUTS(d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma_m64n64k16<__half>(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " GLM_AWQ_WGMMA_ACC32
               ", {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"
               : GLM_AWQ_WGMMA_OUTS(d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
#endif  // GLM_AWQ_WGMMA_DEVICE

// ------------------------------------------------------------------------------------------------------ kernel

template <typename T,  // activation, scale and output dtype: __half or __nv_bfloat16
          int WGS,     // warpgroups per CTA (1 or 2): 256 WGS output features
          int STAGES,  // pipeline slots (3 or 4)
          int MODE>    // kGateUp or kDown (w4a16_common.h)
__global__ void __launch_bounds__(Wg<WGS, STAGES>::THREADS, Wg<WGS, STAGES>::MIN_BLOCKS) moe_wgmma_kernel(
    const T* __restrict__ x,      // GEMM1: x [T, K]; GEMM2: h [S, K]; 16-byte aligned rows
    const int4* __restrict__ wq,  // [E, K/16, N/64, 32] int4 chunks: the cuda layout
    const T* __restrict__ wsc,    // [E, G, N] repacked scales
    T* __restrict__ out,          // GEMM1: [S, N/2]; GEMM2: [S, N]
    int N, int K, int group_size, MoeArgs moe) {
#ifdef GLM_AWQ_WGMMA_DEVICE
  using C = Wg<WGS, STAGES>;
  using V = Num<T>;
  constexpr int THREADS = C::THREADS, NB = C::NB;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  uint8_t* sA = base;                                      // [STAGES][2 halves][BT rows][128 B], swizzled
  int4* sB = reinterpret_cast<int4*>(sA + STAGES * C::A_BYTES);  // [STAGES][8 k16][NB][32 lanes]
  int4* sS = sB + STAGES * C::B_BYTES / 16;             // [STAGES][ROWS / 8] scale chunks
  __shared__ int s_slot[kBT];
  __shared__ int s_info[2];

  const int nt = blockIdx.x, m0 = blockIdx.y * kBT;  // N tile fastest: a block's x rows stay in L2 across tiles
  const int n0 = nt * C::ROWS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;  // warp = 4 * warpgroup + warp in warpgroup
  if (warp == 0) find_expert_block<kBT>(moe, m0, lane, s_slot, s_info);
  __syncthreads();
  if (s_info[0] < 0) return;
  const int rows_here = s_info[1];
  wq += s_info[0] * moe.w_stride;
  wsc += s_info[0] * moe.s_stride;
  const int n64 = N / 64, iters = K / kBK;

  // Copy plan. x: 1024 chunks per stage (row r = c / 16, chunk c % 16 of its 128 k; half = chunk / 8), rows past
  // the block's slots zero-filled. Weights: 8 k16 steps x NB blocks x 32 lanes, each step's NB * 512 bytes
  // contiguous in the cuda layout. Scales: ROWS / 8 chunks.
  constexpr int A_PER = kBT * 16 / THREADS, B_PER = 8 * NB * 32 / THREADS;
  const T* a_src[A_PER];
  int a_dst[A_PER];
  bool a_ok[A_PER];
#pragma unroll
  for (int i = 0; i < A_PER; ++i) {
    const int c = tid + THREADS * i, r = c >> 4, cc = c & 15, half = cc >> 3, ch = cc & 7;
    a_ok[i] = r < rows_here;
    const int slot = s_slot[a_ok[i] ? r : 0];
    const int row = MODE == kGateUp ? slot / moe.top_k : slot;
    a_src[i] = x + static_cast<size_t>(a_ok[i] ? row : 0) * K + cc * 8;
    a_dst[i] = half * (kBT * 128) + r * 128 + ((ch ^ (r & 7)) << 4);
  }
  static_assert(B_PER == 8, "one chunk of each k16 step per thread: chunk tid of step i");
  const int4* b_src = wq + static_cast<size_t>(n0 / 64) * 32 + tid;  // step i adds i * n64 * 32
  const size_t b_step = static_cast<size_t>(n64) * 32, b_stride = 8 * b_step;  // chunks per k16 step / k tile

  auto fetch = [&](int it) {
    if (it < iters) {
      const int slot = it % STAGES;
#pragma unroll
      for (int i = 0; i < A_PER; ++i)
        cp_async16(sA + slot * C::A_BYTES + a_dst[i], a_src[i] + it * kBK, a_ok[i]);
#pragma unroll
      for (int i = 0; i < B_PER; ++i)
        cp_async16_stream(&sB[slot * (C::B_BYTES / 16) + tid + THREADS * i], b_src + it * b_stride + i * b_step);
      if (tid < C::ROWS / 8) {
        const int g = it * kBK / group_size;
        cp_async16(&sS[slot * (C::ROWS / 8) + tid], wsc + static_cast<size_t>(g) * N + n0 + tid * 8, true);
      }
    }
    cp_async_commit();
  };

  const int wgw = warp;  // this warp's 64-feature block within the CTA tile
  const int g = lane >> 2, t = lane & 3;
  float acc[4][32];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int e = 0; e < 32; ++e) {
      acc[i][e] = 0.f;
      asm volatile("" : "+f"(acc[i][e])::"memory");  // the zeros are defined before the first wgmma's fence
    }

  // One k16 step's A fragments: dequantized nibble pairs (0,4) (1,5) (2,6) (3,7) of int i = a0a1, a4a5, a2a3,
  // a6a7 of features 16 i + (g, g + 8), times the scales of n8 blocks 2i (row g) and 2i+1 (row g + 8).
  uint32_t afr[2][4][4];
  auto dequant_step = [&](const int4 chunk, const uint32_t (&s2)[8], uint32_t (&a)[4][4]) {
    const uint32_t q[4] = {static_cast<uint32_t>(chunk.x), static_cast<uint32_t>(chunk.y),
                           static_cast<uint32_t>(chunk.z), static_cast<uint32_t>(chunk.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t w[4];
      V::dequant(q[i], w);
      a[i][0] = V::mul(w[0], s2[2 * i]);
      a[i][1] = V::mul(w[2], s2[2 * i + 1]);
      a[i][2] = V::mul(w[1], s2[2 * i]);
      a[i][3] = V::mul(w[3], s2[2 * i + 1]);
    }
  };

  // Scales of my column g in n8 blocks 0..7 of my 64-feature block (the repack put them side by side), each
  // broadcast to both halves of a pair: s2[b] multiplies the A registers of block b.
  uint32_t s2[8];
  auto load_scales = [&](int slot) {
    const int4 sv = sS[slot * (C::ROWS / 8) + wgw * 8 + g];
    const uint32_t sw[4] = {static_cast<uint32_t>(sv.x), static_cast<uint32_t>(sv.y), static_cast<uint32_t>(sv.z),
                            static_cast<uint32_t>(sv.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s2[2 * i] = __byte_perm(sw[i], 0, 0x1010);
      s2[2 * i + 1] = __byte_perm(sw[i], 0, 0x3232);
    }
  };
  auto chunks = [&](int slot) { return sB + slot * (C::B_BYTES / 16) + wgw * 32 + lane; };

#pragma unroll
  for (int s = 0; s < C::PREFETCH; ++s) fetch(s);
  cp_async_wait<C::PREFETCH - 1>();
  fence_proxy_async();
  __syncthreads();
  load_scales(0);
  dequant_step(chunks(0)[0], s2, afr[0]);

  for (int it = 0; it < iters; ++it) {
    const int slot = it % STAGES;
    const int4* bchunks = chunks(slot);
    const uint32_t a_base = smem_u32(sA + slot * C::A_BYTES);
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      int4 next;
      if (kk + 1 < 8) next = bchunks[(kk + 1) * NB * 32];
      const uint64_t desc = smem_desc_sw128(a_base + (kk >> 2) * (kBT * 128) + (kk & 3) * 32);
      wgmma_fence();
#pragma unroll
      for (int i = 0; i < 4; ++i) wgmma_m64n64k16<T>(acc[i], afr[kk & 1][i], desc);
      wgmma_commit();
      wgmma_wait<1>();  // the previous step's wgmmas are done: its A registers and shared memory are free
      if (kk + 1 < 8) {
        dequant_step(next, s2, afr[(kk + 1) & 1]);
      } else if (it + 1 < iters) {
        cp_async_wait<C::PREFETCH - 2>();  // stage it + 1 has landed (this thread's copies)
        fence_proxy_async();
        __syncthreads();  // ... everyone's; and every warp is done with stage it - 1's slot
        fetch(it + C::PREFETCH);
        load_scales((it + 1) % STAGES);
        dequant_step(chunks((it + 1) % STAGES)[0], s2, afr[0]);
      }
    }
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int e = 0; e < 32; ++e) asm volatile("" : "+f"(acc[i][e])::"memory");  // reads after the wait
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is free: stage the output tile there

  // Output tile [BT slots][COLS + pad] in T; D row 16 (warp % 4) + g (+8) of wgmma i is feature
  // 64 wgw + 16 i + g (+8); column 8 j + 2 t (+1) is slot row 8 j + 2 t (+1) of the block.
  constexpr int COLS = MODE == kGateUp ? C::ROWS / 2 : C::ROWS, PITCH = COLS + kOutPad;
  T* tile = reinterpret_cast<T*>(base);
  if constexpr (MODE == kGateUp) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = 32 * wgw + 16 * i + g + 8 * h;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float gt = acc[i][4 * j + 2 * h + c], up = acc[i + 2][4 * j + 2 * h + c];
            tile[(8 * j + 2 * t + c) * PITCH + col] = V::from_float(gt / (1.f + __expf(-gt)) * up);
          }
      }
  } else {
    float rw[16];  // routing weights of this thread's 16 slot rows (0 past the block's slots)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int r = 8 * j + 2 * t + c;
        rw[2 * j + c] = r < rows_here ? moe.weights[s_slot[r]] : 0.f;
      }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = 64 * wgw + 16 * i + g + 8 * h;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c)
            tile[(8 * j + 2 * t + c) * PITCH + col] = V::from_float(acc[i][4 * j + 2 * h + c] * rw[2 * j + c]);
      }
  }
  __syncthreads();
  const int out_n = MODE == kGateUp ? N / 2 : N, col0 = MODE == kGateUp ? n0 / 2 : n0;
  for (int e = tid; e < rows_here * (COLS / 8); e += THREADS) {
    const int r = e / (COLS / 8), c8 = (e % (COLS / 8)) * 8;
    *reinterpret_cast<int4*>(&out[static_cast<size_t>(s_slot[r]) * out_n + col0 + c8]) =
        *reinterpret_cast<const int4*>(&tile[r * PITCH + c8]);
  }
#else
  __trap();  // built without sm_90a: the launcher never starts it (moe_wgmma_supported)
#endif
}

template <typename T, int WGS, int STAGES, int MODE>
cudaError_t launch_wgmma(const MoeLaunch& a) {
  using C = Wg<WGS, STAGES>;
  auto kernel = moe_wgmma_kernel<T, WGS, STAGES, MODE>;
  static uint64_t configured = 0;
  const cudaError_t err = allow_dynamic_smem(kernel, C::SMEM, configured);
  if (err != cudaSuccess) return err;
  const int num_experts = static_cast<int>(a.weight.size(0));
  const int k = static_cast<int>(a.weight.size(1) * 16), n = static_cast<int>(a.weight.size(2) * 64);
  const int64_t max_blocks = a.sorted.numel() / kBT;
  if (max_blocks == 0) return cudaSuccess;
  if (max_blocks > 65535) return cudaErrorInvalidConfiguration;
  const MoeArgs moe{a.sorted.data_ptr<int>(), a.counts.data_ptr<int>(), a.weights.data_ptr<float>(), num_experts,
                    a.top_k, a.weight.size(1) * a.weight.size(2) * 32, a.scale.size(1) * a.scale.size(2)};
  const dim3 grid(static_cast<unsigned>(n / C::ROWS), static_cast<unsigned>(max_blocks), 1);
  kernel<<<grid, C::THREADS, C::SMEM, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(a.a.data_ptr()), reinterpret_cast<const int4*>(a.weight.data_ptr()),
      reinterpret_cast<const T*>(a.scale.data_ptr()), reinterpret_cast<T*>(a.out.data_ptr()), n, k, a.group_size,
      moe);
  return cudaGetLastError();
}

}  // namespace

bool moe_wgmma_supported(int device, int64_t n) {
  static int cache[64] = {0};  // 1: runs sm_90a code, -1: does not
  if (n % 256 || device < 0 || device >= 64) return false;
  if (cache[device] == 0) {
    int major = 0;
    cudaFuncAttributes attr{};
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                    major == 9 &&
                    cudaFuncGetAttributes(&attr, moe_wgmma_kernel<__nv_bfloat16, 2, 4, kDown>) == cudaSuccess &&
                    attr.binaryVersion == 90;
    cache[device] = ok ? 1 : -1;
  }
  return cache[device] > 0;
}

// The table: dtype x {2 warpgroups, 4 stages (N % 512 == 0; one CTA per SM), 1 warpgroup, 3 stages (two CTAs
// per SM: one's prologue and epilogue overlap the other's main loop)} x {GEMM1, GEMM2}; block_m must be 64.
// `narrow` (variant 5) asks for the second where the first would run.
int launch_moe_wgmma(const MoeLaunch& a, bool narrow) {
  const int64_t n = a.weight.size(2) * 64;
  if (a.block_m != kBT || n % 256) return cudaErrorInvalidValue;
  const bool bf16 = a.a.scalar_type() == at::kBFloat16, wide = n % 512 == 0 && !narrow;
#define GLM_AWQ_WGMMA_CASE(T, WGS, STAGES) \
  return a.mode == kGateUp ? launch_wgmma<T, WGS, STAGES, kGateUp>(a) : launch_wgmma<T, WGS, STAGES, kDown>(a);
  if (bf16) {
    if (wide) GLM_AWQ_WGMMA_CASE(__nv_bfloat16, 2, 4)
    GLM_AWQ_WGMMA_CASE(__nv_bfloat16, 1, 3)
  }
  if (wide) GLM_AWQ_WGMMA_CASE(__half, 2, 4)
  GLM_AWQ_WGMMA_CASE(__half, 1, 3)
#undef GLM_AWQ_WGMMA_CASE
}

}  // namespace glm_awq
