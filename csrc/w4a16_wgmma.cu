// Hopper (sm_90a) MoE GEMM for many tokens per expert: the int4 weights are wgmma's A operand straight from
// registers, the token rows its B operand in shared memory. Same cuda layout, modes and sort (blocks of 64 slots)
// as w4a16_gemm.cu, whose mma.sync tile kernel is mma-rate bound from ~128 slots per expert (benchmarks/NOTES.md);
// wgmma has twice its tensor-core rate on this card.
//
// Legend: BT = token-slots per tile: 128 (a pair: two consecutive 64-slot blocks of one expert's sorted run; the
// sort's block_m 64) or 32 (one 32-slot block; block_m 32, for few slots per expert, where the kernel streams
// weights: x stages a quarter the size, one warpgroup per CTA and four CTAs per SM, wgmma N down to 8; also over a
// sort padded to 8, for the experts of more than 8 slots under moe_gemm's split variant). "Pair"
// below means a tile's slots in either case. N output features, K input features, WGS warpgroups per CTA, ROWS = 128 WGS output
// features per N tile.
//
// Work: a small kernel first lists the pairs (moe_pair_kernel: expert, rows, slot ids, x offsets, routing weights).
// A tile is one pair's BT slots x ROWS features over the whole K. From Wg::LOOKAHEAD k tiles (BT 128: K >= 640; BT
// 32: K >= 384) one CTA per SM (BT 32: four) runs every grid-th tile (persistent); below that, one CTA per tile.
// Data flow of one CTA:
//  - A = weights, m64 x k16 per wgmma, in registers. In the cuda layout a lane's 16-byte chunk of a 16 x 64
//    (k x n) sub-tile holds, in int i, the A fragment of features 16i .. 16i+15 (w4a16_skinny.cu's header works
//    it out: A = {w0, w2, w1, w3} of the dequantized nibble pairs). Warp w of warpgroup v takes 64-feature block
//    b = 2v + w / 2 and its ints p = w % 2 and p + 2: wgmma 0 multiplies features 64 b + 16 p + r, wgmma 1 features
//    64 b + 32 + 16 p + r (r < 16, the warp's rows of the m64 tile). In GEMM1 a 64-block holds 32 gate rows then the
//    matching 32 up rows, so one thread holds gate and up of the same columns. Two ints per warp and step: each
//    dequantized weight feeds up to 128 slots. Tiles of 128 multiply the scale in before the wgmma (one bf16/fp16
//    rounding of q * s, as the tile kernel). Tiles of 32 feed the exact codes q and scale each stage's fp32 sums
//    (one 128-deep k tile lies in one scale group): one FFMA per accumulator per stage instead of a multiply per
//    weight pair, 11% fewer instructions per stage at N = 8 (SASS), and no rounding of q * s.
//  - B = x rows of the tile's slots, [BT, 128] per stage, K-major with the 128-byte swizzle (16-byte chunk c of
//    row r stored at chunk c ^ (r % 8)), two 64-wide halves; one descriptor per stage, + 32 bytes per k16 step. The
//    wgmmas' N is the pair's real rows rounded up to 32 (m64n32 .. m64n128; BT 32: to 8, 16 or 32); rows past them
//    are zero-filled.
//  - A cp.async pipeline of STAGES slots of (x tile, weight chunks, scales), STAGES - 1 in flight, running through
//    all of the CTA's tiles (a tile's first stages load during the previous tile's last ones and its epilogue; its
//    pair's record is copied in during the previous tile's first stage).
//    The one barrier per stage sits in its last pair of k16 steps, after the wait for the one before: it
//    publishes the next stage and frees the slot of the previous one (whose last wgmmas every warp waited for in
//    this stage's first pair; tiles of 32 wait for them, and read its scales, at the end of that stage, below),
//    which is refilled right after it.
//  - Per pair of k16 steps: fence, four wgmmas (async, one group), commit, wait for the previous group, then
//    dequantize the next pair's ints (the next stage's first, in the last pair) into the other A register set while
//    these run. Tiles of 32 then wait for the stage's last group too (the chain drains once per stage) and fold.
//  - Epilogue per tile, straight from the accumulators: SiLU(gate) * up (GEMM1) or routing weight * acc (GEMM2);
//    a lane shuffle gives each thread two adjacent features of one slot row, written as one 4-byte store.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <type_traits>

#include "ops.h"
#include "w4a16_common.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GLM_AWQ_WGMMA_DEVICE 1  // this pass compiles for sm_90a: the wgmma instructions exist
#endif

