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
// WN of the 8 16-deep k steps of every stage (register double-buffered: the next step's fragments load while
// this one's dequant and mmas run), and the WK partial tiles are summed in shared memory in a fixed order. Split-K partials go to an fp32 workspace; the CTA that finishes a tile last (an atomic ticket per
// tile) sums the splits in split order, adds the bias and writes the output, then resets the ticket to zero.
// Every sum has a fixed order, so the output bits do not depend on scheduling.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include "ops.h"
#include "w4a16_common.h"

namespace glm_awq {
namespace {

constexpr int kThreads = 256;  // 8 warps per CTA

// -------------------------------------------------------------------------------------------------- GEMM

template <int M_BLOCKS, int WN, bool FOLD = false>
struct Tile {
  static constexpr int WK = 8 / WN;               // warps splitting each stage's K
  static constexpr int KPW = kBK / 16 / WK;       // 16-deep k steps per warp per stage (= WN)
  static constexpr int BM = 16 * M_BLOCKS, BN = 64 * WN;
  static constexpr int A_CHUNKS = BM * kBK / 8;   // 16-byte chunks of activations per stage: M_BLOCKS per thread
  static constexpr int B_CHUNKS = kBK * BN / 32;  // 16-byte chunks of int4 weights per stage: WN per thread
  static constexpr int S_CHUNKS = BN / 8;         // 16-byte chunks of scales per stage
  static constexpr int bytes(int stages) { return stages * (A_CHUNKS + B_CHUNKS + S_CHUNKS) * 16; }
  // Occupancy: at M <= 16 the SM is issue-latency bound (ncu, H200: 3.5 warps per scheduler, 0.49 issued per
  // cycle), so small tiles ask for 3 CTAs per SM (registers capped at 80) and drop to 3 stages where 4 don't fit.
  // FOLD keeps a second accumulator set (tmp) per stage: 2 CTAs, 128 registers.
  static constexpr int WANT = M_BLOCKS == 1 ? (FOLD ? 2 : 3) : M_BLOCKS == 2 ? 2 : 1;
  static constexpr int STAGES = WANT * (bytes(4) + 1024) <= kSmemPerSM ? 4 : 3;  // cp.async pipeline depth
  static constexpr int SMEM = bytes(STAGES);
  static constexpr int FIT = kSmemPerSM / (SMEM + 1024);
  static constexpr int MIN_BLOCKS = FIT < 1 ? 1 : FIT < WANT ? FIT : WANT;  // __launch_bounds__ minimum
  static constexpr int RED = WK > 1 ? WN * M_BLOCKS * 32 * 32 * 4 : 0;  // bytes of the cross-warp K reduction
  static_assert(A_CHUNKS == M_BLOCKS * kThreads && B_CHUNKS == WN * kThreads, "whole chunks per thread");
  static_assert(RED <= SMEM, "the K reduction reuses the pipeline's shared memory");
};

template <typename T,      // activation, scale, bias and output dtype: __half or __nv_bfloat16
          int M_BLOCKS,    // 16-row token blocks per CTA tile: BM = 16 * M_BLOCKS (1..4)
          int WN,          // warps along N, 64 columns each: BN = 64 * WN (1, 2, 4, 8); the other 8 / WN warps split K
          int MODE,        // kDense, kGateUp or kDown (see Mode)
          bool FOLD>       // scales folded in after each stage (see the k loop) instead of multiplied into B
__global__ void __launch_bounds__(kThreads, Tile<M_BLOCKS, WN, FOLD>::MIN_BLOCKS) w4a16_gemm_kernel(
    const T* __restrict__ x,       // [M, K] row-major, 16-byte aligned rows
    const int4* __restrict__ wq,   // [K/16, N/64, 32] int4 chunks: the cuda layout above
    const T* __restrict__ wsc,     // [G, N] repacked scales
    const T* __restrict__ bias,    // [N] or nullptr
    T* __restrict__ out,           // [M, N]
    float* __restrict__ partial,   // [splits, M, N] fp32 when gridDim.z > 1
    int* __restrict__ tickets,     // [m_tiles * n_tiles] zeros, left zero
    int M, int N, int K, int group_size, int k_tiles_per_split, MoeArgs moe) {
  using Cfg = Tile<M_BLOCKS, WN, FOLD>;
  using V = Num<T>;
  constexpr int WK = Cfg::WK, KPW = Cfg::KPW, BM = Cfg::BM, BN = Cfg::BN, kStages = Cfg::STAGES;
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

  // MoE: which expert this block of sorted slots belongs to, how many of its BM rows are real, and their slot
  // ids. Blocks past the last expert's run exit here.
  __shared__ int s_slot[MODE == kDense ? 1 : BM];
  __shared__ int s_info[2];
  int rows_here = M - m0;
  if constexpr (MODE != kDense) {
    if (warp == 0) find_expert_block<BM>(moe, m0, lane, s_slot, s_info);
    __syncthreads();
    if (s_info[0] < 0) return;  // the whole CTA: no barrier follows for anyone
    rows_here = s_info[1];
    wq += s_info[0] * moe.w_stride;
    wsc += s_info[0] * moe.s_stride;
  }

  // The copy plan, computed once: this thread's M_BLOCKS activation chunks (row (tid / 16) + 16 i, chunk
  // tid % 16 of the 128-wide row) and WN weight chunks (tid + 256 i of the stage, which is WN * 512 contiguous
  // bytes per k16 row); each k tile then only adds a fixed stride.
  const T* a_src[M_BLOCKS];
  int a_dst[M_BLOCKS];
  bool a_ok[M_BLOCKS];
#pragma unroll
  for (int i = 0; i < M_BLOCKS; ++i) {
    const int r = (tid >> 4) + 16 * i, cc = tid & 15;
    a_ok[i] = r < rows_here;
    int row = m0 + r;
    if constexpr (MODE == kGateUp) row = s_slot[a_ok[i] ? r : 0] / moe.top_k;
    if constexpr (MODE == kDown) row = s_slot[a_ok[i] ? r : 0];
    a_src[i] = x + static_cast<size_t>(a_ok[i] ? row : 0) * K + static_cast<size_t>(kt0) * kBK + cc * 8;
    a_dst[i] = r * 16 + (cc ^ (r & 7));  // the XOR swizzle puts the 8 rows one ldmatrix phase reads in 8 bank groups
  }
  const int4* b_src[WN];
#pragma unroll
  for (int i = 0; i < WN; ++i) {
    const int c = tid + kThreads * i, r = c / (WN * 32), cc = c % (WN * 32);
    b_src[i] = wq + (static_cast<size_t>(kt0 * 8 + r) * n64 + nt * WN) * 32 + cc;
  }
  const size_t b_step = static_cast<size_t>(8) * n64 * 32;  // int4 chunks per k tile

  // Rows past M are zero in every stage, written once here and never copied over.
#pragma unroll
  for (int i = 0; i < M_BLOCKS; ++i)
    if (!a_ok[i])
#pragma unroll
      for (int s = 0; s < kStages; ++s) sA[s * A_CHUNKS + a_dst[i]] = make_int4(0, 0, 0, 0);

  // Issue the copies of k-tile kt0 + it into stage slot it % kStages; always commit a group, even an empty
  // one, so that wait_group<kStages - 2> below always means "the tile about to be computed has landed".
  auto fetch = [&](int it) {
    if (it < iters) {
      const int slot = it % kStages;
#pragma unroll
      for (int i = 0; i < M_BLOCKS; ++i)
        if (a_ok[i]) cp_async16(&sA[slot * A_CHUNKS + a_dst[i]], a_src[i] + it * kBK, true);
#pragma unroll
      for (int i = 0; i < WN; ++i) cp_async16_stream(&sB[slot * B_CHUNKS + tid + kThreads * i], b_src[i] + it * b_step);
      if (tid < S_CHUNKS) {
        const int g = (kt0 + it) * kBK / group_size;
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

  // Operand fragments of one k step: A by ldmatrix (lanes 0-15 address rows 0-15 at k 0..7 of the step,
  // lanes 16-31 the same rows at k 8..15), B as this lane's 16 bytes of the warp's 16x64 sub-tile.
  uint32_t a[2][M_BLOCKS][4];
  int4 bq[2];
  auto load_step = [&](int slot, int kk, uint32_t (&af)[M_BLOCKS][4], int4& bf) {
    const int ks = wk * KPW + kk;
#pragma unroll
    for (int mb = 0; mb < M_BLOCKS; ++mb) {
      const int r = mb * 16 + (lane & 15), cc = ks * 2 + (lane >> 4);
      ldmatrix_x4(af[mb], &sA[slot * A_CHUNKS + r * 16 + (cc ^ (r & 7))]);
    }
    bf = sB[slot * B_CHUNKS + (ks * WN + wn) * 32 + lane];
  };

  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // the tile `it` is visible to all warps, and every warp is done with slot (it - 1)
    const int slot = it % kStages;
    load_step(slot, 0, a[0], bq[0]);
    fetch(it + kStages - 1);
    // Scales of my column g in n8 blocks 0..7 (the repack put them side by side), broadcast to both halves:
    // s2[j] multiplies the (k, k+1) pairs of block j.
    const int4 sv = sS[slot * S_CHUNKS + wn * 8 + (lane >> 2)];
    const uint32_t sw[4] = {static_cast<uint32_t>(sv.x), static_cast<uint32_t>(sv.y), static_cast<uint32_t>(sv.z),
                            static_cast<uint32_t>(sv.w)};
    uint32_t s2[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s2[2 * i] = __byte_perm(sw[i], 0, 0x1010);
      s2[2 * i + 1] = __byte_perm(sw[i], 0, 0x3232);
    }
    if constexpr (FOLD) {
      // FOLD: the mmas see the exact codes q - 8 (no scale), so tmp = A . (q - 8) for the stage, every product
      // exact, and after the stage acc += scale * tmp in fp32: one multiply per weight pair less than scales into
      // B, for a second accumulator set. (The first version fed the raw codes magic + 8 + q and took a ninth mma
      // against magic + 8 away: its fp32 sums carried magic + 8 times every activation, and an activation outlier
      // on a zero weight cost 2e-2 to 6e-2 of the output; tests/test_cuda_kernels.py, outliers on zero weights.)
      // The scales now follow the C fragment's columns 2t and 2t + 1 of each n8 block (not the B operand's
      // column g): the repacked chunks of columns 2t and 2t + 1, blocks 0..7 each.
      const int4 sv0 = sS[slot * S_CHUNKS + wn * 8 + 2 * (lane & 3)], sv1 = sS[slot * S_CHUNKS + wn * 8 + 2 * (lane & 3) + 1];
      const uint32_t c0[4] = {static_cast<uint32_t>(sv0.x), static_cast<uint32_t>(sv0.y), static_cast<uint32_t>(sv0.z),
                              static_cast<uint32_t>(sv0.w)};
      const uint32_t c1[4] = {static_cast<uint32_t>(sv1.x), static_cast<uint32_t>(sv1.y), static_cast<uint32_t>(sv1.z),
                              static_cast<uint32_t>(sv1.w)};
      float sf[2][8];  // [column 2t + c][n8 block]
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sf[0][2 * i] = V::lo(c0[i]), sf[0][2 * i + 1] = V::hi(c0[i]);
        sf[1][2 * i] = V::lo(c1[i]), sf[1][2 * i + 1] = V::hi(c1[i]);
      }
      float tmp[M_BLOCKS][8][4];
#pragma unroll
      for (int kk = 0; kk < KPW; ++kk) {
        if (kk + 1 < KPW) load_step(slot, kk + 1, a[(kk + 1) & 1], bq[(kk + 1) & 1]);
        const int4 b = bq[kk & 1];
        const uint32_t q[4] = {static_cast<uint32_t>(b.x), static_cast<uint32_t>(b.y), static_cast<uint32_t>(b.z),
                               static_cast<uint32_t>(b.w)};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          uint32_t w[4];
          V::dequant(q[i], w);
#pragma unroll
          for (int mb = 0; mb < M_BLOCKS; ++mb) {
            if (kk == 0) {
              V::mma0(tmp[mb][2 * i], a[kk & 1][mb], w[0], w[1]);
              V::mma0(tmp[mb][2 * i + 1], a[kk & 1][mb], w[2], w[3]);
            } else {
              V::mma(tmp[mb][2 * i], a[kk & 1][mb], w[0], w[1]);
              V::mma(tmp[mb][2 * i + 1], a[kk & 1][mb], w[2], w[3]);
            }
          }
        }
      }
#pragma unroll
      for (int mb = 0; mb < M_BLOCKS; ++mb)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mb][j][e] = fmaf(sf[e & 1][j], tmp[mb][j][e], acc[mb][j][e]);
    } else {
#pragma unroll
      for (int kk = 0; kk < KPW; ++kk) {
        if (kk + 1 < KPW) load_step(slot, kk + 1, a[(kk + 1) & 1], bq[(kk + 1) & 1]);
        const int4 b = bq[kk & 1];
        const uint32_t q[4] = {static_cast<uint32_t>(b.x), static_cast<uint32_t>(b.y), static_cast<uint32_t>(b.z),
                               static_cast<uint32_t>(b.w)};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          uint32_t w[4];
          V::dequant(q[i], w);
          w[0] = V::mul(w[0], s2[2 * i]);
          w[1] = V::mul(w[1], s2[2 * i]);
          w[2] = V::mul(w[2], s2[2 * i + 1]);
          w[3] = V::mul(w[3], s2[2 * i + 1]);
#pragma unroll
          for (int mb = 0; mb < M_BLOCKS; ++mb) {
            V::mma(acc[mb][2 * i], a[kk & 1][mb], w[0], w[1]);
            V::mma(acc[mb][2 * i + 1], a[kk & 1][mb], w[2], w[3]);
          }
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
  if constexpr (MODE == kGateUp) {
    if (wk == 0) {
      const int half_n = N / 2;  // I
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = (n0 + wn * 64) / 2 + j * 8 + 2 * t;
#pragma unroll
        for (int mb = 0; mb < M_BLOCKS; ++mb)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = mb * 16 + g + 8 * h;
            if (r < rows_here) {
              const float g0 = acc[mb][j][2 * h], g1 = acc[mb][j][2 * h + 1];
              const float v0 = g0 / (1.f + __expf(-g0)) * acc[mb][j + 4][2 * h];
              const float v1 = g1 / (1.f + __expf(-g1)) * acc[mb][j + 4][2 * h + 1];
              *reinterpret_cast<uint32_t*>(&out[static_cast<size_t>(s_slot[r]) * half_n + col]) = V::pack(v0, v1);
            }
          }
      }
    }
    return;
  }
  if constexpr (MODE == kDown) {
    if (wk == 0) {
#pragma unroll
      for (int mb = 0; mb < M_BLOCKS; ++mb)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = mb * 16 + g + 8 * h;
          if (r < rows_here) {
            const int slot = s_slot[r];
            const float w = moe.weights[slot];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              const int col = n0 + wn * 64 + j * 8 + 2 * t;
              *reinterpret_cast<uint32_t*>(&out[static_cast<size_t>(slot) * N + col]) =
                  V::pack(acc[mb][j][2 * h] * w, acc[mb][j][2 * h + 1] * w);
            }
          }
        }
    }
    return;
  }
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
  finish_split_k<T, kThreads>(partial, bias, out, &tickets[mt * gridDim.y + nt], &last_cta, M, N, m0, min(BM, M - m0), n0, BN);
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

// The cuda layout back to a dense [N, K] weight with the GEMM's own dequant and scale multiply (so the large-M
// path, dense matmul on this, sees bit for bit the weights the mma path sees). A CTA takes one 64 x 128 (n x k)
// tile: warp w dequantizes k16 step w (each lane its 16-byte chunk: 8 rows x 4 values) into shared memory, then the
// tile leaves as 16-byte row segments, 256 contiguous bytes per row (the first version stored 4-byte pairs
// straight from the fragment layout: 16-byte runs per row, half of every 32-byte sector written per instruction).
constexpr int kDeqPad = 8;  // elements per smem row of padding: lanes (g, t) of a store hit 32 different banks
template <typename T>
__global__ void __launch_bounds__(256) dequantize_cuda_layout_kernel(
    const int4* __restrict__ wq,  // [K/16, N/64, 32] chunks
    const T* __restrict__ wsc,    // [G, N] repacked scales
    T* __restrict__ out,          // [N, K]
    int N, int K, int group_size) {
  using V = Num<T>;
  __shared__ __align__(16) T tile[64][kBK + kDeqPad];
  const int nb = blockIdx.x, kt = blockIdx.y;  // 64-row block, 128-deep k tile
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane / 4, t = lane % 4;
  const int kb = kt * 8 + w;  // k16 step
  const int4 sv = *reinterpret_cast<const int4*>(wsc + static_cast<size_t>(kb * 16 / group_size) * N + nb * 64 + g * 8);
  const int4 b = wq[(static_cast<size_t>(kb) * (N / 64) + nb) * 32 + lane];
  const uint32_t q[4] = {static_cast<uint32_t>(b.x), static_cast<uint32_t>(b.y), static_cast<uint32_t>(b.z),
                         static_cast<uint32_t>(b.w)};
  const uint32_t sw[4] = {static_cast<uint32_t>(sv.x), static_cast<uint32_t>(sv.y), static_cast<uint32_t>(sv.z),
                          static_cast<uint32_t>(sv.w)};
  const int k0 = w * 16 + 2 * t;  // column in the tile
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t d[4];
    V::dequant(q[i], d);
    const uint32_t s_lo = __byte_perm(sw[i], 0, 0x1010), s_hi = __byte_perm(sw[i], 0, 0x3232);
    const int r_lo = 16 * i + g, r_hi = r_lo + 8;  // n8 blocks 2i and 2i + 1, column g
    *reinterpret_cast<uint32_t*>(&tile[r_lo][k0]) = V::mul(d[0], s_lo);
    *reinterpret_cast<uint32_t*>(&tile[r_lo][k0 + 8]) = V::mul(d[1], s_lo);
    *reinterpret_cast<uint32_t*>(&tile[r_hi][k0]) = V::mul(d[2], s_hi);
    *reinterpret_cast<uint32_t*>(&tile[r_hi][k0 + 8]) = V::mul(d[3], s_hi);
  }
  __syncthreads();
#pragma unroll
  for (int c = threadIdx.x; c < 64 * kBK / 8; c += 256) {  // 16 chunks of 8 elements per row
    const int r = c / (kBK / 8), cc = c % (kBK / 8);
    *reinterpret_cast<int4*>(&out[static_cast<size_t>(nb * 64 + r) * K + kt * kBK + cc * 8]) =
        *reinterpret_cast<const int4*>(&tile[r][cc * 8]);
  }
}

