"""Time the raw CUDA W4A16 op over tile widths, split counts and variants for a few shapes (CUDA graph, weights
rotated past L2), to choose the launch heuristics in csrc/ from measurements.

    python benchmarks/sweep_cuda_gemm.py [--shapes 12288x5120,5120x12288] [--ms 1,8] [--variants 2,3]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

import glm_awq
from glm_awq import quant

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="12288x5120,5120x12288")
    parser.add_argument("--ms", default="1,8")
    parser.add_argument("--variants", default="2,3")
    parser.add_argument("--block-ns", default="0,64,128,256")
    parser.add_argument("--splits", default="0,1,2,3,4,6,8")
    args = parser.parse_args()
    ceilings = common.measure_ceilings()
    print(f"{common.card()}: copy {ceilings['copy_GBps']:.0f} GB/s")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w_bytes = n * k // 2 + n * (k // 128) * 2
        copies = max(2, -(-(256 << 20) // w_bytes))
        weights = [quant.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(copies)]
        prepared = [glm_awq.prepare_linear(p, s, backend="cuda").tensors for p, s in weights]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            floor = common.floor_us(w_bytes + 2 * m * (n + k), 2 * m * n * k, ceilings)
            results = []
            for v, bn, sp in itertools.product(*(map(int, a.split(",")) for a in (args.variants, args.block_ns, args.splits))):
                if v == 3 and (m > 16 or bn > 256) or n % max(bn, 64):
                    continue
                fns = [lambda t=t: torch.ops.glm_awq.w4a16_gemm(x, t["weight"], t["scale.bfloat16"], None,
                                                                t["tickets"], 128, bn, sp, v) for t in prepared]

                def cycle(fns=fns):
                    for fn in fns:
                        fn()

                us = common.graph_time_us(cycle, calls=len(fns))
                results.append((us, v, bn, sp))
            # the prefill path of CudaBackend.linear (dequantize from the same layout, then cuBLAS), same timing
            dense = [lambda t=t: torch.nn.functional.linear(
                x, torch.ops.glm_awq.dequantize_cuda_layout(t["weight"], t["scale.bfloat16"], 128)) for t in prepared]

            def cycle_dense(fns=dense):
                for fn in fns:
                    fn()

            dense_us = common.graph_time_us(cycle_dense, calls=len(dense))
            results.sort()
            print(f"\n{shape} M={m} floor {floor:.1f} us; fastest first (variant, block_n, splits; 0 = auto)")
            print(f"  dequantize + matmul (CudaBackend.goes_dense): {dense_us:.1f} us")
            for us, v, bn, sp in results[:12]:
                print(f"  {us:7.1f} us {100 * floor / us:4.0f}%  v{v} bn={bn:<4d} splits={sp}")
            for us, v, bn, sp in results:
                if bn == 0 and sp == 0:
                    print(f"  auto v{v}: {us:.1f} us")
        del weights, prepared
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
