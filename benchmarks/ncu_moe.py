"""One GLM-4.6 MoE layer on the cuda backend with forced kernels, for Nsight Compute (hardware counters).

Random int4 words (every nibble value) and scales, routing of random logits; each (block_m, variant) runs twice
(warm-up, then the one to profile). Run under ncu, e.g.

    ncu --clock-control none -k regex:moe_wgmma --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section WarpStateStats python benchmarks/ncu_moe.py --t 4096 --configs 64:4
"""

from __future__ import annotations

import argparse

import torch

import glm_awq
from glm_awq.kernels import moe

E, A, H, I = 160, 8, 5120, 1536


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", type=int, default=4096)
    parser.add_argument("--configs", default="64:4", help="block_m:variant pairs, comma-separated")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def words(n, k):
        return torch.randint(-(2**31), 2**31 - 1, (E, n, k // 8), generator=gen, device="cuda", dtype=torch.int32)

    def scales(n, k):
        return (torch.rand(E, n, k // 128, generator=gen, device="cuda") * 0.02 + 1e-3).to(torch.bfloat16)

    p = glm_awq.prepare_experts(words(2 * I, H), scales(2 * I, H), words(H, I), scales(H, I), backend="cuda")
    x = torch.randn(args.t, H, device="cuda", generator=gen).to(torch.bfloat16)
    ids, w = glm_awq.route(torch.randn(args.t, E, device="cuda", generator=gen), torch.zeros(E, device="cuda"))
    t = p.tensors
    wf = w.reshape(-1).float()
    for cfg in args.configs.split(","):
        block_m, variant = (int(v) for v in cfg.split(":"))
        sorted_slots, counts, local = moe._sort(ids.reshape(-1), None, E, block_m)[:3]
        c = counts.cpu()
        print(f"block_m={block_m}: {int((c > 0).sum())} experts touched, {int(((c + block_m - 1) // block_m).sum())} "
              f"blocks (each reads its expert's weights once)")  # to compare with ncu's DRAM bytes
        for _ in range(2):
            hid = torch.ops.glm_awq.moe_gemm(x, t["w13"], t["w13_scale.bfloat16"], sorted_slots, counts, wf, A,
                                             block_m, 1, 128, variant)  # fmt: skip
            torch.ops.glm_awq.moe_gemm(hid, t["w2"], t["w2_scale.bfloat16"], sorted_slots, counts, wf, A, block_m, 2,
                                       128, variant)  # fmt: skip
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
