"""The Triton kernels that bound decode (the GEMV at q_proj M = 1, the per-token MoE's two GEMVs at T = 1), each
run three times on random int4 weights, for Nsight Compute (hardware counters: issue, stalls, DRAM). Run e.g.

    ncu --clock-control none -k regex:"gemv|_token_" --launch-skip 3 --launch-count 3 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \\
        python benchmarks/ncu_triton_decode.py
"""

from __future__ import annotations

import torch

import glm_awq
from glm_awq.kernels import moe, w4a16_gemm

E, A, H, I, Q = 160, 8, 5120, 1536, 12288


def main() -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def words(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, device="cuda", dtype=torch.int32)

    def scales(*shape):
        return (torch.rand(*shape, generator=gen, device="cuda") * 0.02 + 1e-3).to(torch.bfloat16)

    x = torch.randn(1, H, device="cuda", generator=gen).to(torch.bfloat16)
    q = w4a16_gemm.prepare(words(Q, H // 8), scales(Q, H // 128))
    p = glm_awq.prepare_experts(words(E, 2 * I, H // 8), scales(E, 2 * I, H // 128), words(E, H, I // 8),
                                scales(E, H, I // 128), backend="triton")  # fmt: skip
    ids, w = glm_awq.route(torch.randn(1, E, device="cuda", generator=gen), torch.zeros(E, device="cuda"))
    t = p.tensors
    for _ in range(6):  # 3 warm-up launches of each kernel, then 3 to profile
        w4a16_gemm.w4a16_gemm(x, q["weight"], q["scale"], tickets=q["tickets"])
        moe.fused_moe_per_token(x, ids, w, t["w13"], t["w13_scale"], t["w2"], t["w2_scale"], 128,
                                tickets=t["token_tickets"])  # fmt: skip
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
