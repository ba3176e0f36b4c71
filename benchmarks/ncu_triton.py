"""The Triton kernels behind the open targets, each launched a few times on random int4 weights, for Nsight
Compute (hardware counters: issue, stalls, DRAM). One case per run:

    decode  the GEMV at q_proj M = 1 and the per-token MoE's two GEMVs at T = 1 (3 kernels per iteration)
    tile    the tensor-core tile kernel at q_proj M = 8 (1 kernel per iteration)
    moe     the sorted MoE's two grouped GEMMs at T = 64 (2 kernels per iteration)

e.g. (skip the first two iterations' launches: 2 x kernels per iteration)

    ncu --clock-control none -k regex:"_moe_gemm" --launch-skip 4 --launch-count 2 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \\
        python benchmarks/ncu_triton.py moe
"""

from __future__ import annotations

import sys

import torch

import glm_awq
from glm_awq.kernels import moe, w4a16_gemm

E, A, H, I, Q = 160, 8, 5120, 1536, 12288
ITERATIONS = 5


def main(case: str) -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def words(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, device="cuda", dtype=torch.int32)

    def scales(*shape):
        return (torch.rand(*shape, generator=gen, device="cuda") * 0.02 + 1e-3).to(torch.bfloat16)

    def experts():
        return glm_awq.prepare_experts(words(E, 2 * I, H // 8), scales(E, 2 * I, H // 128), words(E, H, I // 8),
                                       scales(E, H, I // 128), backend="triton")  # fmt: skip

    if case == "decode":
        x = torch.randn(1, H, device="cuda", generator=gen).to(torch.bfloat16)
        q = w4a16_gemm.prepare(words(Q, H // 8), scales(Q, H // 128))
        t = experts().tensors
        ids, w = glm_awq.route(torch.randn(1, E, device="cuda", generator=gen), torch.zeros(E, device="cuda"))

        def step():
            w4a16_gemm.w4a16_gemm(x, q["weight"], q["scale"], tickets=q["tickets"])
            moe.fused_moe_per_token(x, ids, w, t["w13"], t["w13_scale"], t["w2"], t["w2_scale"], 128,
                                    tickets=t["token_tickets"])  # fmt: skip
    elif case == "tile":
        x = torch.randn(8, H, device="cuda", generator=gen).to(torch.bfloat16)
        q = w4a16_gemm.prepare(words(Q, H // 8), scales(Q, H // 128))

        def step():
            w4a16_gemm.w4a16_gemm(x, q["weight"], q["scale"], tickets=q["tickets"])
    elif case == "moe":
        x = torch.randn(64, H, device="cuda", generator=gen).to(torch.bfloat16)
        p = experts()
        ids, w = glm_awq.route(torch.randn(64, E, device="cuda", generator=gen), torch.zeros(E, device="cuda"))

        def step():
            glm_awq.fused_moe(x, ids, w, p)
    else:
        raise SystemExit(f"unknown case {case!r}: use decode, tile or moe")
    for _ in range(ITERATIONS):
        step()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "decode"))