namespace glm_awq {
namespace {

template <int WGS,  // warpgroups per CTA (1 or 2): 128 WGS output features per N tile
          int BT>   // token-slots per tile: 128 (two of the sort's 64-slot blocks) or 32 (one 32-slot block)
struct Wg {
  static constexpr int THREADS = 128 * WGS, ROWS = 128 * WGS, NB = ROWS / 64;  // NB 64-feature blocks
  // Pipeline slots, and CTAs per SM. The small tiles run one warpgroup per CTA (the launcher's choice) with stages
  // of 8 KB of x and 8 KB of weights: four CTAs fit an SM, so that four warpgroups (not two) hide the wgmma chain's
  // latency where few slots per expert leave each wgmma short (N = 8 to 32).
  static constexpr int STAGES = BT == 128 ? 4 : 3, CTAS_PER_SM = BT == 128 ? 1 : 4;
  static constexpr int A_BYTES = BT * kBK * 2;      // x tile of a stage: 32 KB (BT 128) or 8 KB (BT 32)
  static constexpr int B_BYTES = 8 * NB * 512;      // weight chunks of a stage: 8 k16 steps x NB blocks x 32 lanes
  static constexpr int S_BYTES = ROWS * 2;          // scales of a stage
  static constexpr int PREFETCH = STAGES - 1;       // stages in flight while one is computed
  // A CTA copies its next tile's pair record (below) in this tile's first stage; it has landed and is published
  // PREFETCH - 1 stages later, and the next tile's first stage is fetched PREFETCH stages before this tile ends. Both
  // fit from 2 PREFETCH - 1 k tiles per tile (BT 128: 5, K >= 640; BT 32: 3, K >= 384); below that each CTA takes
  // one tile.
  static constexpr int LOOKAHEAD = 2 * PREFETCH - 1;
  static constexpr int PIPE = STAGES * (A_BYTES + B_BYTES + S_BYTES);
  static constexpr int SMEM = 1024 + PIPE;          // + alignment of the swizzled x tiles
  static constexpr int A_PER = BT * 16 / THREADS;   // x chunks per thread per stage
  static constexpr int B_PER = 8 * NB * 32 / THREADS, B_STEPS = THREADS / (NB * 32);  // weight chunks, k16 steps apart
  static_assert(A_BYTES % 1024 == 0, "x tiles stay 1024-byte aligned (the swizzle pattern repeats every 1 KB)");
  static_assert(CTAS_PER_SM * (SMEM + 2 * (16 + 12 * BT) + 1024) <= kSmemPerSM, "CTAS_PER_SM CTAs per SM");
};

// ------------------------------------------------------------------------------------------------- pair table

// The CTAs' work list: tiles of BT sorted slots ("pairs": for BT 128, two of the sort's 64-slot blocks), numbered
// expert by expert (ceil(count / BT) each; the sort padded each expert's run to block_m slots, 64 for BT 128 and 32
// for BT 32). moe_pair_kernel writes one record per pair into a workspace before each GEMM, so a CTA finds its next
// tile's rows with one copy and no search: [header: 16 bytes, int 0 = pairs][records].
template <int BT>
struct alignas(16) PairRecord {
  static constexpr int kChunks = (16 + 12 * BT) / 16, kChunksNoW = kChunks - BT / 4;  // 16 bytes each
  int expert, rows, unused[2];
  int slot[BT];  // slot ids of the pair's rows (0 past them)
  int xoff[BT];  // where each row's x starts (x row * K; GEMM1's x row is the token, GEMM2's the slot; 0 past the
                 // rows), in the copy plan's order: row r at (r % r_step) * (BT / r_step) + r / r_step, so that a
                 // thread's rows sit side by side
  float w[BT];   // routing weight per row (0 past them); last, so that GEMM1 need not copy it
};
static_assert(sizeof(PairRecord<128>) == PairRecord<128>::kChunks * 16 &&
                  sizeof(PairRecord<32>) == PairRecord<32>::kChunks * 16 &&
                  offsetof(PairRecord<128>, w) == PairRecord<128>::kChunksNoW * 16 &&
                  offsetof(PairRecord<32>, w) == PairRecord<32>::kChunksNoW * 16,
              "w last: GEMM1 copies the record without it");

// Every CTA scans the counts (warp 0, into shared memory: first pair and first sorted row per expert), then its
// warps write the records of pairs warp, warp + all warps, ... . Dynamic shared memory: (2 E + 1) ints. At most
// `capacity` records (the workspace's): counts that disagree with the sort cannot make it write past them. Experts
// of at most min_count slots get no pairs (moe_gemm's split variant: the skinny kernel's).
template <int BT>
__global__ void __launch_bounds__(256) moe_pair_kernel(MoeArgs moe, int mode, int block_m, int r_step, int k,
                                                       int min_count, int capacity, int* __restrict__ header,
                                                       PairRecord<BT>* __restrict__ recs) {
  extern __shared__ int s_scan[];
  int* first = s_scan;                       // [E + 1]
  int* off = s_scan + moe.num_experts + 1;  // [E]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp == 0) {
    int base_pair = 0, base_row = 0;
    for (int e0 = 0; e0 < moe.num_experts; e0 += 32) {  // inclusive scans of 32 experts' pairs and padded rows
      const int e = e0 + lane, c = e < moe.num_experts ? moe.counts[e] : 0;
      const int pairs = c > min_count ? (c + BT - 1) / BT : 0, padded = (c + block_m - 1) / block_m * block_m;
      int incl_pairs = pairs, incl_rows = padded;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int vp = __shfl_up_sync(0xffffffffu, incl_pairs, o), vr = __shfl_up_sync(0xffffffffu, incl_rows, o);
        if (lane >= o) incl_pairs += vp, incl_rows += vr;
      }
      if (e < moe.num_experts) first[e] = base_pair + incl_pairs - pairs, off[e] = base_row + incl_rows - padded;
      base_pair += __shfl_sync(0xffffffffu, incl_pairs, 31);
      base_row += __shfl_sync(0xffffffffu, incl_rows, 31);
    }
    if (lane == 0) {
      first[moe.num_experts] = min(base_pair, capacity);
      if (blockIdx.x == 0) header[0] = min(base_pair, capacity);
    }
  }
  __syncthreads();
  const int pairs = first[moe.num_experts], warps = gridDim.x * (blockDim.x >> 5);
  for (int pair = blockIdx.x * (blockDim.x >> 5) + warp; pair < pairs; pair += warps) {
    int lo = 0, hi = moe.num_experts - 1;  // the last expert whose first pair is <= pair (it has pairs: the next
    while (lo < hi) {                      // experts' first pairs are past this one)
      const int mid = (lo + hi + 1) >> 1;
      if (first[mid] <= pair) lo = mid; else hi = mid - 1;
    }
    const int q = pair - first[lo], rows = min(BT, moe.counts[lo] - q * BT), row0 = off[lo] + q * BT;
    PairRecord<BT>& rec = recs[pair];
    if (lane == 0) rec.expert = lo, rec.rows = rows;
    for (int r = lane; r < BT; r += 32) {
      const int slot = r < rows ? moe.sorted[row0 + r] : 0;
      rec.slot[r] = slot;
      rec.xoff[(r % r_step) * (BT / r_step) + r / r_step] = (mode == kGateUp ? slot / moe.top_k : slot) * k;
      if (mode == kDown) rec.w[r] = r < rows ? moe.weights[slot] : 0.f;  // GEMM1 does not read w
    }
  }
}

