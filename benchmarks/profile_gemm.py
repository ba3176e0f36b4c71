"""One W4A16 GEMM shape called a few times, for a profiler (ncu / nsys) to attach to:

    ncu --kernel-name regex:w4a16 --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        python benchmarks/profile_gemm.py --n 12288 --k 5120 --m 1 --variant 3
"""

from __future__ import annotations

import argparse

import torch

import glm_awq
from glm_awq import quant


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12288)
    parser.add_argument("--k", type=int, default=5120)
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--variant", type=int, default=0, help="CUDA op variant (1 classic, 2 fold, 3 skinny)")
    parser.add_argument("--calls", type=int, default=6)
    args = parser.parse_args()
    packed, scale = quant.quantize(torch.randn(args.n, args.k, device="cuda", dtype=torch.bfloat16) * 0.02)
    t = glm_awq.prepare_linear(packed, scale, backend="cuda").tensors
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    for _ in range(args.calls):
        torch.ops.glm_awq.w4a16_gemm(x, t["weight"], t["scale.bfloat16"], None, t["tickets"], 128, 0, 0, args.variant)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
