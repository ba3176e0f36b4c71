// Skinny W4A16 GEMM: few activation rows (dense M <= 16, or MoE blocks of <= 8 token-slots of one expert), where
// the job is streaming the int4 weights at HBM speed. Same math and weight layout as w4a16_gemm.cu (the "cuda
// layout", see its header), different data flow:
//
//  - Swap AB: the weights are the A operand of mma.sync m16n8k16 (16 output features x 16 k) and the few tokens
//    are the 8-wide B operand, so an 8-token block wastes nothing on padding rows of W. In the cuda layout lane
//    (g, t) holds, in int i of its 16-byte chunk, n8 blocks 2i and 2i+1 of column g at k rows 2t, 2t+1, 2t+8,
//    2t+9: that is exactly its A fragment of the 16-feature tile i (rows g and g+8). Dequant gives the nibble
//    pairs (0,4) (1,5) (2,6) (3,7) = a0a1 (row g, k 2t), a4a5 (row g, k 2t+8), a2a3 (row g+8, k 2t),
//    a6a7 (row g+8, k 2t+8), so A = {w0, w2, w1, w3}.
//  - Weights go global -> registers (16-byte streaming loads, no shared memory, no ldmatrix): each warp keeps the
//    next 128-deep batch (8 loads per lane, 4 KB per warp) in flight while it dequantizes and multiplies this one.
//  - x for the CTA's K range is staged once in shared memory by cp.async, every copy in flight at once (rows padded
//    by 16 bytes, so an ldmatrix phase hits eight bank groups); B fragments come from ldmatrix.x4 (two k16 steps
//    each).
//  - Scales are applied per 128-deep batch in fp32: the mmas see the exact codes q - 8 (the dequant's lop3 and one
//    subtract or fma per nibble pair, no scale), so tmp = sum (q - 8) x for the batch, every product exact, and
//    acc += s * tmp. No rounding of w * s to bf16, and nothing in the sums but the products themselves. (The first
//    version fed the raw codes 136 + q or 1032 + q and took off * sum(x) away per batch: one instruction per pair less,
//    but its fp32 sums then carried 136 or 1032 times every activation, and an activation outlier on a zero weight
//    cost 2e-2 to 6e-2 of the output; tests/test_cuda_kernels.py, outliers on zero weights.)
//
// Work split: a CTA is 8 warps = WN along N (64 features each, BN = 64 WN) x WK = 8 / WN along K; the CTA covers
// a range of K batches (split-K over gridDim.z for the dense GEMM) and its WK warps take every WK-th batch. The
// WK partial tiles are summed in shared memory in warp order; split-K partials go to an fp32 workspace and the
// CTA that takes a tile's last ticket sums them in split order. Every sum has a fixed order: the output bits do not
// depend on scheduling.
//
// Programmatic dependent launch (sm_90+, the dense GEMM and the per-token MoE GEMMs; the sorted MoE GEMMs gained
// nothing, see launch_skinny): every CTA lets the next kernel of the stream launch as soon as the whole grid runs, and
// the dense GEMM is launched so that it may start before the previous kernel ends (the per-token ones wait at once).
// Its CTAs then get resident and set up during the previous kernel's tail, and wait (`griddepcontrol.wait`: the previous grid has finished and its writes are visible) before their first
// load, except the first weight batch (not the scales) of a settled weight (the caller's promise that no work still
// queued or running writes it: w4a16_gemm's weight_settled; prepare_linear synchronizes after writing its weights),
// which is loaded before the wait. Writes are promised visible only after a wait, and every kernel of a PDL chain may
// start before its predecessor's writes are flushed, so a weight written by any unfinished kernel cannot be read early.
// Mode 2 (set_skinny_pdl, benchmarks) loads the first batch before the wait whether the weight is settled or not.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>

#include "ops.h"
#include "w4a16_common.h"