// One warp: starts copying pair `pair`'s record (its first `chunks` 16-byte chunks) into shared memory; the caller
// commits, and reads it after a wait and a barrier.
template <int BT>
__device__ __forceinline__ void copy_record(const PairRecord<BT>* recs, int pair, int chunks, int lane,
                                            PairRecord<BT>& dst) {
  const int4* src = reinterpret_cast<const int4*>(recs + pair);
  for (int c = lane; c < chunks; c += 32) cp_async16(reinterpret_cast<int4*>(&dst) + c, src + c, true);
}

// ---------------------------------------------------------------------------------------------- wgmma helpers

// Off sm_90a (the other archs of the build) these stubs keep the kernel compiling; the launcher never starts it
// there (moe_wgmma_supported).
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
#else
__device__ __forceinline__ void wgmma_fence() { __trap(); }
__device__ __forceinline__ void wgmma_commit() {}
template <int N>
__device__ __forceinline__ void wgmma_wait() {}
__device__ __forceinline__ void fence_proxy_async() {}
#endif

// Shared-memory descriptor of a K-major [rows, 64] bf16/fp16 tile with the 128-byte swizzle: 8-row core groups
// 1024 bytes apart (stride byte offset); the leading byte offset is unused for swizzled K-major tiles.
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

#ifdef GLM_AWQ_WGMMA_DEVICE
#define GLM_AWQ_ACC_N8 "%0, %1, %2, %3"
#define GLM_AWQ_ACC_N16 "%0, %1, %2, %3, %4, %5, %6, %7"
#define GLM_AWQ_ACC0 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define GLM_AWQ_ACC1 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define GLM_AWQ_ACC2 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
#define GLM_AWQ_ACC3 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define GLM_AWQ_OUT16(o)                                                                  \
  "+f"(d[(o) + 0]), "+f"(d[(o) + 1]), "+f"(d[(o) + 2]), "+f"(d[(o) + 3]),            \
  "+f"(d[(o) + 4]), "+f"(d[(o) + 5]), "+f"(d[(o) + 6]), "+f"(d[(o) + 7]),            \
  "+f"(d[(o) + 8]), "+f"(d[(o) + 9]), "+f"(d[(o) + 10]), "+f"(d[(o) + 11]),          \
  "+f"(d[(o) + 12]), "+f"(d[(o) + 13]), "+f"(d[(o) + 14]), "+f"(d[(o) + 15])
#define GLM_AWQ_OUT4 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
#define GLM_AWQ_OUT8 GLM_AWQ_OUT4, "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])

// d[64 x N] = a[64 x 16] (registers: this warp's 16 rows) . B[16 x N] (shared memory, K-major, descriptor), + d
// when ACCUMULATE (the instruction's scale-d): D row 16 w + g (+8) of warp w, column 8 j + 2 t (+1) in
// d[4 j + (0, 1) (+2)]. N = 8, 16, 32, 64, 96 or 128 slots.
template <typename T, int N>
struct Wgmma;
// One specialization per dtype and wgmma N: ACC names the N / 2 accumulator operands, A_OPS the operand numbers of
// the A registers, the descriptor and scale-d that follow them, the rest the accumulator bindings.
#define GLM_AWQ_WGMMA_RS_T(T, PTX_T, N, ACC, A_OPS, ...)                                                        \
  template <>                                                                                                    \
  struct Wgmma<T, N> {                                                                                           \
    template <bool ACCUMULATE = true>                                                                            \
    static __device__ __forceinline__ void rs(float* d, const uint32_t (&a)[4], uint64_t desc) {                 \
      asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_T "." PTX_T " {" ACC "}, " A_OPS        \
                   ", 1, 1, 0;\n"                                                                                \
                   : __VA_ARGS__                                                                                 \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(ACCUMULATE ? 1 : 0));          \
    }                                                                                                            \
  };
#define GLM_AWQ_WGMMA_RS(N, ACC, A_OPS, ...)                            \
  GLM_AWQ_WGMMA_RS_T(__nv_bfloat16, "bf16", N, ACC, A_OPS, __VA_ARGS__) \
  GLM_AWQ_WGMMA_RS_T(__half, "f16", N, ACC, A_OPS, __VA_ARGS__)
GLM_AWQ_WGMMA_RS(8, GLM_AWQ_ACC_N8, "{%4, %5, %6, %7}, %8, %9", GLM_AWQ_OUT4)
GLM_AWQ_WGMMA_RS(16, GLM_AWQ_ACC_N16, "{%8, %9, %10, %11}, %12, %13", GLM_AWQ_OUT8)
GLM_AWQ_WGMMA_RS(32, GLM_AWQ_ACC0, "{%16, %17, %18, %19}, %20, %21", GLM_AWQ_OUT16(0))
GLM_AWQ_WGMMA_RS(64, GLM_AWQ_ACC0 ", " GLM_AWQ_ACC1, "{%32, %33, %34, %35}, %36, %37", GLM_AWQ_OUT16(0),
                 GLM_AWQ_OUT16(16))
GLM_AWQ_WGMMA_RS(96, GLM_AWQ_ACC0 ", " GLM_AWQ_ACC1 ", " GLM_AWQ_ACC2, "{%48, %49, %50, %51}, %52, %53",
                 GLM_AWQ_OUT16(0), GLM_AWQ_OUT16(16), GLM_AWQ_OUT16(32))
