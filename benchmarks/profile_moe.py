"""Per-kernel GPU time of one GLM-4.6 MoE layer (routing included) under torch.profiler, to see where a layer's
time goes (kernel durations only: the launch gaps a CUDA graph removes are not in these numbers).

    python benchmarks/profile_moe.py [--backend cuda] [--ts 1,16]
"""

from __future__ import annotations

import argparse
import sys

import torch

import glm_awq

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_moe import E, _layer_weights  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--ts", default="1,16")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = glm_awq.prepare_experts(*_layer_weights(gen), backend=args.backend)
    bias = torch.randn(E, device="cuda", generator=gen) * 0.01
    for t in (int(v) for v in args.ts.split(",")):
        x = torch.randn(t, p.hidden_size, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(t, E, device="cuda")

        def layer():
            ids, w = glm_awq.route(logits, bias, backend=args.backend)
            return glm_awq.fused_moe(x, ids, w, p)

        for _ in range(3):
            layer()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.reps):
                layer()
            torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            us = ev.device_time_total / args.reps
            if us > 0:
                rows.append((us, ev.count // args.reps, ev.key))
        total = sum(r[0] for r in rows)
        print(f"\nT={t} {args.backend} on {torch.cuda.get_device_name()}: {total:.1f} us of kernels per layer")
        for us, calls, name in sorted(rows, reverse=True):
            print(f"  {us:8.1f} us  x{calls:<3d} {name[:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