// ------------------------------------------------------------------------------------------------ launch
// The host side here never throws: the checked entry points (validation, error messages) are in ops.cpp,
// built by the host C++ compiler, and these launchers report failures as a cudaError_t for ops.cpp to raise.


constexpr int64_t kMinTilesPerSplit = 5;

// Launch one instantiation: pick the split count from its occupancy (CTAs resident per SM x SMs), split K no
// finer than one k tile per CTA, and only while the tickets cover the tile grid.
template <typename T, int M_BLOCKS, int WN, bool FOLD>
cudaError_t launch(const GemmLaunch& a) {
  using Cfg = Tile<M_BLOCKS, WN, FOLD>;
  auto kernel = w4a16_gemm_kernel<T, M_BLOCKS, WN, kDense, FOLD>;
  static uint64_t configured = 0;  // devices whose shared-memory attribute is set
  static int per_sm = 0;           // CTAs per SM, from the first device (the split heuristic only)
  cudaError_t err = allow_dynamic_smem(kernel, Cfg::SMEM, configured);
  if (err == cudaSuccess && per_sm == 0)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, Cfg::SMEM);
  if (err != cudaSuccess) return err;
  if (per_sm <= 0) return cudaErrorInvalidConfiguration;
  const int64_t m_tiles = (a.m + Cfg::BM - 1) / Cfg::BM, n_tiles = a.n / Cfg::BN, k_tiles = a.k / kBK;
  int64_t s = a.splits;
  if (s <= 0) {
    const int64_t tiles = m_tiles * n_tiles, slots = static_cast<int64_t>(per_sm) * sm_count(a.x.get_device());
    s = tiles >= slots ? 1 : slots / tiles;
  }
  // From two token blocks up (auto split only), the last CTA's sum over many splits costs more than the split
  // saves: keep at least kMinTilesPerSplit k tiles per split (H100 sweep, NOTES.md: kv_proj M=32 23.5 -> 10.7 us).
  // With the same sweep, no more CTAs than SMs there (expert gate_up M=32: 4 splits 14.1 us, 8 splits 16.2).
  int64_t max_splits = k_tiles;
  if (M_BLOCKS >= 2 && a.splits <= 0)
    max_splits = std::max<int64_t>(1, std::min(k_tiles / kMinTilesPerSplit,
                                               sm_count(a.x.get_device()) / (m_tiles * n_tiles)));
  s = std::max<int64_t>(1, std::min(s, max_splits));
  if (m_tiles * n_tiles > a.tickets.numel()) s = 1;
  const int64_t k_per_split = (k_tiles + s - 1) / s;
  s = (k_tiles + k_per_split - 1) / k_per_split;  // no empty splits
  if (n_tiles > 65535 || m_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  at::Tensor partial;
  if (s > 1) partial = at::empty({s, a.m, a.n}, a.x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles), static_cast<unsigned>(s));
  kernel<<<grid, kThreads, Cfg::SMEM, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(a.x.data_ptr()), reinterpret_cast<const int4*>(a.weight.data_ptr()),
      reinterpret_cast<const T*>(a.scale.data_ptr()), a.bias ? reinterpret_cast<const T*>(a.bias->data_ptr()) : nullptr,
      reinterpret_cast<T*>(a.out.data_ptr()), s > 1 ? partial.data_ptr<float>() : nullptr, a.tickets.data_ptr<int>(),
      a.m, a.n, a.k, a.group_size, static_cast<int>(k_per_split), MoeArgs{});
  return cudaGetLastError();
}

