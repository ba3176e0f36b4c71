"""Sweep the Triton W4A16 GEMM's block sizes at GLM-4.6's shapes on this GPU; write the winners as tuned.json.

The table ships in kernels/tuned.json (copy $OUT/tuned.json there), keyed by GPU family, so a user's first
decode step never autotunes. Weights rotate over several copies (none stays in L2), timed from CUDA graphs.

    python benchmarks/tune_triton.py [--ms 1,8,16,32,64] [--shapes q_proj,o_proj]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch
import triton

from glm_awq import quant
from glm_awq.kernels import tuning, w4a16_gemm

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402
from bench_w4a16_gemm import ROTATE_BYTES, SHAPES, _rotating  # noqa: E402


def candidates(m: int, n: int, k: int):
    block_ms = [16] if m <= 16 else [32, 64] if m <= 64 else [64, 128]
    for bm, bn, stages, split_k in itertools.product(block_ms, [32, 64, 128], [3, 4], [1, 2, 4, 8]):
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        if (k // 128) % split_k or not 64 <= tiles * split_k <= 16 * 132:
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split_k, num_warps=4, num_stages=stages,
                   LOAD_ONCE=1)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="1,8,16,32,64")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    family = tuning.family(0)
    table = {family: {"w4a16_gemm": []}}
    print(f"tuning on {common.card()} ({family})")
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        copies = max(2, math.ceil(ROTATE_BYTES / (n * k // 2)))
        weights = [w4a16_gemm.prepare(*quant.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16)))
                   for _ in range(copies)]  # fmt: skip
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            results = []
            for cfg in candidates(m, n, k):
                fns = [lambda t=t, cfg=cfg: w4a16_gemm.w4a16_gemm(x, t["weight"], t["scale"], None, 128, cfg)
                       for t in weights]  # fmt: skip
                try:
                    results.append((common.graph_time_us(_rotating(fns), calls=len(fns)), cfg))
                except Exception as exc:  # a config the card cannot run (shared memory): skip it
                    print(f"  {shape} M={m} {cfg}: {type(exc).__name__}")
            results.sort(key=lambda r: r[0])
            best_us, best = results[0]
            default = w4a16_gemm.pick_config(m, n, k, 128, x.device)
            print(f"{shape:15} M={m:3d} best {best_us:7.1f} us {best}  (of {len(results)})  default was {default}")
            table[family]["w4a16_gemm"].append({"n": n, "k": k, "m_max": m, "config": best, "us": round(best_us, 2)})
        del weights
        torch.cuda.empty_cache()
    table[family]["w4a16_gemm"].sort(key=lambda e: (e["n"], e["k"], e["m_max"]))
    path = common.out_dir() / "tuned.json"
    path.write_text(json.dumps(table, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
