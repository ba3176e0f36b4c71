"""Sweep the Triton MoE layer's launch configs at prefill sizes, against its current rule and bf16 grouped_mm.

Each candidate is one (GEMM1, GEMM2) pair sharing BLOCK_M; WIDE selects the inner block step of
kernels/moe.py (0: a k16 dot per nibble; 1: one k128 dot on the dequantized block) and ASM
its dequant (inline PTX, or 0: fp32 math).
Prints time (CUDA graph, routing excluded; the grouped_mm baseline includes it), % of the floor (measured in
this run) and the error against the rule's output; writes sweep_triton_moe.json.

    python benchmarks/sweep_triton_moe.py [--ts 256,512,1024,4096]
"""

from __future__ import annotations

import argparse
import sys

import torch

import glm_awq
from glm_awq.kernels import moe

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402
from bench_moe import A, E, H, I, _dense_bf16, _grouped_mm_baseline, _layer_weights, _prefill_case  # noqa: E402
from bench_w4a16_gemm import _rotating  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages, WIDE, ASM) of GEMM1, then of GEMM2 (they share BLOCK_M: one sort);
# ASM: WIDE's dequant in inline PTX (0: the fp32 path)
CANDIDATES = [
    ((64, 128, 4, 3, 1, 0), (64, 128, 4, 3, 1, 0)),
    ((64, 128, 4, 3, 1, 1), (64, 128, 4, 3, 1, 1)),
    ((128, 128, 8, 3, 1, 0), (128, 256, 8, 3, 1, 0)),
    ((128, 128, 8, 3, 1, 1), (128, 256, 8, 3, 1, 1)),
    ((128, 128, 8, 3, 1, 1), (128, 128, 8, 3, 1, 1)),
    ((128, 128, 8, 2, 1, 1), (128, 256, 8, 2, 1, 1)),
]


def _cfg(bm, bn, warps, stages, wide, asm):
    return dict(BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=1, num_warps=warps, num_stages=stages, WIDE=bool(wide), ASM=bool(asm))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ts", default="256,512,1024,4096")
    args = parser.parse_args()
    ceilings = common.measure_ceilings()
    print(f"{common.card()}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 {ceilings['bf16_TFLOPs']:.0f} TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [glm_awq.prepare_experts(*_layer_weights(gen), backend="triton") for _ in range(2)]
    raw = _layer_weights(gen)  # a separate layer for the bf16 baseline
    baseline = _grouped_mm_baseline(_dense_bf16(*raw[:2]), _dense_bf16(*raw[2:]), torch.zeros(E, device="cuda"))
    del raw
    rows = []
    for t in (int(v) for v in args.ts.split(",")):
        x, ids, w, floor, base_us = _prefill_case(t, baseline, ceilings)
        s = t * A
        rule = (moe.pick_config("w13", s, I, H, E, x.device), moe.pick_config("w2", s, H, I, E, x.device))
        cands = [("rule", rule)] + [(f"{c1} {c2}", (_cfg(*c1), _cfg(*c2))) for c1, c2 in CANDIDATES]
        first = None
        for name, cfgs in cands:

            def call(p, cfgs=cfgs):
                t_ = p.tensors
                return moe.fused_moe(x, ids, w, t_["w13"], t_["w13_scale"], t_["w2"], t_["w2_scale"], 128, None, cfgs)

            try:
                out = call(layers[0])
                us = common.graph_time_us(_rotating([lambda p=p: call(p) for p in layers]), calls=len(layers))
            except Exception as exc:  # shared memory or registers: skip the config
                print(f"T={t:5d} {name}: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            first = out if first is None else first
            err = ((out.float() - first.float()).norm() / first.float().norm()).item()
            ok = bool(torch.isfinite(out).all())
            rows.append(dict(T=t, config=name, cfgs=cfgs, us=us, floor_us=floor, baseline_us=base_us, err=err, ok=ok))
            print(f"T={t:5d} {name:44} {us:9.1f} us {100 * floor / us:5.1f}% of floor  grouped_mm {base_us:8.1f} us"
                  f"  vs rule err {err:.1e}{'' if ok else '  NaN/inf!'}", flush=True)  # fmt: skip
    common.write_results("sweep_triton_moe", {"card": common.card(), "ceilings": ceilings, "rows": rows})
    print("\nbest per T:")
    for t in sorted({r["T"] for r in rows}):
        best = min((r for r in rows if r["T"] == t and r["ok"]), key=lambda r: r["us"])
        print(f"T={t:5d} best {best['config']:28} {best['us']:9.1f} us ({100 * best['floor_us'] / best['us']:.0f}%"
              f" of floor), grouped_mm {best['baseline_us']:.1f} us")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