// .variant; 0: skinny (w4a16_skinny.cu) where skinny_preferred, else FOLD at M <= 16 and classic above.
// 1: classic (scales into B), 2: FOLD, 3: skinny.
constexpr int kVariantFold = 2, kVariantSkinny = 3, kVariantWgmma = 4;
// moe_gemm's variant 5 (not CudaBackend.VARIANT 5, the per-token path): blocks of 16, FOLD on the widest tile
// that divides N (up to 512).
constexpr int kVariantMoeFoldWide = 5;
// moe_gemm's variant 6, with block_m 8 (a sort padded to blocks of 8): experts of at most 8 slots on the skinny
// kernel (one block each), the others on the wgmma kernel's tiles of 32 (sm_90a; elsewhere all on the skinny
// kernel). Two launches over disjoint slots, no expert read twice.
constexpr int kVariantMoeSplit = 6;
constexpr int kMoeWN = 2;  // MoE tiles 128 wide (but blocks of 16, below): T = 1 gives 8 experts x 24 or 40 CTAs

template <typename T, int M_BLOCKS, int MODE, bool FOLD, int WN = kMoeWN>
cudaError_t launch_moe(const MoeLaunch& a) {
  using Cfg = Tile<M_BLOCKS, WN, FOLD>;
  auto kernel = w4a16_gemm_kernel<T, M_BLOCKS, WN, MODE, FOLD>;
  static uint64_t configured = 0;  // devices whose shared-memory attribute is set
  const cudaError_t err = allow_dynamic_smem(kernel, Cfg::SMEM, configured);
  if (err != cudaSuccess) return err;
  const int num_experts = static_cast<int>(a.weight.size(0));
  const int k = static_cast<int>(a.weight.size(1) * 16), n = static_cast<int>(a.weight.size(2) * 64);
  const int64_t max_blocks = a.sorted.numel() / Cfg::BM;
  if (max_blocks == 0) return cudaSuccess;
  const MoeArgs moe{a.sorted.data_ptr<int>(), a.counts.data_ptr<int>(), a.weights.data_ptr<float>(), num_experts,
                    a.top_k, a.weight.size(1) * a.weight.size(2) * 32, a.scale.size(1) * a.scale.size(2)};
  const dim3 grid(static_cast<unsigned>(max_blocks), static_cast<unsigned>(n / Cfg::BN), 1);
  kernel<<<grid, kThreads, Cfg::SMEM, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(a.a.data_ptr()), reinterpret_cast<const int4*>(a.weight.data_ptr()),
      reinterpret_cast<const T*>(a.scale.data_ptr()), nullptr, reinterpret_cast<T*>(a.out.data_ptr()), nullptr,
      nullptr, 0, n, k, a.group_size, k / kBK, moe);
  return cudaGetLastError();
}