GLM_AWQ_WGMMA_RS(128, GLM_AWQ_ACC0 ", " GLM_AWQ_ACC1 ", " GLM_AWQ_ACC2 ", " GLM_AWQ_ACC3,
                 "{%64, %65, %66, %67}, %68, %69", GLM_AWQ_OUT16(0), GLM_AWQ_OUT16(16), GLM_AWQ_OUT16(32),
                 GLM_AWQ_OUT16(48))
#undef GLM_AWQ_WGMMA_RS
#undef GLM_AWQ_WGMMA_RS_T
#undef GLM_AWQ_ACC0
#undef GLM_AWQ_ACC1
#undef GLM_AWQ_ACC2
#undef GLM_AWQ_ACC3
#undef GLM_AWQ_OUT16
#undef GLM_AWQ_OUT8
#undef GLM_AWQ_OUT4
#undef GLM_AWQ_ACC_N8
#undef GLM_AWQ_ACC_N16
#else
template <typename T, int N>
struct Wgmma {
  template <bool ACCUMULATE = true>
  static __device__ __forceinline__ void rs(float*, const uint32_t (&)[4], uint64_t) {
    __trap();
  }
};
#endif  // GLM_AWQ_WGMMA_DEVICE

// ------------------------------------------------------------------------------------------------------ kernel

template <typename T,  // activation, scale and output dtype: __half or __nv_bfloat16
          int WGS,     // warpgroups per CTA (1 or 2): 128 WGS output features
          int BT,      // token-slots per tile (Wg): 128 or 32
          int MODE>    // kGateUp or kDown (w4a16_common.h)
