// Device code shared by the W4A16 kernels (w4a16_gemm.cu: the mma.sync tile GEMM; w4a16_skinny.cu: the
// small-M GEMM): PTX helpers, the dtype vocabulary with the magic-number dequant, the MoE row modes and the
// lookup of a sorted block's expert. Include from .cu files only (it is device code in an anonymous namespace).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace glm_awq {
namespace {

constexpr int kSmemPerSM = 227 * 1024;  // shared memory an sm_90 SM gives its CTAs (1 KB each is reserved)
constexpr int kBK = 128;                // K per pipeline stage / skinny batch (one scale row: group_size % kBK == 0)

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
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void mma0(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};\n"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
  }
  static __device__ __forceinline__ float lo(uint32_t w) { return __half2float(__ushort_as_half(w & 0xffffu)); }
  static __device__ __forceinline__ float hi(uint32_t w) { return __half2float(__ushort_as_half(w >> 16)); }
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
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void mma0(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};\n"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
  }
  static __device__ __forceinline__ float lo(uint32_t w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
};


// ------------------------------------------------------------------------------------------------ MoE rows

// What a CTA's rows are and what its epilogue writes.
enum Mode : int {
  kDense = 0,   // rows m0.. of x; out = acc + bias, split-K allowed
  kGateUp = 1,  // MoE GEMM1: rows are sorted token-slots of one expert, A row = x[slot / top_k]; the weight's
                // 64-row blocks hold 32 gate rows then the matching 32 up rows, so n8 blocks j and j + 4 of a
                // thread are gate and up of the same columns: out[slot, I-col] = silu(gate) * up
  kDown = 2,    // MoE GEMM2: A row = h[slot]; out[slot, col] = routing weight[slot] * acc
  // Per token, without the sort (a few tokens: each token's top_k experts are distinct, so nothing is shared):
  kTokenGateUp = 3,  // MoE GEMM1: CTA row = token mt; output features run over the token's slots (top_k x 2I, a tile
                     // within one slot); out h[mt * top_k + slot, I-col] = routing weight * silu(gate) * up
  kTokenDown = 4,    // MoE GEMM2: A = h viewed as [T, top_k * I], whose 128-deep batch b belongs to slot b / (I / 128)
                     // and reads that slot's expert; out [T, H] = acc, the slots summed through split-K
};

// The MoE side of the kernel's arguments (unused by kDense).
struct MoeArgs {
  const int* sorted;     // [max_blocks * BM] slots grouped by local expert, each run padded to BM (kernels/moe.py)
  const int* counts;     // [E] slots per local expert
  const float* weights;  // [S] routing weight per slot (kDown, kTokenGateUp)
  int num_experts, top_k;
  int64_t w_stride;      // int4 chunks per expert in wq
  int64_t s_stride;      // scale elements per expert in wsc
  // Per-token modes:
  const int* ids;         // [T, top_k] expert ids (global; negative: none)
  const int* expert_map;  // [E_global] global -> local expert, -1 held elsewhere; nullptr: ids are local
  int inter;              // I: GEMM1's N per slot is 2I, GEMM2's K per slot I
  // Sorted modes: experts with more slots than this are another kernel's (moe_gemm's split variant), their blocks
  // skipped; 0: none.
  int max_count = 0;
};