// out[t] = sum over a of y[t * top_k + a] (slots whose expert is elsewhere, local < 0, skipped), in slot order:
// fp32, deterministic. A thread owns 8 columns (16 bytes) of one token; grid (tokens, H / 1024). The slots' rows are
// loaded unconditionally (a skipped slot's row exists, unwritten) so all top_k loads are in flight at once, and
// masked after: one memory round trip instead of top_k (the first version, one CTA per token looping over
// columns, took 10 us for T = 1 on an H200).
template <typename T>
__global__ void moe_sum_kernel(const T* __restrict__ y, const int* __restrict__ local, T* __restrict__ out, int H,
                               int top_k) {
  using V = Num<T>;
  constexpr int kChunk = 8;  // slots per round of loads
  const int t = blockIdx.x;
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
  if (c >= H) return;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int a0 = 0; a0 < top_k; a0 += kChunk) {
    int4 v[kChunk];
    bool here[kChunk];
#pragma unroll
    for (int a = 0; a < kChunk; ++a) {
      const int slot = t * top_k + a0 + a;
      here[a] = a0 + a < top_k && local[slot] >= 0;
      v[a] = a0 + a < top_k ? *reinterpret_cast<const int4*>(y + static_cast<size_t>(slot) * H + c) : int4{};
    }
#pragma unroll
    for (int a = 0; a < kChunk; ++a) {
      if (!here[a]) continue;
      const uint32_t u[4] = {static_cast<uint32_t>(v[a].x), static_cast<uint32_t>(v[a].y),
                             static_cast<uint32_t>(v[a].z), static_cast<uint32_t>(v[a].w)};
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[2 * i] += V::lo(u[i]), acc[2 * i + 1] += V::hi(u[i]);
    }
  }
  int4 o;
  uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
  for (int i = 0; i < 4; ++i) ow[i] = V::pack(acc[2 * i], acc[2 * i + 1]);
  *reinterpret_cast<int4*>(out + static_cast<size_t>(t) * H + c) = o;
}