__global__ void __launch_bounds__(Wg<WGS, BT>::THREADS, Wg<WGS, BT>::CTAS_PER_SM) moe_wgmma_kernel(
    const T* __restrict__ x,      // GEMM1: x [T, K]; GEMM2: h [S, K]; 16-byte aligned rows
    const int4* __restrict__ wq,  // [E, K/16, N/64, 32] int4 chunks: the cuda layout
    const T* __restrict__ wsc,    // [E, G, N] repacked scales
    T* __restrict__ out,          // GEMM1: [S, N/2]; GEMM2: [S, N]
    int N, int K, int group_size,
    int w_stride, int s_stride,                     // expert strides of wq (chunks) and wsc (elements)
    const int* __restrict__ header,                 // moe_pair_kernel's: int 0 = pairs
    const PairRecord<BT>* __restrict__ recs) {
  using C = Wg<WGS, BT>;
  using V = Num<T>;
  constexpr int THREADS = C::THREADS, NB = C::NB, STAGES = C::STAGES;
  // The scales: on each stage's fp32 sums (fold(), below) for tiles of 32, whose wgmmas are at most N = 32 wide; on
  // each dequantized weight before its wgmma for tiles of 128 (up to N = 128, too many sums to hold twice).
  constexpr bool FOLD = BT == 32;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  uint8_t* sA = base;                                           // [STAGES][2 halves][BT rows][128 B], swizzled
  int4* sB = reinterpret_cast<int4*>(sA + STAGES * C::A_BYTES);  // [STAGES][8 k16][NB][32 lanes]
  int4* sS = sB + STAGES * C::B_BYTES / 16;                     // [STAGES][ROWS / 8] scale chunks
  __shared__ PairRecord<BT> s_tile[2];  // my i-th tile's pair is s_tile[i % 2], its first feature s_n0[i % 2]
  __shared__ int s_n0[2];

  // Tiles: pair p's N tile j is tile p * n_tiles + j (the N tiles run fastest, so the CTAs working at one time share
  // a few pairs' x rows in L2). CTA c takes tiles c, c + grid, c + 2 grid, ...: persistent, one pipeline through all
  // of them, so the prologue (the first record, the first stages' latency) is paid once per CTA, not once per tile.
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_tiles = N / C::ROWS, iters = K / kBK, tiles = header[0] * n_tiles;
  if (static_cast<int>(blockIdx.x) >= tiles) return;
  const int my_tiles = (tiles - 1 - static_cast<int>(blockIdx.x)) / static_cast<int>(gridDim.x) + 1;
  const int total = my_tiles * iters;  // stages over all my tiles
  constexpr int kChunks = MODE == kDown ? PairRecord<BT>::kChunks : PairRecord<BT>::kChunksNoW;  // GEMM1: no weights
  if (warp == 0) {
    if (lane == 0) s_n0[0] = static_cast<int>(blockIdx.x) % n_tiles * C::ROWS;
    copy_record(recs, blockIdx.x / n_tiles, kChunks, lane, s_tile[0]);
    cp_async_commit();
    cp_async_wait<0>();
  }
  __syncthreads();

  // Copy plan. x: BT * 16 chunks per stage (row r = c / 16, chunk c % 16 of its 128 k; half = chunk / 8), rows
  // past the pair's slots zero-filled. Weights: 8 k16 steps x NB blocks x 32 lanes, each step's NB * 512 bytes
  // contiguous in the cuda layout; chunk c = tid + THREADS i is step c / (NB * 32). Scales: ROWS / 8 chunks.
  // Chunk i of this thread is row r0 + R_STEP i (R_STEP = THREADS / 16, a multiple of 8: the same r % 8 for every
  // i, so one swizzled offset plus R_STEP rows per i); the record lists those rows' x rows side by side. Every
  // source address comes from shared memory per stage, not from registers: registers are what this kernel runs out
  // of.
  constexpr int R_STEP = THREADS / 16;
  static_assert(R_STEP % 8 == 0 && R_STEP * C::A_PER == BT && C::A_PER % 2 == 0,
                "16 chunks per row, rows R_STEP apart");
  const int r0 = tid >> 4, cc = tid & 15;
  const int a_dst0 = (cc >> 3) * (BT * 128) + r0 * 128 + (((cc & 7) ^ (r0 & 7)) << 4);
  // Copy addresses are 32-bit element offsets (moe_wgmma_supported checks that they fit), and the fetched stage's
  // tile and k tile come from the caller's counters: no 64-bit math and no division per stage.
  const int b_step = N / 64 * 32, b_stride = 8 * b_step;  // weight chunks per k16 step / k tile
  const int b_thread = tid / (NB * 32) * b_step + tid % (NB * 32);
  auto fetch = [&](int fi, int fit, int slot) {  // k tile fit of my tile fi (fit may run past the tile's end)
    while (fit >= iters) fit -= iters, ++fi;     // (more than once only at K = 128: the prologue's third stage)
    if (fi < my_tiles) {
      const PairRecord<BT>& ts = s_tile[fi & 1];
      const int n0 = s_n0[fi & 1], expert = ts.expert, lim = ts.rows - r0, col = fit * kBK + cc * 8;
      // My rows' x offsets, side by side in the record: 16-byte reads (8-byte ones for 2 rows per thread).
      constexpr int OV = C::A_PER % 4 == 0 ? 4 : 2;
#pragma unroll
      for (int iv = 0; iv < C::A_PER / OV; ++iv) {
        int off[OV];
        if constexpr (OV == 4) {
          const int4 v = reinterpret_cast<const int4*>(ts.xoff + r0 * C::A_PER)[iv];
          off[0] = v.x, off[1] = v.y, off[2] = v.z, off[3] = v.w;
        } else {
          const int2 v = reinterpret_cast<const int2*>(ts.xoff + r0 * C::A_PER)[iv];
          off[0] = v.x, off[1] = v.y;
        }
#pragma unroll
        for (int i = OV * iv; i < OV * iv + OV; ++i)
          cp_async16(sA + slot * C::A_BYTES + a_dst0 + i * (R_STEP * 128),
                     x + static_cast<uint32_t>(off[i % OV] + col), R_STEP * i < lim);
      }
      const int b0 = expert * w_stride + fit * b_stride + b_thread + n0 / 64 * 32;
#pragma unroll
      for (int i = 0; i < C::B_PER; ++i)
        cp_async16_stream(&sB[slot * (C::B_BYTES / 16) + tid + THREADS * i],
                          wq + static_cast<uint32_t>(b0 + i * C::B_STEPS * b_step));
      if (tid < C::ROWS / 8) {
        const int grp = group_size == kBK ? fit : fit * kBK / group_size;
        cp_async16(&sS[slot * (C::ROWS / 8) + tid], wsc + static_cast<uint32_t>(expert * s_stride + grp * N + n0 + tid * 8),
                   true);
      }
    }
    cp_async_commit();
  };

  const int blk = 2 * (warp >> 2) + ((warp & 3) >> 1), p = warp & 1;  // my 64-feature block and first int
  const int g = lane >> 2, t = lane & 3;
  float acc[2][BT / 2];  // wgmma j = 0, 1: features 64 blk + 32 j + 16 p + (g, g + 8)
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < BT / 2; ++e) {
      acc[j][e] = 0.f;
      asm volatile("" : "+f"(acc[j][e])::"memory");  // the zeros are defined before the first wgmma's fence
    }

  // Scales of my column g in n8 blocks 2p, 2p+1 (int p: wgmma 0's rows g, g + 8) and 2p+4, 2p+5 (int p + 2: wgmma
  // 1's) of my 64-feature block (the repack put a block's eight side by side): {lo, hi}, two scales each.
  auto scale_words = [&](int slot) {
    const int4 sv = sS[slot * (C::ROWS / 8) + blk * 8 + g];
    return uint2{p ? static_cast<uint32_t>(sv.y) : static_cast<uint32_t>(sv.x),
                 p ? static_cast<uint32_t>(sv.w) : static_cast<uint32_t>(sv.z)};
  };
  // Tiles of 128: those scales, each broadcast to both halves of a register, for the dequant.
  uint32_t s2[4];
  auto load_scales = [&](int slot) {
    const uint2 sw = scale_words(slot);
    s2[0] = __byte_perm(sw.x, 0, 0x1010), s2[1] = __byte_perm(sw.x, 0, 0x3232);
    s2[2] = __byte_perm(sw.y, 0, 0x1010), s2[3] = __byte_perm(sw.y, 0, 0x3232);
  };
  // A fragments of two k16 steps (one wgmma group): ints p and p + 2 of my chunk of each step; their nibble pairs
  // (0,4) (1,5) (2,6) (3,7) are a0a1, a4a5, a2a3, a6a7 of features 16 i + (g, g + 8); tiles of 128 multiply them by
  // the scales of n8 blocks 2i (row g) and 2i+1 (row g + 8). Two steps per group measured 2% faster than one
  // (benchmarks/NOTES.md).
  uint32_t afr[2][2][2][4];  // [buffer][step of the group][wgmma j][register]
  auto dequant_steps = [&](const int4 (&chunk)[2], uint32_t (&a)[2][2][4]) {
#pragma unroll
    for (int st = 0; st < 2; ++st) {
      const uint32_t q[2] = {p ? static_cast<uint32_t>(chunk[st].y) : static_cast<uint32_t>(chunk[st].x),
                             p ? static_cast<uint32_t>(chunk[st].w) : static_cast<uint32_t>(chunk[st].z)};
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t w[4];
        V::dequant(q[j], w);
        if constexpr (FOLD) {  // the exact codes; the stage's scales come in fold()
          a[st][j][0] = w[0], a[st][j][1] = w[2], a[st][j][2] = w[1], a[st][j][3] = w[3];
        } else {
          a[st][j][0] = V::mul(w[0], s2[2 * j]);
          a[st][j][1] = V::mul(w[2], s2[2 * j + 1]);
          a[st][j][2] = V::mul(w[1], s2[2 * j]);
          a[st][j][3] = V::mul(w[3], s2[2 * j + 1]);
        }
      }
    }
  };
  auto load_pair = [&](const int4* bchunks, int step, int4 (&c)[2]) {
    c[0] = bchunks[step * NB * 32];
    c[1] = bchunks[(step + 1) * NB * 32];
  };
  auto chunks = [&](int slot) { return sB + slot * (C::B_BYTES / 16) + blk * 32 + lane; };

