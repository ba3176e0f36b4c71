// Stream-K W4A16 GEMM for few activation rows (dense M <= 16) on sm_90+: the job is reading the int4 weights at
// HBM speed, and this kernel moves them with the copy engine instead of register loads. Same math and weight layout
// as w4a16_skinny.cu (weights as the A operand of mma.sync m16n8k16, the tokens as the 8-wide B operand; see its
// header for the fragment order); a different load engine and work split:
//
//  - Units: a unit is one 256-feature tile x one 128-deep batch: 8 k16 rows of 2 KB (contiguous in the cuda
//    layout). Units are numbered tile-major and CTA c takes the contiguous range [U c / G, U (c + 1) / G): every
//    CTA streams the same bytes to within one unit (stream-K), whatever the shape. The skinny kernel's single wave
//    of split-K tiles left some SMs idle at the end.
//  - Load engine: one producer thread issues 1-D bulk copies (cp.async.bulk, completing on an mbarrier, evict-first
//    in L2) of the weights into a ring of STAGES units. Four consumer warps (64 features each) wait on the stage's
//    "full" barrier, take their 8 chunks into registers and release the stage through its "empty" barrier. x (the
//    B fragments, from L2) and the scales are loaded by the consumers one unit ahead: per-stage copies of them
//    measured slow, the copy engine's cost grows with the number of copies more than with their bytes.
//  - Programmatic dependent launch: the kernel lets the next kernel in the stream launch as soon as all its CTAs
//    run, and it is launched so that it may itself start before the previous kernel ends. The producer reads only
//    weights, which no kernel writes, so it fills the ring at once; the consumers first wait (`griddepcontrol.wait`:
//    the previous grid has finished and its writes are visible), then read x and write out, the partials and the
//    tickets.
//  - Math: the weights are dequantized to exact values (q in [-8, 7], Num<T>::dequant), 8 mmas per 64 features
//    per k16 row accumulate a batch in fp32, and the batch's scales are applied in fp32 (acc += s * tmp).
//  - Reduction: a tile whose batches one CTA covers is written directly. Otherwise each CTA covering part of it
//    writes an fp32 partial [M, 256] to slot (tile + cta) of the workspace (unique: the CTA ranges are ordered),
//    and the CTA that takes the tile's last ticket sums the partials in CTA order, adds the bias and writes the
//    output: the bits do not depend on scheduling. It resets the ticket for the next call.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>

#include "ops.h"
#include "w4a16_common.h"

namespace glm_awq {
namespace {

constexpr int kStreamBN = 256;                  // features per tile: 4 consumer warps x 64
constexpr int kStreamConsumers = 4;             // consumer warps; warp 4 is the producer
constexpr int kStreamThreads = 32 * (kStreamConsumers + 1);
constexpr int kStreamWBytes = 8 * kStreamBN * 8;  // a unit's weights: 8 k16 rows x 256 features x 8 bytes = 16 KB

// Tuning (benchmarks and tests; 0 = default): CTAs per SM, ring stages, programmatic dependent launch on/off, a cap
// on the grid (tests: a small problem on a few CTAs, so that tiles are split across CTAs).
std::atomic<int> g_ctas_per_sm{0}, g_stages{0}, g_pdl{1}, g_grid_cap{0};

// ------------------------------------------------------------------------------------------------ mbarrier / bulk
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define GLM_AWQ_STREAM_DEVICE 1
#endif

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n"
      "  .reg .pred done;\n"
      "WAIT:\n"
      "  mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "  @!done bra WAIT;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) global -> shared, counted on `bar` when they land;
// evict-first in L2 under `pol`.
__device__ __forceinline__ void bulk_copy_stream(void* dst, const void* src, int bytes, uint64_t* bar, uint64_t pol) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::
          "r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(pol)
      : "memory");
}
// Named barrier 1 over the consumer warps only (the producer never joins).
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(32 * kStreamConsumers) : "memory");
}