// The instantiation table: dtype x M_BLOCKS {1, 2, 3, 4} x WN {1, 2, 4, 8} (BN = 64, 128, 256, 512), scales
// into B; plus FOLD (scales after each stage) at M_BLOCKS 1, WN {2, 4, 8}: its second accumulator set spills
// at larger tiles. Any other fold request runs the classic kernel.
template <typename T>
cudaError_t dispatch(int m_blocks, int wn, bool fold, const GemmLaunch& a) {
  if (m_blocks == 1 && fold) {
    if (wn == 2) return launch<T, 1, 2, true>(a);
    if (wn == 4) return launch<T, 1, 4, true>(a);
    if (wn == 8) return launch<T, 1, 8, true>(a);
  }
#define GLM_AWQ_GEMM_CASE(MB, W) \
  if (m_blocks == MB && wn == W) return launch<T, MB, W, false>(a);
  GLM_AWQ_GEMM_CASE(1, 1) GLM_AWQ_GEMM_CASE(2, 1) GLM_AWQ_GEMM_CASE(3, 1) GLM_AWQ_GEMM_CASE(4, 1)
  GLM_AWQ_GEMM_CASE(1, 2) GLM_AWQ_GEMM_CASE(2, 2) GLM_AWQ_GEMM_CASE(3, 2) GLM_AWQ_GEMM_CASE(4, 2)
  GLM_AWQ_GEMM_CASE(1, 4) GLM_AWQ_GEMM_CASE(2, 4) GLM_AWQ_GEMM_CASE(3, 4) GLM_AWQ_GEMM_CASE(4, 4)
  GLM_AWQ_GEMM_CASE(1, 8) GLM_AWQ_GEMM_CASE(2, 8) GLM_AWQ_GEMM_CASE(3, 8) GLM_AWQ_GEMM_CASE(4, 8)
#undef GLM_AWQ_GEMM_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

int launch_repack_int4(const at::Tensor& src, const at::Tensor& dst, int64_t n, int64_t k) {
  const int64_t total = dst.numel();
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  repack_int4_kernel<<<(total + threads - 1) / threads, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint32_t*>(src.data_ptr()), reinterpret_cast<uint32_t*>(dst.data_ptr()),
      static_cast<int>(n), static_cast<int>(k), total);
  return cudaGetLastError();
}

