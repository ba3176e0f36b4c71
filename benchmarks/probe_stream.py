"""Read-only bandwidth probe: how fast can warps stream a weight-sized buffer in the access patterns the W4A16
kernels use? Separates "the layout/access pattern caps DRAM throughput" from "the kernel's own work does".

Each warp reads 16 bytes per lane per k16 step (512 B per warp), batches of 8 steps kept in flight with a
register double buffer (the skinny kernel's loop without the math), and XORs what it reads into one word.
Patterns, for an [N, K] int4 weight (N*K/2 bytes):
  cuda    the cuda layout [K/16, N/64, 32, 16 B]: a warp's consecutive steps are N*8 bytes apart
  rowmajor  [N/64, K/16, 32, 16 B]: a warp's steps are contiguous (512 B apart)
Grid: 8 warps per CTA = WN along N x 8/WN along K, split-K over gridDim.y, as the skinny kernel.

    python benchmarks/probe_stream.py [--shapes 12288x5120,5120x12288]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402

SOURCE = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

template <bool ROWMAJOR, int WN>
__global__ void __launch_bounds__(256, 2) probe(const int4* __restrict__ w, int* __restrict__ sink, int n64, int k16,
                                                int batches_per_split) {
  constexpr int WK = 8 / WN;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wn = warp % WN, wk = warp / WN;
  const int nb = blockIdx.x * WN + wn;
  const int b0 = blockIdx.y * batches_per_split;
  const int nbatch = min(k16 / 8, b0 + batches_per_split) - b0;
  auto addr = [&](int step) -> const int4* {  // step = k16 index
    if (ROWMAJOR) return w + (static_cast<size_t>(nb) * k16 + step) * 32 + lane;
    return w + (static_cast<size_t>(step) * n64 + nb) * 32 + lane;
  };
  int4 cur[8], nxt[8];
  unsigned acc = 0;
  if (wk < nbatch)
#pragma unroll
    for (int s = 0; s < 8; ++s) cur[s] = __ldcs(addr((b0 + wk) * 8 + s));
  for (int j = wk; j < nbatch; j += WK) {
    if (j + WK < nbatch)
#pragma unroll
      for (int s = 0; s < 8; ++s) nxt[s] = __ldcs(addr((b0 + j + WK) * 8 + s));
#pragma unroll
    for (int s = 0; s < 8; ++s) acc ^= cur[s].x ^ cur[s].y ^ cur[s].z ^ cur[s].w;
#pragma unroll
    for (int s = 0; s < 8; ++s) cur[s] = nxt[s];
  }
  if (acc == 0x12345678u) sink[0] = acc;  // practically never: keeps the loads alive
}

void run(torch::Tensor w, torch::Tensor sink, int64_t n, int64_t k, int64_t splits, bool rowmajor, int64_t wn) {
  const int n64 = n / 64, k16 = k / 16, batches = k / 128;
  const int per_split = (batches + splits - 1) / splits;
  const dim3 grid(n64 / wn, (batches + per_split - 1) / per_split);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int4* p = reinterpret_cast<const int4*>(w.data_ptr());
  int* s = sink.data_ptr<int>();
  if (rowmajor) {
    if (wn == 2) probe<true, 2><<<grid, 256, 0, stream>>>(p, s, n64, k16, per_split);
    else probe<true, 4><<<grid, 256, 0, stream>>>(p, s, n64, k16, per_split);
  } else {
    if (wn == 2) probe<false, 2><<<grid, 256, 0, stream>>>(p, s, n64, k16, per_split);
    else probe<false, 4><<<grid, 256, 0, stream>>>(p, s, n64, k16, per_split);
  }
}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="12288x5120,5120x12288")
    args = parser.parse_args()
    ext = load_inline("glm_awq_probe", cpp_sources="void run(torch::Tensor w, torch::Tensor sink, int64_t n, "
                      "int64_t k, int64_t splits, bool rowmajor, int64_t wn);", cuda_sources=SOURCE,
                      functions=["run"], extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"])  # fmt: skip
    ceilings = common.measure_ceilings()
    print(f"{common.card()}: copy {ceilings['copy_GBps']:.0f} GB/s")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    print(f"{'N x K':>12} {'pattern':>9} {'WN':>3} {'splits':>6} {'us':>7} {'GB/s':>6} {'% copy':>7}")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        nbytes = n * k // 2
        copies = max(2, -(-(256 << 20) // nbytes))  # >= 256 MB rotated: no L2 hits
        bufs = [torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
                for _ in range(copies)]  # fmt: skip
        for rowmajor in (False, True):
            for wn in (2, 4):
                for splits in (1, 2, 4, 8):
                    fns = [lambda b=b: ext.run(b, sink, n, k, splits, rowmajor, wn) for b in bufs]

                    def cycle(fns=fns):
                        for fn in fns:
                            fn()

                    us = common.graph_time_us(cycle, calls=len(fns))
                    gbps = nbytes / us / 1e3
                    print(f"{shape:>12} {'rowmajor' if rowmajor else 'cuda':>9} {wn:3d} {splits:6d} {us:7.1f} "
                          f"{gbps:6.0f} {100 * gbps / ceilings['copy_GBps']:6.0f}%", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