// First unit of CTA c: floor(U c / G).
__device__ __forceinline__ int unit_start(int c, int units, int grid) {
  return static_cast<int>(static_cast<int64_t>(units) * c / grid);
}
// The CTA whose range holds unit u.
__device__ __forceinline__ int unit_owner(int u, int units, int grid) {
  int c = static_cast<int>((static_cast<int64_t>(u) * grid + grid - 1) / units);
  while (c > 0 && unit_start(c, units, grid) > u) --c;
  while (c + 1 < grid && unit_start(c + 1, units, grid) <= u) ++c;
  return c;
}

template <typename T,    // activation, scale, bias and output dtype: __half or __nv_bfloat16
          int MB,        // 8-token B operands: M <= 8 MB
          int STAGES>    // units in the shared-memory ring
__global__ void __launch_bounds__(kStreamThreads, MB == 1 ? 3 : 1) w4a16_stream_kernel(
    const T* __restrict__ x,       // [M, K] row-major
    const int4* __restrict__ wq,   // [K/16, N/64, 32] int4 chunks: the cuda layout
    const T* __restrict__ wsc,     // [G, N] repacked scales
    const T* __restrict__ bias,    // [N] or nullptr
    T* __restrict__ out,           // [M, N]
    float* __restrict__ partial,   // [tiles + gridDim.x, M, 256] fp32
    int* __restrict__ tickets,     // [tiles] zeros, left zero
    int M, int N, int K, int group_size) {
#ifdef GLM_AWQ_STREAM_DEVICE
  using V = Num<T>;
  extern __shared__ __align__(128) unsigned char smem[];  // [STAGES][8 k16 rows][256 features x 8 bytes]
  __shared__ uint64_t full[STAGES], empty[STAGES];
  __shared__ int s_last[2];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nbatch = K / kBK, tiles = N / kStreamBN, units = tiles * nbatch;
  const int grid = static_cast<int>(gridDim.x), cta = static_cast<int>(blockIdx.x);
  const int u0 = unit_start(cta, units, grid), u1 = unit_start(cta + 1, units, grid);
  const int n_units = u1 - u0;

  // Let the next kernel's CTAs launch as soon as every CTA of this grid runs (they wait for our end before they
  // touch anything we write).
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) mbar_init(&full[s], 1), mbar_init(&empty[s], kStreamConsumers);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp == kStreamConsumers) {
    // ------------------------------------------------------------------------------------------ producer
    // Weights only, which no kernel writes: no need to wait for the previous grid.
    if (lane != 0) return;
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    const size_t row_chunks = static_cast<size_t>(N / 64) * 32;  // int4 chunks per k16 row
    for (int i = 0; i < n_units; ++i) {
      const int s = i % STAGES, u = u0 + i, tile = u / nbatch, batch = u % nbatch;
      if (i >= STAGES) mbar_wait(&empty[s], (i / STAGES - 1) & 1);
      mbar_arrive_expect_tx(&full[s], kStreamWBytes);
      unsigned char* st = smem + s * kStreamWBytes;
      const int4* src = wq + static_cast<size_t>(batch) * 8 * row_chunks + static_cast<size_t>(tile) * 4 * 32;
#pragma unroll
      for (int r = 0; r < 8; ++r) bulk_copy_stream(st + r * 2048, src + r * row_chunks, 2048, &full[s], policy);
    }
    return;
  }

  // ------------------------------------------------------------------------------------------------ consumers
  asm volatile("griddepcontrol.wait;\n" ::: "memory");  // x is the previous kernel's output; then out, partials
  const int wn = warp, g = lane >> 2, t = lane & 3;
  const size_t plane = static_cast<size_t>(M) * kStreamBN;  // one partial tile [M, 256]
  int pending0 = 0, pending1 = 0, n_pending = 0;              // partial tiles whose ticket is still to take

  // B fragments of a unit straight from global memory (x is small and sits in L2), one unit ahead: lane (g, t) of
  // operand mb holds x[8 mb + g][k0 + 2t, 2t + 1] and [k0 + 2t + 8, 2t + 9] for each k16 step k0 of the batch.
  // Rows past M read as zeros. The scales of my column g in the eight n8 blocks of my 64 features: one 16-byte chunk.
  uint32_t xf[MB][16], xn[MB][16];
  int4 sc, sn;
  auto load_unit = [&](int i, uint32_t (&xr)[MB][16], int4& scr) {
    const int u = u0 + i, tile = u / nbatch, batch = u % nbatch;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      const int row = mb * 8 + g;
      const unsigned int* p =
          reinterpret_cast<const unsigned int*>(x + static_cast<size_t>(row < M ? row : 0) * K + batch * kBK + 2 * t);
#pragma unroll
      for (int j = 0; j < 16; ++j) xr[mb][j] = row < M ? __ldcg(p + (j / 2) * 8 + (j % 2) * 4) : 0u;
    }
    scr = __ldg(reinterpret_cast<const int4*>(wsc + static_cast<size_t>(batch * kBK / group_size) * N +
                                              tile * kStreamBN + wn * 64 + g * 8));
  };
  load_unit(0, xf, sc);

  float acc[MB][4][4];
  for (int i = 0; i < n_units; ++i) {
    const int s = i % STAGES, u = u0 + i, tile = u / nbatch, batch = u % nbatch;
    if (i + 1 < n_units) load_unit(i + 1, xn, sn);
    if (i == 0 || batch == 0) {
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mb][a][e] = 0.f;
    }
    mbar_wait(&full[s], (i / STAGES) & 1);
    const unsigned char* st = smem + s * kStreamWBytes;
    int4 chunk[8];