int launch_dequantize_cuda_layout(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& out,
                                  int64_t group_size) {
  const int64_t k = weight.size(0) * 16, n = weight.size(1) * 64;
  if (n == 0 || k == 0) return cudaSuccess;
  if (k / kBK > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(n / 64), static_cast<unsigned>(k / kBK));  // ops.cpp checks K % 128 == 0
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* wq = reinterpret_cast<const int4*>(weight.data_ptr());
  if (scale.scalar_type() == at::kBFloat16)
    dequantize_cuda_layout_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(
        wq, reinterpret_cast<const __nv_bfloat16*>(scale.data_ptr()),
        reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), static_cast<int>(n), static_cast<int>(k),
        static_cast<int>(group_size));
  else
    dequantize_cuda_layout_kernel<__half><<<grid, 256, 0, stream>>>(
        wq, reinterpret_cast<const __half*>(scale.data_ptr()), reinterpret_cast<__half*>(out.data_ptr()),
        static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size));
  return cudaGetLastError();
}

// Blocks of 64 and of 32 slots take wgmma where the device and build have it (variant 0 or 4; ops.cpp rejects 4
// elsewhere), and so do the experts of more than 8 slots under the split (blocks of 8, variant 6).
bool moe_gemm_uses_wgmma(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& scale, int block_m,
                         int variant) {
  const bool wgmma_tiles = (block_m == 64 || block_m == 32) && (variant == 0 || variant == kVariantWgmma);
  const bool split = block_m == 8 && variant == kVariantMoeSplit;
  return (wgmma_tiles || split) && moe_wgmma_supported(a, weight, scale);
}