#pragma unroll
  for (int s = 0; s < C::PREFETCH; ++s) fetch(0, s, s);
  cp_async_wait<C::PREFETCH - 1>();
  fence_proxy_async();
  __syncthreads();
  if constexpr (!FOLD) load_scales(0);
  {
    int4 first[2];
    load_pair(chunks(0), 0, first);
    dequant_steps(first, afr[0]);
  }

  // Epilogue of one tile, straight from the accumulators: D column 8 jj + 2 t (+1) is slot row 8 jj + 2 t (+1) of
  // the pair, and lanes g, g + 1 (lane ^ 4) hold features f, f + 1 of both rows; one shuffle gives each an adjacent
  // pair of one row: 4-byte stores, no shared memory (the pipeline's slots hold the next tile's stages).
  auto store_pair = [&](const PairRecord<BT>& ts, float v0, float v1, int r, int col, int out_n) {
    const bool odd = g & 1;
    const float recv = __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4);
    const int row = odd ? r + 1 : r;
    if (row < ts.rows)
      *reinterpret_cast<uint32_t*>(&out[static_cast<size_t>(ts.slot[row]) * out_n + (odd ? col - 1 : col)]) =
          odd ? V::pack(recv, v1) : V::pack(v0, recv);
  };
  auto epilogue = [&](const PairRecord<BT>& ts, int n0) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int jj = 0; jj < BT / 8; ++jj) {
        const int r = 8 * jj + 2 * t;
        if constexpr (MODE == kGateUp) {
          float v[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float gt = acc[0][4 * jj + 2 * h + c], up = acc[1][4 * jj + 2 * h + c];
            v[c] = __fdividef(gt, 1.f + __expf(-gt)) * up;  // no IEEE division's slow path (0 past 2^126)
          }
          // gate row 16 p + g (+8) of my block is column 32 blk + 16 p + g (+8) of h; its up row is 32 further on
          store_pair(ts, v[0], v[1], r, n0 / 2 + 32 * blk + 16 * p + g + 8 * h, N / 2);
        } else {
          const float w0 = ts.w[r], w1 = ts.w[r + 1];
#pragma unroll
          for (int j = 0; j < 2; ++j)
            store_pair(ts, acc[j][4 * jj + 2 * h] * w0, acc[j][4 * jj + 2 * h + 1] * w1, r,
                       n0 + 64 * blk + 32 * j + 16 * p + g + 8 * h, N);
        }
      }
  };

  // FOLD: the wgmmas of a stage (one 128-deep k tile, which lies in one scale group: group_size is a multiple of
  // 128) multiply the exact codes into `part`, which the stage's first wgmma starts afresh (scale-d 0); once the
  // stage's last wgmma is done, acc += scale * part per row, one FFMA per accumulator instead of a multiply per
  // dequantized weight pair.
  auto fold = [&](auto& part, int slot) {
    constexpr int NH = sizeof(part[0]) / sizeof(float);
    const uint2 sw = scale_words(slot);
    const float sc[2][2] = {{V::lo(sw.x), V::hi(sw.x)}, {V::lo(sw.y), V::hi(sw.y)}};  // [wgmma j][row g, g + 8]
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < NH; ++e) acc[j][e] = fmaf(sc[j][(e >> 1) & 1], part[j][e], acc[j][e]);
  };

  // My i-th tile (stages i * iters ..) with wgmma N = NT slots.
  auto tile_loop = [&](int i, auto nt_tag) {
    constexpr int NT = decltype(nt_tag)::value;
    [[maybe_unused]] float part[2][FOLD ? NT / 2 : 1];  // FOLD: this stage's sums, unscaled
    for (int it = 0; it < iters; ++it) {
      const int gs = i * iters + it, slot = gs % STAGES;
      const int4* bchunks = chunks(slot);
      // The stage's descriptor; each k16 step adds its offset / 16 to the low word's 14-bit address field (shared
      // addresses < 256 KB: no carry out of it), one add instead of rebuilding the descriptor.
      const uint64_t desc0 = smem_desc_sw128(smem_u32(sA + slot * C::A_BYTES));
#pragma unroll
      for (int kp = 0; kp < 4; ++kp) {  // pairs of k16 steps 2 kp, 2 kp + 1
        int4 next[2];
        if (kp + 1 < 4) load_pair(bchunks, 2 * kp + 2, next);
        wgmma_fence();
#pragma unroll
        for (int st = 0; st < 2; ++st) {
          const int kk = 2 * kp + st;
          const uint64_t desc = desc0 + (((kk >> 2) * (BT * 128) + (kk & 3) * 32) >> 4);
          if constexpr (!FOLD) {
            Wgmma<T, NT>::rs(acc[0], afr[kp & 1][st][0], desc);
            Wgmma<T, NT>::rs(acc[1], afr[kp & 1][st][1], desc);
          } else if (kp == 0 && st == 0) {  // the stage's first k16 step: part = a . B
            Wgmma<T, NT>::template rs<false>(part[0], afr[0][0][0], desc);
            Wgmma<T, NT>::template rs<false>(part[1], afr[0][0][1], desc);
          } else {
            Wgmma<T, NT>::rs(part[0], afr[kp & 1][st][0], desc);
            Wgmma<T, NT>::rs(part[1], afr[kp & 1][st][1], desc);
          }
        }
        wgmma_commit();
        wgmma_wait<1>();  // the previous group is done: its A registers and shared memory are free
        if (kp + 1 < 4) {
          dequant_steps(next, afr[(kp + 1) & 1]);
        } else if (gs + 1 < total) {
          cp_async_wait<C::PREFETCH - 2>();  // stage gs + 1 has landed (this thread's copies)
          fence_proxy_async();
          __syncthreads();  // ... everyone's; and every warp is done with stage gs - 1's slot
          // The next tile's record (Wg::LOOKAHEAD says why the stages fit); its buffer's last reader was tile
          // i - 1's epilogue, before this barrier.
          if (warp == 0 && it == 0 && i + 1 < my_tiles) {
            const int next = blockIdx.x + (i + 1) * gridDim.x;
            if (lane == 0) s_n0[(i + 1) & 1] = next % n_tiles * C::ROWS;
            copy_record(recs, next / n_tiles, kChunks, lane, s_tile[(i + 1) & 1]);
          }
          fetch(i, it + C::PREFETCH, (gs + C::PREFETCH) % STAGES);
          if constexpr (!FOLD) load_scales((gs + 1) % STAGES);
          load_pair(chunks((gs + 1) % STAGES), 0, next);
          dequant_steps(next, afr[0]);
        }
        if constexpr (FOLD) {
          if (kp == 3) {  // the stage's last wgmmas are done; its slot is refilled only after the next barrier
            wgmma_wait<0>();
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
              for (int e = 0; e < NT / 2; ++e) asm volatile("" : "+f"(part[j][e])::"memory");  // reads after the wait
            fold(part, slot);
          }
        }
      }
    }
    // The tile's last stage: write it out, start the next from zero.
    wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < BT / 2; ++e) asm volatile("" : "+f"(acc[j][e])::"memory");  // reads after the wait
    epilogue(s_tile[i & 1], s_n0[i & 1]);
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < BT / 2; ++e) {
        acc[j][e] = 0.f;
        asm volatile("" : "+f"(acc[j][e])::"memory");
      }
  };
  // wgmma N per tile: the pair's real rows rounded up to 32 (the sort pads each expert's run to 64 slots; N = 128 for
  // every pair would run 256 rows for an expert of ~205 slots, not 224); small tiles round up to 8, 16 or 32.
  // Columns past a short pair's N stay zero.
  for (int i = 0; i < my_tiles; ++i) {
    const int rows = s_tile[i & 1].rows;
    if constexpr (BT == 128) {
      if (rows > 96)
        tile_loop(i, std::integral_constant<int, 128>{});
      else if (rows > 64)
        tile_loop(i, std::integral_constant<int, 96>{});
      else if (rows > 32)
        tile_loop(i, std::integral_constant<int, 64>{});
      else
        tile_loop(i, std::integral_constant<int, 32>{});
    } else {
      if (rows > 16)
        tile_loop(i, std::integral_constant<int, 32>{});
      else if (rows > 8)
        tile_loop(i, std::integral_constant<int, 16>{});
      else
        tile_loop(i, std::integral_constant<int, 8>{});
    }
  }
  cp_async_wait<0>();
}