#pragma unroll
    for (int r = 0; r < 8; ++r) chunk[r] = *reinterpret_cast<const int4*>(st + r * 2048 + wn * 512 + lane * 16);
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);  // the stage is in registers: the producer may refill it
    float tmp[MB][4][4];
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const uint32_t q[4] = {static_cast<uint32_t>(chunk[r].x), static_cast<uint32_t>(chunk[r].y),
                             static_cast<uint32_t>(chunk[r].z), static_cast<uint32_t>(chunk[r].w)};
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        uint32_t w[4];
        V::dequant(q[a], w);  // pairs (0,4) (1,5) (2,6) (3,7) = a0a1, a4a5, a2a3, a6a7
        const uint32_t frag[4] = {w[0], w[2], w[1], w[3]};
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          if (r == 0)
            V::mma0(tmp[mb][a], frag, xf[mb][2 * r], xf[mb][2 * r + 1]);
          else
            V::mma(tmp[mb][a], frag, xf[mb][2 * r], xf[mb][2 * r + 1]);
        }
      }
    }
    const uint32_t sw[4] = {static_cast<uint32_t>(sc.x), static_cast<uint32_t>(sc.y), static_cast<uint32_t>(sc.z),
                            static_cast<uint32_t>(sc.w)};
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const float s_lo = V::lo(sw[a]), s_hi = V::hi(sw[a]);
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        acc[mb][a][0] = fmaf(s_lo, tmp[mb][a][0], acc[mb][a][0]);
        acc[mb][a][1] = fmaf(s_lo, tmp[mb][a][1], acc[mb][a][1]);
        acc[mb][a][2] = fmaf(s_hi, tmp[mb][a][2], acc[mb][a][2]);
        acc[mb][a][3] = fmaf(s_hi, tmp[mb][a][3], acc[mb][a][3]);
      }
    }
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int j = 0; j < 16; ++j) xf[mb][j] = xn[mb][j];
    sc = sn;
    if (i + 1 < n_units && batch + 1 < nbatch) continue;  // the tile goes on in this CTA

    // ---------------------------------------------------------------------------------------- tile epilogue
    // Element (mb, a, e): token row mb * 8 + 2t + (e & 1), feature 16 a + g + 8 (e >> 1) of the warp's 64.
    const int col0 = tile * kStreamBN + wn * 64;
    if (batch + 1 == nbatch && i >= batch) {  // the whole tile is ours: it ends here and began in our range
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = mb * 8 + 2 * t + (e & 1);
          if (r >= M) continue;
#pragma unroll
          for (int a = 0; a < 4; ++a) {
            const int col = col0 + 16 * a + g + 8 * (e >> 1);
            out[static_cast<size_t>(r) * N + col] = V::from_float(acc[mb][a][e] + (bias ? V::to_float(bias[col]) : 0.f));
          }
        }
      continue;
    }
    // Part of the tile: publish the partial now, take the ticket after the last unit (only the first and the last
    // tile of a CTA's range can be partial, so at most two wait), so the ring keeps streaming meanwhile.
    float* mine = partial + static_cast<size_t>(tile + cta) * plane;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = mb * 8 + 2 * t + (e & 1);
        if (r >= M) continue;