// The MoE table: dtype x M_BLOCKS {1, 2, 3, 4} x {GEMM1 (gate/up + SiLU), GEMM2 (down x routing weight)}, BN 128,
// scales into B; plus FOLD at M_BLOCKS 1, BN 128, 256 and 512.
int launch_moe_gemm(const MoeLaunch& a) {
  const int64_t k = a.weight.size(1) * 16;
  if (a.variant == kVariantMoeSplit && a.block_m == 8 && moe_gemm_uses_wgmma(a.a, a.weight, a.scale, 8, a.variant)) {
    MoeLaunch part = a;  // one block of 8 is the skinny kernel's share of an expert
    part.max_count = a.block_m;
    const int err = launch_moe_skinny(part);
    if (err != cudaSuccess) return err;
    part.max_count = 0;
    part.min_count = a.block_m;
    return launch_moe_wgmma(part);
  }
  if (moe_gemm_uses_wgmma(a.a, a.weight, a.scale, a.block_m, a.variant)) return launch_moe_wgmma(a);
  // Blocks of 16 run skinny only on request (variant 3): with two token blocks it runs one CTA per SM and measured
  // slower than the tile kernel (H200, GLM-4.6 layer, T=256: 1528 vs 1053 us; benchmarks/NOTES.md).
  if (a.block_m == 8 || (a.block_m == 16 && a.variant == kVariantSkinny && moe_skinny_fits(k, 16, a.a.get_device())))
    return launch_moe_skinny(a);
  const bool bf16 = a.a.scalar_type() == at::kBFloat16;
  const int m_blocks = a.block_m / 16;
  // Blocks of 16 (7-16 slots per expert on average, T ~ 141-320 on GLM-4.6, where the wgmma kernel does not run):
  // FOLD on 512-wide tiles where the grid still fills the GPU twice over, counting the fewest blocks the slots can
  // make. H200, GLM-4.6 layer, routing excluded, T = 256: 916 us against 1012 for scales into B on 128-wide tiles
  // (whose 8 warps split each stage's K four ways and wait at every stage's barrier); FOLD on 128-wide tiles 1106,
  // scales into B on 512-wide tiles 950 (benchmarks/NOTES.md, fifteenth session). Under expert parallelism the slots
  // count every rank's share, so the rule may keep wide tiles on a smaller grid than it counts (not measured).
  if (m_blocks == 1 && (a.variant == 0 || a.variant == kVariantMoeFoldWide)) {
    const int64_t n = a.weight.size(2) * 64, min_blocks = (a.weights.numel() + 15) / 16;
    const bool forced = a.variant == kVariantMoeFoldWide;
    int wn = 8;  // N % 128 == 0 (ops.cpp), so 2 always divides it
    while (wn > 2 && (n % (64 * wn) || (!forced && min_blocks * (n / (64 * wn)) < 2 * sm_count(a.a.get_device()))))
      wn /= 2;
#define GLM_AWQ_MOE_WIDE_CASE(W)                                                                        \
  if (wn == W) {                                                                                        \
    if (bf16)                                                                                           \
      return a.mode == kGateUp ? launch_moe<__nv_bfloat16, 1, kGateUp, true, W>(a)                      \
                               : launch_moe<__nv_bfloat16, 1, kDown, true, W>(a);                       \
    return a.mode == kGateUp ? launch_moe<__half, 1, kGateUp, true, W>(a)                               \
                             : launch_moe<__half, 1, kDown, true, W>(a);                                \
  }
    GLM_AWQ_MOE_WIDE_CASE(8) GLM_AWQ_MOE_WIDE_CASE(4)
#undef GLM_AWQ_MOE_WIDE_CASE
  }
  // FOLD on 128-wide tiles: on request (variant 2), and variant 5 where N allows no wider tile.
  if (m_blocks == 1 && (a.variant == kVariantFold || a.variant == kVariantMoeFoldWide)) {
    if (bf16)
      return a.mode == kGateUp ? launch_moe<__nv_bfloat16, 1, kGateUp, true>(a)
                               : launch_moe<__nv_bfloat16, 1, kDown, true>(a);
    return a.mode == kGateUp ? launch_moe<__half, 1, kGateUp, true>(a) : launch_moe<__half, 1, kDown, true>(a);
  }
#define GLM_AWQ_MOE_CASE(MB)                                                                              \
  if (m_blocks == MB) {                                                                                 \
    if (bf16) return a.mode == kGateUp ? launch_moe<__nv_bfloat16, MB, kGateUp, false>(a)                 \
                                       : launch_moe<__nv_bfloat16, MB, kDown, false>(a);                  \
    return a.mode == kGateUp ? launch_moe<__half, MB, kGateUp, false>(a) : launch_moe<__half, MB, kDown, false>(a); \
  }
  GLM_AWQ_MOE_CASE(1) GLM_AWQ_MOE_CASE(2) GLM_AWQ_MOE_CASE(3) GLM_AWQ_MOE_CASE(4)
#undef GLM_AWQ_MOE_CASE
  return cudaErrorInvalidValue;
}

