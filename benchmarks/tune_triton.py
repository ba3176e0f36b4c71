"""Sweep the Triton W4A16 GEMM's block sizes at GLM-4.6's shapes on this GPU; write the winners as tuned.json.

The table ships in kernels/tuned.json (copy $OUT/tuned.json there, or pass --merge), keyed by GPU family, so a
user's first decode step never autotunes. Weights rotate over several copies (none stays in L2), timed from CUDA
graphs. An empty --shapes or --ms skips the GEMM sweep.

    python benchmarks/tune_triton.py [--ms 1,8,16,32,64] [--shapes q_proj,o_proj] [--moe-ts 1,16,256] [--merge]
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


def candidates(m: int, n: int, k: int, warps=(4,)):
    block_ms = [16] if m <= 16 else [32, 64] if m <= 64 else [64, 128]
    for bm, bn, stages, split_k, w in itertools.product(block_ms, [32, 64, 128], [2, 3, 4], [1, 2, 4, 8], warps):
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        if (k // 128) % split_k or not 64 <= tiles * split_k <= 16 * 132 or bn < 16 * w:
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split_k, num_warps=w, num_stages=stages)


MOE_E, MOE_A, MOE_H, MOE_I = 160, 8, 5120, 1536


def moe_candidates(block_m: int, n: int, k: int, wide: bool = False, stages=(3,)):
    """wide: every warp count for every tile (else 8 warps only for 128 x 64+ tiles, as before); stages: each."""
    for bn, split_k, warps, st in itertools.product([32, 64, 128], [1, 2, 4, 8], [4, 8], stages):
        if (k // 128) % split_k or (warps == 8) != (bn == 128 and block_m >= 64) and not (wide and bn >= 16 * warps):
            continue
        yield dict(BLOCK_M=block_m, BLOCK_N=bn, SPLIT_K=split_k, num_warps=warps, num_stages=st)


def tune_moe(ts: list[int], table: dict, wide: bool = False, stages=(3,)) -> None:
    """Coordinate descent per token count: the best GEMM1 config with GEMM2 at its default, then GEMM2."""
    import glm_awq
    from bench_moe import _layer_weights

    from glm_awq.kernels import moe

    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [glm_awq.prepare_experts(*_layer_weights(gen), backend="triton") for _ in range(2)]
    for t in ts:
        x = torch.randn(t, MOE_H, device="cuda", dtype=torch.bfloat16)
        ids, w = glm_awq.route(torch.randn(t, MOE_E, device="cuda"), torch.zeros(MOE_E, device="cuda"))
        s = t * MOE_A
        per_expert = s / min(MOE_E, s)

        def timed(cfgs):
            fns = [lambda p=p: moe.fused_moe(x, ids, w, p.tensors["w13"], p.tensors["w13_scale"], p.tensors["w2"],
                                             p.tensors["w2_scale"], 128, None, cfgs) for p in layers]  # fmt: skip
            return common.graph_time_us(_rotating(fns), calls=len(fns))

        best = None
        for block_m in [16, 32] if per_expert <= 16 else [32, 64] if per_expert <= 64 else [64, 128]:
            cfg1 = moe.pick_config("w13", s, MOE_I, MOE_H, MOE_E, x.device)
            cfg2 = moe.pick_config("w2", s, MOE_H, MOE_I, MOE_E, x.device)
            cfg1["BLOCK_M"] = cfg2["BLOCK_M"] = block_m
            for which, n, k in ((0, MOE_I, MOE_H), (1, MOE_H, MOE_I)):
                results = []
                for cand in moe_candidates(block_m, n, k, wide, stages):
                    cfgs = [cfg1, cfg2]
                    cfgs[which] = cand
                    try:
                        results.append((timed(tuple(cfgs)), cand))
                    except Exception as exc:  # shared memory or registers: skip the config
                        print(f"  T={t} {cand}: {type(exc).__name__}")
                us, cand = min(results, key=lambda r: r[0])
                if which == 0:
                    cfg1 = cand
                else:
                    cfg2 = cand
            if best is None or us < best[0]:
                best = (us, cfg1, cfg2)
        us, cfg1, cfg2 = best
        print(f"moe T={t:5d} best {us:8.1f} us  w13 {cfg1}  w2 {cfg2}", flush=True)
        m_max = s  # keyed by token-slots: the split that fills the GPU depends on how many blocks exist
        table.setdefault("moe_w13", []).append({"n": MOE_I, "k": MOE_H, "m_max": m_max, "config": cfg1, "us": round(us, 2)})
        table.setdefault("moe_w2", []).append({"n": MOE_H, "k": MOE_I, "m_max": m_max, "config": cfg2, "us": round(us, 2)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="1,8,16,32,64")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--moe-ts", default="1,16,256,4096", help="token counts for the MoE sweep ('' skips)")
    parser.add_argument("--warps", default="4", help="num_warps to try for the tile GEMM, e.g. 4,8")
    parser.add_argument("--moe-wide", action="store_true", help="the MoE sweep also tries 8 warps on narrow tiles")
    parser.add_argument("--moe-stages", default="3", help="num_stages to try for the MoE GEMMs, e.g. 2,3,4")
    parser.add_argument("--merge", action="store_true",
                        help="also write the winners into kernels/tuned.json, replacing entries of the same kernel, "
                             "n, k and m_max and keeping the rest")
    args = parser.parse_args()
    family = tuning.family(0)
    table = {family: {"w4a16_gemm": []}}
    print(f"tuning on {common.card()} ({family})")
    for shape in filter(None, args.shapes.split(",") if args.ms else []):
        n, k = SHAPES[shape]
        copies = max(2, math.ceil(ROTATE_BYTES / (n * k // 2)))
        weights = [w4a16_gemm.prepare(*quant.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16)))
                   for _ in range(copies)]  # fmt: skip
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            results = []
            for cfg in candidates(m, n, k, [int(w) for w in args.warps.split(",")]):  # noqa: B007
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
    if args.moe_ts:
        stages = [int(v) for v in args.moe_stages.split(",")]
        tune_moe([int(t) for t in args.moe_ts.split(",")], table[family], args.moe_wide, stages)
    for entries in table[family].values():
        entries.sort(key=lambda e: (e["n"], e["k"], e["m_max"]))
    path = common.out_dir() / "tuned.json"
    path.write_text(json.dumps(table, indent=1))
    print(f"wrote {path}")
    if args.merge:
        print(f"merged into {merge(table)}")
    return 0


def merge(table: dict) -> str:
    """Write table's entries into kernels/tuned.json: an entry replaces the one of the same kernel, n, k and m_max."""
    shipped = json.loads(tuning.TABLE_PATH.read_text()) if tuning.TABLE_PATH.exists() else {}
    for family, kernels in table.items():
        for kernel, entries in kernels.items():
            old = shipped.setdefault(family, {}).setdefault(kernel, [])
            keys = {(e["n"], e["k"], e["m_max"]) for e in entries}
            old[:] = sorted([e for e in old if (e["n"], e["k"], e["m_max"]) not in keys] + entries,
                            key=lambda e: (e["n"], e["k"], e["m_max"]))  # fmt: skip
    tuning.TABLE_PATH.write_text(json.dumps(shipped, indent=1) + "\n")
    return str(tuning.TABLE_PATH)


if __name__ == "__main__":
    raise SystemExit(main())