#pragma unroll
        for (int a = 0; a < 4; ++a) mine[r * kStreamBN + wn * 64 + 16 * a + g + 8 * (e >> 1)] = acc[mb][a][e];
      }
    (n_pending++ == 0 ? pending0 : pending1) = tile;
  }
  if (n_pending == 0) return;
  __threadfence();  // the partials reach L2 before the tickets say so
  consumers_sync();
  if (tid == 0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (j >= n_pending) break;
      const int tile = j ? pending1 : pending0;
      const int first = unit_owner(tile * nbatch, units, grid), last = unit_owner(tile * nbatch + nbatch - 1, units, grid);
      s_last[j] = atomicAdd(&tickets[tile], 1) == last - first;
    }
  }
  consumers_sync();
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j >= n_pending || !s_last[j]) continue;
    __threadfence();
    // The last CTA in: sum the partials of CTAs first..last (slots tile + c) in CTA order, 4 columns per thread,
    // eight partials' loads in flight at a time.
    const int tile = j ? pending1 : pending0;
    const int first = unit_owner(tile * nbatch, units, grid), last = unit_owner(tile * nbatch + nbatch - 1, units, grid);
    const int parts = last - first + 1;
    for (int e = tid; e < M * (kStreamBN / 4); e += 32 * kStreamConsumers) {
      const int r = e / (kStreamBN / 4), c = (e % (kStreamBN / 4)) * 4;
      const float* p = partial + static_cast<size_t>(tile + first) * plane + r * kStreamBN + c;
      float4 sum = __ldcg(reinterpret_cast<const float4*>(p));
      for (int j0 = 1; j0 < parts; j0 += 8) {
        float4 v[8];
#pragma unroll
        for (int q = 0; q < 8; ++q)
          if (j0 + q < parts) v[q] = __ldcg(reinterpret_cast<const float4*>(p + (j0 + q) * plane));
#pragma unroll
        for (int q = 0; q < 8; ++q)
          if (j0 + q < parts) sum.x += v[q].x, sum.y += v[q].y, sum.z += v[q].z, sum.w += v[q].w;
      }
      const int col = tile * kStreamBN + c;
      if (bias) {
        sum.x += V::to_float(bias[col]), sum.y += V::to_float(bias[col + 1]);
        sum.z += V::to_float(bias[col + 2]), sum.w += V::to_float(bias[col + 3]);
      }
      uint2 o;
      o.x = V::pack(sum.x, sum.y);
      o.y = V::pack(sum.z, sum.w);
      *reinterpret_cast<uint2*>(&out[static_cast<size_t>(r) * N + col]) = o;
    }
    if (tid == 0) tickets[tile] = 0;
  }
#endif
}