int launch_moe_sum(const at::Tensor& y, const at::Tensor& local, const at::Tensor& out, int top_k) {
  const int tokens = static_cast<int>(out.size(0)), h = static_cast<int>(out.size(1));
  if (tokens == 0) return cudaSuccess;
  constexpr int threads = 128;  // x 8 columns each
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>((h + threads * 8 - 1) / (threads * 8)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (y.scalar_type() == at::kBFloat16)
    moe_sum_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(y.data_ptr()), local.data_ptr<int>(),
        reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), h, top_k);
  else
    moe_sum_kernel<__half><<<grid, threads, 0, stream>>>(reinterpret_cast<const __half*>(y.data_ptr()),
                                                        local.data_ptr<int>(), reinterpret_cast<__half*>(out.data_ptr()),
                                                        h, top_k);
  return cudaGetLastError();
}

constexpr int kMinNTiles = 24;

int launch_w4a16_gemm(const GemmLaunch& a, int block_n) {
  if (a.variant == kVariantSkinny || (a.variant == 0 && skinny_preferred(a, block_n))) return launch_w4a16_skinny(a, block_n);
  int wn = block_n / 64;
  const int m_blocks = std::min(4, (a.m + 15) / 16);
  // BN = 256 measured best (or tied) at M <= 16 on q_proj and o_proj (H200). From two token blocks up, the widest
  // tile that still gives kMinNTiles tiles along N (kv_proj 64, expert gate_up 128, expert down 128 at M = 32..64;
  // H100 sweep, benchmarks/NOTES.md).
  if (wn == 0) {
    wn = a.n % 256 == 0 ? 4 : a.n % 128 == 0 ? 2 : 1;
    if (m_blocks >= 2)
      while (wn > 1 && a.n / (64 * wn) < kMinNTiles) wn /= 2;
  }
  // FOLD at M <= 16 with block_n = 512 by default (4-13% faster than scales-into-B there, H200, NOTES.md).
  const bool fold = wn > 1 && (a.variant == kVariantFold || (a.variant == 0 && m_blocks == 1));
  if (a.x.scalar_type() == at::kBFloat16) return dispatch<__nv_bfloat16>(m_blocks, wn, fold, a);
  return dispatch<__half>(m_blocks, wn, fold, a);
}

}  // namespace glm_awq