std::atomic<int64_t> g_wgmma_grid_cap{0};  // set_moe_wgmma_grid_cap

// Tiles of BT slots per block_m the sort pads to: 128 per 64 (pairs of blocks), 32 per 32 (and per 8: the split
// variant's experts of more than 8 slots).
int tile_slots(int block_m) { return block_m == 64 ? 128 : 32; }

// Pairs: sum over experts of ceil(count / BT) <= slots / BT + experts, and no more than the sort's blocks.
int64_t max_pairs(int64_t sorted_numel, int64_t slots, int64_t experts, int block_m) {
  return std::min<int64_t>(sorted_numel / block_m, slots / tile_slots(block_m) + experts);
}

template <typename T, int WGS, int BT, int MODE>
cudaError_t launch_wgmma(const MoeLaunch& a) {
  using C = Wg<WGS, BT>;
  auto kernel = moe_wgmma_kernel<T, WGS, BT, MODE>;
  static uint64_t configured = 0;
  const cudaError_t err = allow_dynamic_smem(kernel, C::SMEM, configured);
  if (err != cudaSuccess) return err;
  const int num_experts = static_cast<int>(a.weight.size(0));
  const int k = static_cast<int>(a.weight.size(1) * 16), n = static_cast<int>(a.weight.size(2) * 64);
  const int64_t pairs = max_pairs(a.sorted.numel(), a.weights.numel(), num_experts, a.block_m);
  if (num_experts > kMoeWgmmaMaxExperts || pairs > 0x7fffffff ||
      a.workspace.numel() < moe_wgmma_workspace_bytes(a.sorted.numel(), a.weights.numel(), num_experts, a.block_m))
    return cudaErrorInvalidValue;
  if (pairs == 0) return cudaSuccess;
  // CTAS_PER_SM CTAs per SM, each through every grid-th tile; with fewer k tiles than the lookahead needs, one CTA
  // per tile (CTAs past the last real tile exit at once).
  const int sms = sm_count(a.a.get_device());
  const int64_t tiles = pairs * (n / C::ROWS);
  const int64_t cap = g_wgmma_grid_cap.load(std::memory_order_relaxed);
  const int64_t resident = C::CTAS_PER_SM * static_cast<int64_t>(sms);
  const int64_t ctas = k / kBK >= C::LOOKAHEAD ? std::min<int64_t>({tiles, resident, cap > 0 ? cap : resident}) : tiles;
  if (ctas > 0x7fffffff || tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const MoeArgs moe{a.sorted.data_ptr<int>(), a.counts.data_ptr<int>(), a.weights.data_ptr<float>(), num_experts,
                    a.top_k, a.weight.size(1) * a.weight.size(2) * 32, a.scale.size(1) * a.scale.size(2)};
  int* header = reinterpret_cast<int*>(a.workspace.data_ptr());
  auto* recs = reinterpret_cast<PairRecord<BT>*>(reinterpret_cast<uint8_t*>(a.workspace.data_ptr()) + 16);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  moe_pair_kernel<<<static_cast<unsigned>(std::min<int64_t>((pairs + 7) / 8, 2 * sms)), 256,
                    (2 * num_experts + 1) * sizeof(int), stream>>>(moe, a.mode, a.block_m, C::THREADS / 16, k,
                                                                   a.min_count, static_cast<int>(pairs), header,
                                                                   recs);
  const cudaError_t pair_err = cudaGetLastError();  // the GEMM must not read a work list that was never written
  if (pair_err != cudaSuccess) return pair_err;
  kernel<<<dim3(static_cast<unsigned>(ctas)), C::THREADS, C::SMEM, stream>>>(
      reinterpret_cast<const T*>(a.a.data_ptr()), reinterpret_cast<const int4*>(a.weight.data_ptr()),
      reinterpret_cast<const T*>(a.scale.data_ptr()), reinterpret_cast<T*>(a.out.data_ptr()), n, k, a.group_size,
      static_cast<int>(moe.w_stride), static_cast<int>(moe.s_stride), header, recs);
  return cudaGetLastError();
}

// Marks which code this build runs on the device: its static shared memory is 4 KB only where the wgmma path was
// compiled (sm_90a), 1 KB in a plain sm_90 cubin (GLM_AWQ_CUDA_ARCHS=90, whose wgmma kernel would only trap; this
// file's 1 KB-aligned dynamic shared memory pads every kernel's static part to 1 KB).
// cudaFuncGetAttributes reads that without a launch or a sync, so the check is safe during CUDA-graph capture.
__global__ void wgmma_build_probe(int* out) {
#ifdef GLM_AWQ_WGMMA_DEVICE
  __shared__ int mark[1024];
#else
  __shared__ int mark[4];
#endif
  mark[threadIdx.x % (sizeof(mark) / sizeof(int))] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = mark[(threadIdx.x + 1) % (sizeof(mark) / sizeof(int))];
}

}  // namespace

