"""The MoE layer's small kernels at decode sizes: routing (_route_kernel) per launch config, and the token sort
(one program vs count + scatter), each timed alone from a CUDA graph (the launch is part of what is measured).

    python benchmarks/bench_moe_routing.py [--ts 1,2,4,8,16,32,64,128,256]
"""

from __future__ import annotations

import argparse
import sys

import torch

from glm_awq.kernels import moe

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402

E, A = 160, 8
ROUTE_CONFIGS = [(1, 1), (1, 2), (2, 2), (4, 4), (8, 4)]  # (tokens per program, warps)


def _runs(sorted_slots, counts, block_m=8):
    """Each expert's slots in a sort's output (runs padded to block_m)."""
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    return [sorted_slots[s : s + c] for s, c in zip(starts.tolist(), counts.tolist())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ts", default="1,2,4,8,16,32,64,128,256")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    bias = torch.randn(E, device="cuda", generator=gen) * 0.01
    rows = []
    default_route, default_max = moe.route_config, moe.SORT_ONE_MAX
    try:
        for t in (int(v) for v in args.ts.split(",")):
            logits = torch.randn(t, E, device="cuda", generator=gen)
            ref = None
            for block_t, warps in ROUTE_CONFIGS:
                moe.route_config = lambda _t, c=(block_t, warps): c
                ids, w = moe.route(logits, bias, A, 2.5, 1, 1, True)
                ref = (ids, w) if ref is None else ref
                assert torch.equal(ids, ref[0]) and torch.equal(w, ref[1]), (block_t, warps)
                us = common.graph_time_us(lambda: moe.route(logits, bias, A, 2.5, 1, 1, True))
                rows.append(dict(T=t, kernel="route", config=f"block_t={block_t} warps={warps}", us=us))
            moe.route_config = default_route
            ids = ref[0].reshape(-1)
            sorts = []
            for name, limit in (("one program", 1 << 30), ("count + scatter", 0)):
                moe.SORT_ONE_MAX = limit
                sorts.append(moe._sort(ids, None, E, 8))
                us = common.graph_time_us(lambda: moe._sort(ids, None, E, 8))
                rows.append(dict(T=t, kernel="sort", config=name, us=us))
            (s1, c1, l1), (s2, c2, l2) = sorts
            assert torch.equal(c1, c2) and torch.equal(l1, l2), t
            for run1, run2 in zip(_runs(s1, c1), _runs(s2, c2)):  # the same slots per expert (in any order)
                assert torch.equal(run1.sort().values, run2.sort().values), t
            moe.SORT_ONE_MAX = default_max
            for r in rows[-len(ROUTE_CONFIGS) - 2 :]:
                print(f"T={t:4d} {r['kernel']:5} {r['config']:22} {r['us']:6.2f} us", flush=True)
    finally:
        moe.route_config, moe.SORT_ONE_MAX = default_route, default_max
    common.write_results("moe_routing", {"card": common.card(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