namespace glm_awq {
namespace {

constexpr int kSkinnyWarps = 8;
constexpr int kSkinnyThreads = 32 * kSkinnyWarps;
constexpr int kXPad = 8;  // elements of padding per staged x row (16 bytes: consecutive rows in other banks)
constexpr int kSkinnySmemMax = 200 * 1024;  // dynamic shared memory the launcher allows (x rows + reduction)

// scale * silu(gate) * up; a zero scale (a slot whose expert is held elsewhere) gives exactly 0.
__device__ __forceinline__ float swiglu(float gate, float up, float scale) {
  return scale == 0.f ? 0.f : scale * (gate / (1.f + __expf(-gate)) * up);
}

// Weight chunks are read exactly once per call: stream them (evict-first in L1 and L2).
__device__ __forceinline__ int4 load_stream(const int4* p) { return __ldcs(p); }

// Programmatic dependent launch, device side (no-ops before sm_90, where the launcher does not ask for it).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// set_skinny_pdl: 0 off, 1 on (the dense GEMM waits before its first load, but for a settled weight's first batch),
// 2 on with the first weight batch loaded before the wait, settled or not.
std::atomic<int> g_pdl{1};

template <int MB>
struct Skinny {
  static constexpr int BM = 8 * MB;                               // token rows per CTA
  static constexpr int RED = kSkinnyWarps * MB * 16 * 32 * 4;     // bytes of the cross-warp K reduction
  static constexpr int MIN_BLOCKS = MB == 1 ? 2 : 1;              // __launch_bounds__: 128 / 255 registers
  static constexpr int KC_MAX = MB == 1 ? 5120 : 2560;            // K per CTA: x rows stay <= 80 KB of smem
  // x rows [BM][kc + pad], then the reduction.
  static int smem(int kc) { return BM * (kc + kXPad) * 2 + RED; }
};

template <typename T,  // activation, scale, bias and output dtype: __half or __nv_bfloat16
          int MB,      // 8-token blocks per CTA (B operands): BM = 8 MB rows (1 or 2)
          int WN,      // warps along N, 64 features each (1, 2 or 4); the other 8 / WN warps split K
          int MODE>    // kDense, kGateUp, kDown, kTokenGateUp or kTokenDown (w4a16_common.h)
__global__ void __launch_bounds__(kSkinnyThreads, Skinny<MB>::MIN_BLOCKS) w4a16_skinny_kernel(
    const T* __restrict__ x,       // [M, K] row-major (MoE: x [T, H] or h [S, I]), 16-byte aligned rows
    const int4* __restrict__ wq,   // [K/16, N/64, 32] int4 chunks: the cuda layout
    const T* __restrict__ wsc,     // [G, N] repacked scales
    const T* __restrict__ bias,    // [N] or nullptr
    T* __restrict__ out,           // [M, N] (MoE: see Mode)
    float* __restrict__ partial,   // [splits, M, N] fp32 when gridDim.z > 1
    int* __restrict__ tickets,     // [gridDim.x * gridDim.y] zeros, left zero
    int M, int N, int K, int group_size, int batches_per_split, MoeArgs moe,
    int flags) {  // bit 0 (dense): the first weight batch before griddepcontrol.wait
  using V = Num<T>;
  constexpr int WK = kSkinnyWarps / WN, BM = Skinny<MB>::BM, BN = 64 * WN;
  constexpr bool kSorted = MODE == kGateUp || MODE == kDown, kToken = MODE == kTokenGateUp || MODE == kTokenDown;
  extern __shared__ int4 smem[];
  __shared__ int s_slot[kSorted ? BM : 1];
  __shared__ int s_expert[kToken ? kMaxTopK : 1];  // per-token modes: the token's local expert per slot (< 0: none)
  __shared__ int s_info[2];
  __shared__ int last_cta;

  const int mt = blockIdx.x, nt = blockIdx.y, split = blockIdx.z;
  const int m0 = kToken ? mt : mt * BM;  // per-token modes: one row, token mt
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int g = lane >> 2, t = lane & 3;
  // The weight's 64-feature blocks per k16 step, and this warp's block in it. kTokenGateUp: the output features run
  // over the token's slots, 2I each, and a CTA's tile lies in one slot (the launcher keeps 2I a multiple of BN).
  const int w_n = MODE == kTokenGateUp ? 2 * moe.inter : N;
  const int tile_slot = MODE == kTokenGateUp ? nt * BN / w_n : 0;
  const int n64 = w_n / 64, nb = nt * WN + wn - tile_slot * n64;
  const int b0 = split * batches_per_split;   // first 128-deep K batch of the CTA
  const int nbatch = min(K / kBK, b0 + batches_per_split) - b0;
  const int xstride = batches_per_split * kBK + kXPad;
  T* xs = reinterpret_cast<T*>(smem);  // [BM][xstride]
  float* red = reinterpret_cast<float*>(xs + BM * xstride);

  pdl_launch_dependents();  // sorted MoE grids too: harmless, since they are never launched to start early
  int rows_here = kToken ? 1 : min(BM, M - m0);
  if constexpr (kToken) {
    pdl_wait();  // the routing's ids and weights, and (kTokenDown) GEMM1's h: before every load
    if (tid < moe.top_k) {
      int e = moe.ids[mt * moe.top_k + tid];
      if (e >= 0 && moe.expert_map) e = moe.expert_map[e];
      s_expert[tid] = e;
    }
    __syncthreads();
    if constexpr (MODE == kTokenGateUp) {  // an expert held elsewhere reads expert 0 and writes zeros (epilogue)
      wq += max(s_expert[tile_slot], 0) * moe.w_stride;
      wsc += max(s_expert[tile_slot], 0) * moe.s_stride;
    }
  }
  if constexpr (kSorted) {
    pdl_wait();  // a no-op today (MoE launches never ask for PDL); it guards the lookup if they ever do
    if (warp == 0) find_expert_block<BM>(moe, m0, lane, s_slot, s_info);
    __syncthreads();
    if (s_info[0] < 0) return;  // the whole CTA: no barrier follows for anyone
    rows_here = s_info[1];
    wq += s_info[0] * moe.w_stride;
    wsc += s_info[0] * moe.s_stride;
  }

  // One k16 step of the weight is `kstep` chunks. This lane's chunks of the weight's batch lb start at
  // wbase + lb * 8 * kstep; the scales of my column g in the eight n8 blocks (features 8 b + g, b = 0..7), one
  // 16-byte chunk, at row lb * 128 / group_size of sbase.
  const size_t kstep = static_cast<size_t>(n64) * 32;
  const int4* wbase = wq + static_cast<size_t>(nb) * 32 + lane;
  const T* sbase = wsc + static_cast<size_t>(nb) * 64 + g * 8;
  struct Batch {
    const int4* w;
    const T* s;
  };
  auto batch_at = [&](int j) -> Batch {  // batch j of the CTA's range
    int lb = b0 + j;
    const int4* w = wbase;
    const T* sc = sbase;
    if constexpr (MODE == kTokenDown) {  // batch lb of h's row is batch lb % (I / 128) of its slot's expert (a slot
      const int per_slot = moe.inter / kBK, slot = lb / per_slot;  // held elsewhere has h = 0 and reads expert 0)
      const int e = max(s_expert[slot], 0);
      w += e * moe.w_stride, sc += e * moe.s_stride, lb -= slot * per_slot;
    }
    return {w + static_cast<size_t>(lb) * 8 * kstep, sc + static_cast<size_t>(lb * kBK / group_size) * w_n};
  };
  auto load_weights = [&](int j, int4 (&w)[8]) {
    const int4* p = batch_at(j).w;
#pragma unroll
    for (int st = 0; st < 8; ++st) w[st] = load_stream(p + st * kstep);
  };
  auto load_scales = [&](int j, int4& s) { s = *reinterpret_cast<const int4*>(batch_at(j).s); };
  auto load_batch = [&](int j, int4 (&w)[8], int4& s) {
    load_weights(j, w);
    load_scales(j, s);
  };

  int4 wa[8], wb[8], sa, sb;  // two batches of weight chunks and scales: one computing, one in flight
  const bool weights_before_wait = flags & 1;
  if constexpr (MODE == kDense) {
    // A settled weight (or mode 2): the first weight batch before the wait (see the header); scales, which a dtype
    // cast may have just written (CudaBackend's _cast), after it.
    if (weights_before_wait && wk < nbatch) load_weights(wk, wa);
    pdl_wait();  // x, scales, out, partials and tickets: after the previous kernel
    if (wk < nbatch) {  // in flight while x is staged
      if (!weights_before_wait) load_weights(wk, wa);
      load_scales(wk, sa);
    }
  } else if (wk < nbatch) {
    load_batch(wk, wa, sa);
  }

  // Stage the CTA's x rows (zeros past the real rows) for its K range: every copy of the thread in flight at once
  // (cp.async; a row past the real ones is zero-filled without a read), then one wait.
  {
    const int chunks = nbatch * kBK / 8;  // 16-byte chunks per row
    for (int c = tid; c < BM * chunks; c += kSkinnyThreads) {
      const int r = c / chunks, cc = c % chunks;
      const bool real = r < rows_here;
      int row = m0 + r;
      if constexpr (MODE == kGateUp) row = s_slot[r] / moe.top_k;
      if constexpr (MODE == kDown) row = s_slot[r];
      const T* src = x + static_cast<size_t>(real ? row : 0) * K + static_cast<size_t>(b0) * kBK + cc * 8;
      cp_async16(xs + r * xstride + cc * 8, src, real);
    }
    cp_async_commit();
    cp_async_wait<0>();
  }
  __syncthreads();

  float acc[MB][4][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mb][i][e] = 0.f;

  // ldmatrix.x4 addresses: lanes 8q..8q+7 give rows 0..7 of the 8x8 matrix q = k columns 8q..8q+7 of two steps.
  const T* xrow = xs + (lane & 7) * xstride + 8 * (lane >> 3);
  // One 128-deep batch j (CTA-local) from its weight chunks w and scale chunk sc into acc.
  auto compute = [&](const int4 (&w)[8], const int4& sc, int j) {
    float tmp[MB][4][4];
    uint32_t bx[MB][4];  // b0, b1 of steps st and st + 1, loaded at even st
#pragma unroll
    for (int st = 0; st < 8; ++st) {
      if (st % 2 == 0) {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) ldmatrix_x4(bx[mb], xrow + mb * 8 * xstride + j * kBK + st * 16);
      }
      const uint32_t q[4] = {static_cast<uint32_t>(w[st].x), static_cast<uint32_t>(w[st].y),
                             static_cast<uint32_t>(w[st].z), static_cast<uint32_t>(w[st].w)};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // q - 8 of nibble pairs (0,4) (1,5) (2,6) (3,7) = a0a1, a4a5, a2a3, a6a7 (see the header).
        uint32_t c[4];
        V::dequant(q[i], c);
        const uint32_t a[4] = {c[0], c[2], c[1], c[3]};
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          const uint32_t bb0 = bx[mb][2 * (st % 2)], bb1 = bx[mb][2 * (st % 2) + 1];
          if (st == 0)
            V::mma0(tmp[mb][i], a, bb0, bb1);
          else
            V::mma(tmp[mb][i], a, bb0, bb1);
        }
      }
    }
    // C fragment of tile i: rows (features) g and g + 8 in (c0, c1) and (c2, c3), token columns 2t and 2t + 1;
    // the row scales are n8 blocks 2i and 2i + 1 of my column: the low and high halves of int i of the chunk.
    const uint32_t sw[4] = {static_cast<uint32_t>(sc.x), static_cast<uint32_t>(sc.y), static_cast<uint32_t>(sc.z),
                            static_cast<uint32_t>(sc.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float s_lo = V::lo(sw[i]), s_hi = V::hi(sw[i]);
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        acc[mb][i][0] = fmaf(s_lo, tmp[mb][i][0], acc[mb][i][0]);
        acc[mb][i][1] = fmaf(s_lo, tmp[mb][i][1], acc[mb][i][1]);
        acc[mb][i][2] = fmaf(s_hi, tmp[mb][i][2], acc[mb][i][2]);
        acc[mb][i][3] = fmaf(s_hi, tmp[mb][i][3], acc[mb][i][3]);
      }
    }
  };
  // Unrolled by two so the in-flight batch is never copied between register sets.
  for (int j = wk; j < nbatch; j += 2 * WK) {
    if (j + WK < nbatch) load_batch(j + WK, wb, sb);
    compute(wa, sa, j);
    if (j + WK >= nbatch) break;
    if (j + 2 * WK < nbatch) load_batch(j + 2 * WK, wa, sa);
    compute(wb, sb, j + WK);
  }

  // Sum the WK warps of each N slice in warp order (the region after the x rows, so no barrier before it).
  if constexpr (WK > 1) {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[((warp * MB + mb) * 16 + i * 4 + e) * 32 + lane] = acc[mb][i][e];
    __syncthreads();
    if (wk == 0) {
      for (int w = 1; w < WK; ++w) {
        const int src = w * WN + wn;
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mb][i][e] += red[((src * MB + mb) * 16 + i * 4 + e) * 32 + lane];
      }
    }
  }

  // Element (mb, i, e) of the C fragments: token row mb * 8 + 2t + (e & 1), feature 16 i + g + 8 (e >> 1) of the
  // warp's 64-feature block.
  if constexpr (MODE == kTokenGateUp) {
    // Row 0 (the token) is e = 0, 2 of the t = 0 lanes; the 64-feature blocks are 32 gate then 32 up, as kGateUp's.
    const int slot = mt * moe.top_k + tile_slot;
    const float rw = s_expert[tile_slot] >= 0 ? moe.weights[slot] : 0.f;
    T* h = out + static_cast<size_t>(slot) * moe.inter;
    if (gridDim.z == 1) {
      if (wk == 0 && t == 0) {
#pragma unroll
        for (int e = 0; e < 4; e += 2)
#pragma unroll
          for (int i = 0; i < 2; ++i)
            h[nb * 32 + 16 * i + g + 8 * (e >> 1)] = V::from_float(swiglu(acc[0][i][e], acc[0][i + 2][e], rw));
      }
      return;
    }
    if (wk == 0 && t == 0) {
      float* part = partial + (static_cast<size_t>(split) * M + mt) * N;
#pragma unroll
      for (int e = 0; e < 4; e += 2)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[(nt * WN + wn) * 64 + 16 * i + g + 8 * (e >> 1)] = acc[0][i][e];
    }
    if (!took_last_ticket(&tickets[mt * gridDim.y + nt], &last_cta)) return;
    // The tile's BN / 2 outputs, one per thread: gate feature c of block b and its up feature c + 32, split order.
    const size_t plane = static_cast<size_t>(M) * N;
    for (int o = tid; o < BN / 2; o += kSkinnyThreads) {
      const int b = o / 32, c = o % 32;
      const float* p = partial + static_cast<size_t>(mt) * N + nt * BN + b * 64 + c;
      float gate = 0.f, up = 0.f;
      for (int sp = 0; sp < static_cast<int>(gridDim.z); ++sp)
        gate += __ldcg(p + sp * plane), up += __ldcg(p + sp * plane + 32);
      h[(nt * WN + b - tile_slot * n64) * 32 + c] = V::from_float(swiglu(gate, up, rw));
    }
    if (tid == 0) tickets[mt * gridDim.y + nt] = 0;
    return;
  }
  if constexpr (MODE == kGateUp) {
    // 64-feature blocks are 32 gate then the matching 32 up features: tiles 0, 1 are gate, tiles 2, 3 their up.
    if (wk == 0) {
      const int half_n = N / 2;  // I
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = mb * 8 + 2 * t + (e & 1);
          if (r >= rows_here) continue;
          const size_t row = static_cast<size_t>(s_slot[r]) * half_n + nb * 32 + g + 8 * (e >> 1);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const float gate = acc[mb][i][e], up = acc[mb][i + 2][e];
            out[row + 16 * i] = V::from_float(swiglu(gate, up, 1.f));
          }
        }
    }
    return;
  }
  if constexpr (MODE == kDown) {
    if (wk == 0) {
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = mb * 8 + 2 * t + (e & 1);
          if (r >= rows_here) continue;
          const int slot = s_slot[r];
          const float rw = moe.weights[slot];
          const size_t row = static_cast<size_t>(slot) * N + nb * 64 + g + 8 * (e >> 1);
#pragma unroll
          for (int i = 0; i < 4; ++i) out[row + 16 * i] = V::from_float(acc[mb][i][e] * rw);
        }
    }
    return;
  }
  if (gridDim.z == 1) {
    if (wk == 0) {
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = mb * 8 + 2 * t + (e & 1);
          if (r >= rows_here) continue;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int col = nb * 64 + 16 * i + g + 8 * (e >> 1);
            out[static_cast<size_t>(m0 + r) * N + col] = V::from_float(acc[mb][i][e] + (bias ? V::to_float(bias[col]) : 0.f));
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
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = mb * 8 + 2 * t + (e & 1);
        if (r >= rows_here) continue;
#pragma unroll
        for (int i = 0; i < 4; ++i) part[static_cast<size_t>(m0 + r) * N + nb * 64 + 16 * i + g + 8 * (e >> 1)] = acc[mb][i][e];
      }
  }
  finish_split_k<T, kSkinnyThreads>(partial, bias, out, &tickets[mt * gridDim.y + nt], &last_cta, M, N, m0, rows_here,
                                    nt * BN, BN);
}