// Which local expert the BM-row block of sorted slots starting at m0 belongs to: a warp-wide scan of the counts,
// each run padded to BM (kernels/moe.py _sort). Call from one whole warp; it writes s_slot[0..BM) (the block's
// slot ids, 0 past its real rows) and s_info = {expert or -1 past the last run or for an expert of more than
// moe.max_count slots, real rows}. The caller syncs.
template <int BM>
__device__ __forceinline__ void find_expert_block(const MoeArgs& moe, int m0, int lane, int* s_slot, int* s_info) {
  int base = 0, found_e = -1, found_rows = 0;
  for (int e0 = 0; e0 < moe.num_experts; e0 += 32) {
    const int e = e0 + lane;
    const int c = e < moe.num_experts ? moe.counts[e] : 0;
    const int padded = (c + BM - 1) / BM * BM;
    int incl = padded;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    const int start = base + incl - padded;
    if (m0 >= start && m0 < start + padded) found_e = e, found_rows = min(BM, c - (m0 - start));
    base += __shfl_sync(0xffffffffu, incl, 31);
  }
  const unsigned who = __ballot_sync(0xffffffffu, found_e >= 0);
  const int src = who ? __ffs(who) - 1 : 0;
  const int e = __shfl_sync(0xffffffffu, found_e, src), rows = __shfl_sync(0xffffffffu, found_rows, src);
  for (int r = lane; r < BM; r += 32) s_slot[r] = (who && r < rows) ? moe.sorted[m0 + r] : 0;
  const bool mine = who && (moe.max_count <= 0 || moe.counts[e] <= moe.max_count);
  if (lane == 0) s_info[0] = mine ? e : -1, s_info[1] = rows;
}

// Split-K tickets, called by every thread of a CTA after it stored its partial tile: whether this CTA took the
// tile's last ticket (of gridDim.z), and so sums the splits (all of them then visible) and resets the ticket.
// last_cta: a __shared__ int.
__device__ __forceinline__ bool took_last_ticket(int* ticket, int* last_cta) {
  __threadfence();  // this CTA's partials reach L2 before its ticket says so
  __syncthreads();
  if (threadIdx.x == 0) *last_cta = atomicAdd(ticket, 1) == static_cast<int>(gridDim.z) - 1;
  __syncthreads();
  if (!*last_cta) return false;
  __threadfence();
  return true;
}

// Split-K epilogue, called by every thread of a CTA after it stored its fp32 partial tile to
// partial[split][M][N]: the CTA that takes the tile's last ticket sums the gridDim.z splits in split order (so the
// bits do not depend on scheduling), adds the bias, writes rows [m0, m0 + rows) x columns [n0, n0 + bn) of out in
// T and resets the ticket for the next call (and CUDA-graph replays). THREADS: the CTA's threads.
template <typename T, int THREADS>
__device__ __forceinline__ void finish_split_k(const float* __restrict__ partial, const T* __restrict__ bias,
                                               T* __restrict__ out, int* ticket, int* last_cta, int M, int N, int m0,
                                               int rows, int n0, int bn) {
  using V = Num<T>;
  const int splits = static_cast<int>(gridDim.z), tid = threadIdx.x;
  if (!took_last_ticket(ticket, last_cta)) return;
  const size_t plane = static_cast<size_t>(M) * N;
  for (int e = tid; e < rows * (bn / 4); e += THREADS) {
    const int r = e / (bn / 4), c = (e % (bn / 4)) * 4;
    const size_t off = static_cast<size_t>(m0 + r) * N + n0 + c;
    float4 s = __ldcg(reinterpret_cast<const float4*>(partial + off));
    for (int sp = 1; sp < splits; ++sp) {
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
    *reinterpret_cast<uint2*>(&out[off]) = o;
  }
  if (tid == 0) *ticket = 0;
}

// Let `kernel` use `bytes` of dynamic shared memory on the current device. The attribute is per function and per
// device (a process driving several GPUs must set it on each), so `done` (one static per kernel instantiation)
// remembers the devices already set; setting it twice from racing threads is harmless.
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, int bytes, uint64_t& done) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (done & bit) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done |= bit;
  return err;
}

// A device attribute, cached per device; 0 where the query fails (not cached, nor are devices past 64).
template <cudaDeviceAttr Attr>
inline int device_attribute(int device) {
  static int cache[64] = {0};
  const bool cacheable = device >= 0 && device < 64;
  if (cacheable && cache[device]) return cache[device];
  int value = 0;
  if (cudaDeviceGetAttribute(&value, Attr, device) != cudaSuccess) value = 0;
  if (cacheable && value > 0) cache[device] = value;
  return value;
}

// SMs of a device (the launchers size their grids by it), at least 1.
inline int sm_count(int device) {
  const int n = device_attribute<cudaDevAttrMultiProcessorCount>(device);
  return n > 0 ? n : 1;
}

}  // namespace
}  // namespace glm_awq