int64_t moe_wgmma_workspace_bytes(int64_t sorted_numel, int64_t slots, int64_t experts, int block_m) {
  const int64_t record = tile_slots(block_m) == 128 ? sizeof(PairRecord<128>) : sizeof(PairRecord<32>);
  return 16 + max_pairs(sorted_numel, slots, experts, block_m) * record;
}

void set_moe_wgmma_grid_cap(int64_t ctas) { g_wgmma_grid_cap.store(ctas, std::memory_order_relaxed); }

bool wgmma_device_supported(int device) {
  static int cache[64] = {0};  // 1: runs sm_90a code, -1: does not
  if (device < 0 || device >= 64) return false;
  if (cache[device] == 0) {
    int major = 0;
    cudaFuncAttributes attr{};
    // The attributes are those of the binary `device` loads: ask with it current (the guard restores the previous
    // device without creating a context there).
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                    major == 9 && cudaFuncGetAttributes(&attr, wgmma_build_probe) == cudaSuccess &&
                    attr.binaryVersion == 90 && attr.sharedSizeBytes >= 4096;
    if (!ok) cudaGetLastError();  // a failed query must not surface as the next launch's error
    cache[device] = ok ? 1 : -1;
  }
  return cache[device] > 0;
}

bool moe_wgmma_supported(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& scale) {
  constexpr int64_t kMax32 = int64_t{1} << 31;  // the kernel's copy addresses are 32-bit element offsets
  return weight.size(2) * 64 % 128 == 0 && weight.size(0) <= kMoeWgmmaMaxExperts && a.numel() < kMax32 &&
         weight.numel() / 4 < kMax32 && scale.numel() < kMax32 && wgmma_device_supported(a.get_device());
}

// The table: dtype x {tiles of 128 slots (the sort's block_m 64) on 2 warpgroups (N % 256 == 0) or 1 (N % 128 == 0;
// still one CTA and 4 warps per SM: for odd N only), tiles of 32 (block_m 32) on 1 warpgroup, four CTAs per SM} x
// {GEMM1, GEMM2}. The tiles of 32 on one warpgroup x 4 CTAs tie two x 2 (GLM-4.6 layer, H200, same run: medians
// 1.5-3.4% faster at T = 160..384, 1% slower at 512, within the rounds' spread; benchmarks/NOTES.md, seventeenth
// session) and need half the instantiations.
int launch_moe_wgmma(const MoeLaunch& a) {
  const int64_t n = a.weight.size(2) * 64;
  if ((a.block_m != 64 && a.block_m != 32 && a.block_m != 8) || n % 128) return cudaErrorInvalidValue;
  const bool bf16 = a.a.scalar_type() == at::kBFloat16, wide = n % 256 == 0, small = a.block_m != 64;
#define GLM_AWQ_WGMMA_MODES(T, WGS, BT) \
  return a.mode == kGateUp ? launch_wgmma<T, WGS, BT, kGateUp>(a) : launch_wgmma<T, WGS, BT, kDown>(a);
#define GLM_AWQ_WGMMA_CASE(T, WGS)    \
  if (small) GLM_AWQ_WGMMA_MODES(T, 1, 32) \
  GLM_AWQ_WGMMA_MODES(T, WGS, 128)
  if (bf16) {
    if (wide) {
      GLM_AWQ_WGMMA_CASE(__nv_bfloat16, 2)
    }
    GLM_AWQ_WGMMA_CASE(__nv_bfloat16, 1)
  }
  if (wide) {
    GLM_AWQ_WGMMA_CASE(__half, 2)
  }
  GLM_AWQ_WGMMA_CASE(__half, 1)
#undef GLM_AWQ_WGMMA_CASE
#undef GLM_AWQ_WGMMA_MODES
}

}  // namespace glm_awq