// ------------------------------------------------------------------------------------------------ launch

// Dynamic shared memory one block may opt into on `device` (227 KB on sm_90 / sm_100, 163 KB on sm_80 / sm_87,
// 99 KB on sm_86 / sm_89 / sm_120).
int smem_optin(int device) { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device); }

// Whether `device` takes programmatic dependent launches (sm_90+).
bool pdl_device(int device) { return device_attribute<cudaDevAttrComputeCapabilityMajor>(device) >= 9; }

template <typename T, int MB, int WN, int MODE>
cudaError_t launch_skinny(dim3 grid, int smem_bytes, const T* x, const int4* wq, const T* wsc, const T* bias,
                          T* out, float* partial, int* tickets, int m, int n, int k, int group_size,
                          int batches_per_split, const MoeArgs& moe, bool weight_settled = false) {
  auto kernel = w4a16_skinny_kernel<T, MB, WN, MODE>;
  static uint64_t configured = 0;  // devices whose shared-memory attribute is set
  cudaError_t err = allow_dynamic_smem(kernel, kSkinnySmemMax, configured);
  if (err != cudaSuccess) return err;
  int device = 0;
  err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kSkinnyThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  cfg.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  // Not the sorted MoE GEMMs: they need the previous kernel's output before their first load, and measured 2-3%
  // slower with it at T = 16 and 64 (H200, benchmarks/NOTES.md). The per-token ones wait before their first load.
  const int pdl = g_pdl.load(std::memory_order_relaxed);
  cfg.numAttrs = (MODE == kDense || MODE == kTokenGateUp || MODE == kTokenDown) && pdl && pdl_device(device) ? 1 : 0;
  const int flags = pdl == 2 || (pdl == 1 && weight_settled) ? 1 : 0;  // kernel argument `flags`
  err = cudaLaunchKernelEx(&cfg, kernel, x, wq, wsc, bias, out, partial, tickets, m, n, k, group_size,
                           batches_per_split, moe, flags);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// At most this many splits when both the tile width and the split are auto (M <= 8): each split adds a partial tile
// to the last CTA's sum, read after its ticket (skinny_default_wn).
constexpr int kMaxAutoSplits = 12;

// The split count: `requested` (0: auto, one wave of equal work: MIN_BLOCKS CTAs per SM over every SM, at most
// `cap` if > 0), then at least K / KC_MAX (the x rows must fit in shared memory), at most the batches, no empty split.
template <int MB>
int skinny_splits(int n_tiles, int batches, int device, int64_t requested, int cap) {
  int s = static_cast<int>(std::min<int64_t>(requested, batches));
  if (s <= 0) {
    s = std::max(1, Skinny<MB>::MIN_BLOCKS * sm_count(device) / n_tiles);
    if (cap > 0) s = std::min(s, cap);
  }
  s = std::max(s, (batches * kBK + Skinny<MB>::KC_MAX - 1) / Skinny<MB>::KC_MAX);
  s = std::min(s, batches);
  const int per_split = (batches + s - 1) / s;
  return (batches + per_split - 1) / per_split;
}

template <typename T, int MB>
cudaError_t dense_skinny(const GemmLaunch& a, int wn, bool auto_wn) {
  using S = Skinny<MB>;
  const int n_tiles = a.n / (64 * wn), batches = a.k / kBK;
  int s = skinny_splits<MB>(n_tiles, batches, a.x.get_device(), a.splits, auto_wn && MB == 1 ? kMaxAutoSplits : 0);
  if (n_tiles > a.tickets.numel()) s = 1;  // too few tickets (direct op callers): K must then fit one CTA
  const int per_split = (batches + s - 1) / s;
  const int smem = S::smem(per_split * kBK);
  if (per_split * kBK > S::KC_MAX || smem > kSkinnySmemMax) return cudaErrorInvalidConfiguration;
  at::Tensor partial;
  if (s > 1) partial = at::empty({s, a.m, a.n}, a.x.options().dtype(at::kFloat));
  const dim3 grid(1, static_cast<unsigned>(n_tiles), static_cast<unsigned>(s));
  const T* x = reinterpret_cast<const T*>(a.x.data_ptr());
  const auto* wq = reinterpret_cast<const int4*>(a.weight.data_ptr());
  const T* wsc = reinterpret_cast<const T*>(a.scale.data_ptr());
  const T* bias = a.bias ? reinterpret_cast<const T*>(a.bias->data_ptr()) : nullptr;
  T* out = reinterpret_cast<T*>(a.out.data_ptr());
  float* part = s > 1 ? partial.data_ptr<float>() : nullptr;
  int* tickets = a.tickets.data_ptr<int>();
#define GLM_AWQ_SKINNY_CASE(W)                                                                                   \
  if (wn == W)                                                                                                   \
    return launch_skinny<T, MB, W, kDense>(grid, smem, x, wq, wsc, bias, out, part, tickets, a.m, a.n, a.k,      \
                                           a.group_size, per_split, MoeArgs{}, a.weight_settled);
  GLM_AWQ_SKINNY_CASE(1) GLM_AWQ_SKINNY_CASE(2) GLM_AWQ_SKINNY_CASE(4)
#undef GLM_AWQ_SKINNY_CASE
  return cudaErrorInvalidValue;
}

template <typename T, int MODE, int MB>
cudaError_t moe_skinny(const MoeLaunch& a) {
  using S = Skinny<MB>;
  const int num_experts = static_cast<int>(a.weight.size(0));
  const int k = static_cast<int>(a.weight.size(1) * 16), n = static_cast<int>(a.weight.size(2) * 64);
  const int64_t max_blocks = a.sorted.numel() / S::BM;
  if (max_blocks == 0) return cudaSuccess;
  const int smem = S::smem(k);
  if (smem > kSkinnySmemMax) return cudaErrorInvalidConfiguration;  // the launcher checks moe_skinny_fits first
  MoeArgs moe{a.sorted.data_ptr<int>(), a.counts.data_ptr<int>(), a.weights.data_ptr<float>(), num_experts,
              a.top_k, a.weight.size(1) * a.weight.size(2) * 32, a.scale.size(1) * a.scale.size(2)};
  moe.max_count = a.max_count;
  // GEMM2 (N = H) takes 256-wide tiles: fewer, longer-running CTAs at T = 1 (8 experts x 20 instead of 40).
  const int wn = MODE == kDown && n % 256 == 0 ? 4 : 2;
  const dim3 grid(static_cast<unsigned>(max_blocks), static_cast<unsigned>(n / (64 * wn)), 1);
  const T* x = reinterpret_cast<const T*>(a.a.data_ptr());
  const auto* wq = reinterpret_cast<const int4*>(a.weight.data_ptr());
  const T* wsc = reinterpret_cast<const T*>(a.scale.data_ptr());
  T* out = reinterpret_cast<T*>(a.out.data_ptr());
  if (wn == 4)
    return launch_skinny<T, MB, 4, MODE>(grid, smem, x, wq, wsc, nullptr, out, nullptr, nullptr, 0, n, k,
                                         a.group_size, k / kBK, moe);
  return launch_skinny<T, MB, 2, MODE>(grid, smem, x, wq, wsc, nullptr, out, nullptr, nullptr, 0, n, k, a.group_size,
                                       k / kBK, moe);
}

// Default tile width, in 64-feature warps. M <= 8: the widest of 256, 128 and 64 whose auto split is 1, or at most
// kMaxAutoSplits with twice as many batches as splits, and whose tiles have a ticket each if they split; else 64
// (its split then capped at kMaxAutoSplits) if its tickets suffice, else the widest. The auto split grows with the SM
// count; on the H200's 132 SMs, at M = 1 / 4 / 8 (benchmarks/NOTES.md, ninth session; second session for q/o_proj):
//   q_proj, o_proj: 256 (5 and 12 splits; M = 1: q_proj 14.7 us vs 17.0 at 128, o_proj 15.3 vs 15.7);
//   shared expert gate_up 3072 x 5120: 128 (10 splits) 7.3 / 7.6 / 7.9 us, against 7.3 / 7.8 / 9.2 at 256 (20);
//   expert down 5120 x 1536: 128 (6) 5.5 / 5.8 / 5.9, against 5.7 / 6.1 / 7.5 at 256 (12, one batch each);
//   kv_proj 1024 x 5120: 64 (10) 5.5 / 5.7 / 5.9, against 6.2 / 6.9 / 9.5 at 256 (40).
// Two token blocks: 128 (twice the accumulators: one CTA per SM).
int skinny_default_wn(int m, int n, int k, int64_t tickets, int device) {
  if (m > 8) return n % 128 == 0 ? 2 : 1;
  const int batches = k / kBK;
  // Split-K takes a ticket per tile (direct op callers may pass fewer than N / 64).
  auto has_tickets = [&](int w, int s) { return s == 1 || n / (64 * w) <= tickets; };
  for (int w = 4; w > 1; w /= 2) {
    if (n % (64 * w)) continue;
    const int s = skinny_splits<1>(n / (64 * w), batches, device, 0, 0);
    if ((s == 1 || (s <= kMaxAutoSplits && batches >= 2 * s)) && has_tickets(w, s)) return w;
  }
  if (has_tickets(1, skinny_splits<1>(n / 64, batches, device, 0, kMaxAutoSplits))) return 1;
  return n % 256 == 0 ? 4 : n % 128 == 0 ? 2 : 1;  // the fewest tiles
}

// One per-token MoE GEMM (kTokenGateUp or kTokenDown) over t tokens: n output features and k deep per token (the
// virtual shapes: GEMM1 n = top_k 2I, k = H; GEMM2 n = H, k = top_k I), a grid of (t, n tiles, splits) like the
// dense GEMM's at M = 1; wn = 0 and splits = 0 take the dense rules on a [1, k] x [k, t n] GEMM.
template <typename T, int MODE>
cudaError_t token_skinny(const T* x, const at::Tensor& weight, const at::Tensor& scale, T* out,
                         const at::Tensor& tickets, int t, int n, int k, int wn, int64_t splits, int group_size, const MoeArgs& moe) {
  using S = Skinny<1>;
  const int device = weight.get_device();
  const int64_t tickets_per_token = tickets.numel() / t;
  const bool auto_wn = wn == 0;
  if (auto_wn) wn = skinny_default_wn(1, n * t, k, tickets_per_token * t, device);
  while (auto_wn && wn > 1 && n % (64 * wn)) wn /= 2;  // the rule saw n * t: a token's n must be whole tiles
  if (n % (64 * wn)) return cudaErrorInvalidValue;    // ops.cpp checks explicit widths
  const int n_tiles = n / (64 * wn), batches = k / kBK;
  int s = skinny_splits<1>(n_tiles * t, batches, device, splits, auto_wn ? kMaxAutoSplits : 0);
  const int per_split = (batches + s - 1) / s;
  const int smem = S::smem(per_split * kBK);
  if (n_tiles > tickets_per_token || per_split * kBK > S::KC_MAX || smem > kSkinnySmemMax)
    return cudaErrorInvalidConfiguration;  // ops.cpp passes enough tickets for the narrowest tiles
  at::Tensor partial;
  if (s > 1) partial = at::empty({s, t, n}, weight.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(t), static_cast<unsigned>(n_tiles), static_cast<unsigned>(s));
  const auto* wq = reinterpret_cast<const int4*>(weight.data_ptr());
  const T* wsc = reinterpret_cast<const T*>(scale.data_ptr());
  float* part = s > 1 ? partial.data_ptr<float>() : nullptr;
  int* tk = tickets.data_ptr<int>();
#define GLM_AWQ_TOKEN_CASE(W)                                                                                     \
  if (wn == W)                                                                                                    \
    return launch_skinny<T, 1, W, MODE>(grid, smem, x, wq, wsc, nullptr, out, part, tk, t, n, k, group_size,      \
                                        per_split, moe);
  GLM_AWQ_TOKEN_CASE(1) GLM_AWQ_TOKEN_CASE(2) GLM_AWQ_TOKEN_CASE(4)
#undef GLM_AWQ_TOKEN_CASE
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t moe_per_token(const TokenLaunch& a) {
  const int t = static_cast<int>(a.x.size(0)), hid = static_cast<int>(a.x.size(1));
  const int top_k = static_cast<int>(a.ids.size(1)), inter = static_cast<int>(a.h.size(1));
  MoeArgs moe{nullptr, nullptr, a.weights.data_ptr<float>(), static_cast<int>(a.w13.size(0)), top_k,
              a.w13.size(1) * a.w13.size(2) * 32, a.s13.size(1) * a.s13.size(2), a.ids.data_ptr<int>(),
              a.expert_map ? a.expert_map->data_ptr<int>() : nullptr, inter};
  T* h = reinterpret_cast<T*>(a.h.data_ptr());
  cudaError_t err = token_skinny<T, kTokenGateUp>(reinterpret_cast<const T*>(a.x.data_ptr()), a.w13, a.s13, h,
                                                  a.tickets, t, top_k * 2 * inter, hid, a.block_n1 / 64, a.splits1,
                                                  a.group_size, moe);
  if (err != cudaSuccess) return err;
  moe.w_stride = a.w2.size(1) * a.w2.size(2) * 32;
  moe.s_stride = a.s2.size(1) * a.s2.size(2);
  return token_skinny<T, kTokenDown>(h, a.w2, a.s2, reinterpret_cast<T*>(a.out.data_ptr()), a.tickets, t, hid,
                                     top_k * inter, a.block_n2 / 64, a.splits2, a.group_size, moe);
}

}  // namespace

bool skinny_supported(int device) { return smem_optin(device) >= kSkinnySmemMax; }

void set_skinny_pdl(int mode) { g_pdl.store(mode, std::memory_order_relaxed); }

bool skinny_preferred(const GemmLaunch& a, int block_n) {
  if (a.m > 16 || block_n > 256 || !skinny_supported(a.x.get_device())) return false;
  // K beyond one CTA's x rows needs split-K, and split-K a ticket per N tile (direct op callers may pass fewer).
  const int kc_max = a.m <= 8 ? Skinny<1>::KC_MAX : Skinny<2>::KC_MAX;
  const int wn = block_n ? block_n / 64 : skinny_default_wn(a.m, a.n, a.k, a.tickets.numel(), a.x.get_device());
  if (a.k > kc_max && a.n / (64 * wn) > a.tickets.numel()) return false;
  if (a.m <= 8) return true;
  // Two token blocks run one CTA per SM: take them only while the grid (auto split) is a single wave; q_proj and
  // o_proj at M = 16 would need two, where the tile kernel measured faster (H200, benchmarks/NOTES.md).
  const int64_t min_splits = (static_cast<int64_t>(a.k) + Skinny<2>::KC_MAX - 1) / Skinny<2>::KC_MAX;
  return a.n / (64 * wn) * min_splits <= sm_count(a.x.get_device());
}

bool moe_skinny_fits(int64_t k, int block_m, int device) {
  if (!skinny_supported(device)) return false;
  const int kk = static_cast<int>(std::min<int64_t>(k, 1 << 20));
  return (block_m == 8 ? Skinny<1>::smem(kk) : Skinny<2>::smem(kk)) <= kSkinnySmemMax;
}

int launch_w4a16_skinny(const GemmLaunch& a, int block_n) {
  if (a.m > 16) return cudaErrorInvalidValue;
  int wn = block_n / 64;
  const bool auto_wn = wn == 0;
  if (auto_wn) wn = skinny_default_wn(a.m, a.n, a.k, a.tickets.numel(), a.x.get_device());
  if (wn != 1 && wn != 2 && wn != 4) return cudaErrorInvalidValue;
  const bool bf16 = a.x.scalar_type() == at::kBFloat16;
  if (a.m <= 8) return bf16 ? dense_skinny<__nv_bfloat16, 1>(a, wn, auto_wn) : dense_skinny<__half, 1>(a, wn, auto_wn);
  return bf16 ? dense_skinny<__nv_bfloat16, 2>(a, wn, auto_wn) : dense_skinny<__half, 2>(a, wn, auto_wn);
}

int launch_moe_per_token(const TokenLaunch& a) {
  return a.x.scalar_type() == at::kBFloat16 ? moe_per_token<__nv_bfloat16>(a) : moe_per_token<__half>(a);
}

int launch_moe_skinny(const MoeLaunch& a) {
  const bool bf16 = a.a.scalar_type() == at::kBFloat16;
  if (a.block_m == 8) {
    if (a.mode == kGateUp) return bf16 ? moe_skinny<__nv_bfloat16, kGateUp, 1>(a) : moe_skinny<__half, kGateUp, 1>(a);
    return bf16 ? moe_skinny<__nv_bfloat16, kDown, 1>(a) : moe_skinny<__half, kDown, 1>(a);
  }
  if (a.mode == kGateUp) return bf16 ? moe_skinny<__nv_bfloat16, kGateUp, 2>(a) : moe_skinny<__half, kGateUp, 2>(a);
  return bf16 ? moe_skinny<__nv_bfloat16, kDown, 2>(a) : moe_skinny<__half, kDown, 2>(a);
}

}  // namespace glm_awq