template <typename T, int MB, int STAGES>
cudaError_t launch_stream(const GemmLaunch& a, int grid, bool pdl) {
  auto kernel = w4a16_stream_kernel<T, MB, STAGES>;
  constexpr int smem = STAGES * kStreamWBytes;
  static uint64_t configured = 0;
  cudaError_t err = allow_dynamic_smem(kernel, smem, configured);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(kStreamThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  const T* bias = a.bias ? reinterpret_cast<const T*>(a.bias->data_ptr()) : nullptr;
  err = cudaLaunchKernelEx(&cfg, kernel, reinterpret_cast<const T*>(a.x.data_ptr()),
                           reinterpret_cast<const int4*>(a.weight.data_ptr()),
                           reinterpret_cast<const T*>(a.scale.data_ptr()), bias, reinterpret_cast<T*>(a.out.data_ptr()),
                           a.workspace->data_ptr<float>(), a.tickets.data_ptr<int>(), a.m, a.n, a.k, a.group_size);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// Marks that this build carries the kernel's sm_90+ body (see stream_supported).
__global__ void stream_build_probe(int* out) {
#ifdef GLM_AWQ_STREAM_DEVICE
  __shared__ int mark[1024];
#else
  __shared__ int mark[4];
#endif
  mark[threadIdx.x % (sizeof(mark) / sizeof(int))] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = mark[(threadIdx.x + 1) % (sizeof(mark) / sizeof(int))];
}

int stream_ctas_per_sm() {
  const int c = g_ctas_per_sm.load(std::memory_order_relaxed);
  return c > 0 ? c : 2;
}

}  // namespace

void set_stream_tuning(int64_t ctas_per_sm, int64_t stages, bool pdl, int64_t grid_cap) {
  g_ctas_per_sm.store(static_cast<int>(ctas_per_sm), std::memory_order_relaxed);
  g_grid_cap.store(static_cast<int>(grid_cap), std::memory_order_relaxed);
  g_stages.store(static_cast<int>(stages), std::memory_order_relaxed);
  g_pdl.store(pdl ? 1 : 0, std::memory_order_relaxed);
}

bool stream_supported(int device) {
  static int cache[64] = {0};  // 1: runs the sm_90+ body, -1: does not
  if (device < 0 || device >= 64) return false;
  if (cache[device] == 0) {
    int major = 0;
    cudaFuncAttributes attr{};
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));  // attributes of `device`'s binary
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                    major >= 9 && cudaFuncGetAttributes(&attr, stream_build_probe) == cudaSuccess &&
                    attr.binaryVersion >= 90 && attr.sharedSizeBytes >= 4096;
    if (!ok) cudaGetLastError();
    cache[device] = ok ? 1 : -1;
  }
  return cache[device] > 0;
}

bool gemm_uses_stream(const GemmLaunch& a, int block_n) {
  const bool asked = a.variant == 4 || (a.variant == 0 && block_n == 0 && a.splits == 0);
  return asked && a.m >= 1 && a.m <= 16 && a.n % kStreamBN == 0 && (block_n == 0 || block_n == kStreamBN) &&
         stream_supported(a.x.get_device());
}

int64_t stream_grid(int64_t m, int64_t n, int64_t k, int device) {
  const int64_t units = n / kStreamBN * (k / kBK), cap = g_grid_cap.load(std::memory_order_relaxed);
  int64_t grid = std::min<int64_t>(units, int64_t{stream_ctas_per_sm()} * sm_count(device));
  if (cap > 0) grid = std::min(grid, cap);
  return std::max<int64_t>(1, grid);
}

int64_t stream_workspace_floats(int64_t m, int64_t n, int64_t k, int device) {
  return (n / kStreamBN + stream_grid(m, n, k, device)) * m * kStreamBN;
}

int launch_w4a16_stream(const GemmLaunch& a) {
  if (a.m < 1 || a.m > 16 || a.n % kStreamBN || !a.workspace ||
      a.workspace->numel() < stream_workspace_floats(a.m, a.n, a.k, a.x.get_device()) ||
      a.tickets.numel() < a.n / kStreamBN)
    return cudaErrorInvalidValue;
  const int grid = static_cast<int>(stream_grid(a.m, a.n, a.k, a.x.get_device()));
  const bool pdl = g_pdl.load(std::memory_order_relaxed) != 0;
  const int stages = g_stages.load(std::memory_order_relaxed) == 3 ? 3 : 4;
  const bool bf16 = a.x.scalar_type() == at::kBFloat16;
#define GLM_AWQ_STREAM_CASE(MB)                                                                         \
  if (stages == 3)                                                                                      \
    return bf16 ? launch_stream<__nv_bfloat16, MB, 3>(a, grid, pdl) : launch_stream<__half, MB, 3>(a, grid, pdl); \
  return bf16 ? launch_stream<__nv_bfloat16, MB, 4>(a, grid, pdl) : launch_stream<__half, MB, 4>(a, grid, pdl);
  if (a.m <= 8) {
    GLM_AWQ_STREAM_CASE(1)
  }
  GLM_AWQ_STREAM_CASE(2)
#undef GLM_AWQ_STREAM_CASE
}

}  // namespace glm_awq
