"""Sweep the per-token MoE's tile widths and splits on the GLM-4.6 MoE layer at decode sizes, beside the sorted
path: cuda (glm_awq::moe_per_token against moe_gemm with blocks of 8 slots + moe_sum, and with programmatic
dependent launch off) or triton (kernels/moe.py's fused_moe_per_token against its sort + grouped GEMMs).

Configs are block_n1:splits1:block_n2:splits2 (0 = auto; triton takes a fifth field, num_warps). Prints time (CUDA graph, routing excluded, 3 layers of
weights cycled), % of the floor (unique expert bytes / copy bandwidth measured in this run) and the error against
the sorted path's output; writes sweep_moe_per_token[_triton].json.

    python benchmarks/sweep_moe_per_token.py [--backend triton] [--ts 1,2,4] [--configs 0:0:0:0,256:2:256:12]
"""

from __future__ import annotations

import argparse
import sys

import torch

import glm_awq

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402
from bench_moe import A, E, H, _layer_cost, _layer_weights  # noqa: E402
from bench_w4a16_gemm import _rotating  # noqa: E402
from sweep_cuda_moe import _cuda_layer  # noqa: E402

TRITON_CONFIGS = "0:0:0:0,64:1:0:0,64:4:0:0,32:2:0:0,128:1:0:0,0:0:64:4,0:0:64:12,0:0:64:16,0:0:32:8,0:0:128:8"
CONFIGS = "0:0:0:0,256:1:0:0,256:3:0:0,128:1:0:0,128:2:0:0,64:1:0:0,0:0:256:6,0:0:256:8,0:0:256:16,0:0:128:4,0:0:128:6"


def _per_token(x, ids, w, p, bn1, s1, bn2, s2):
    from glm_awq import _C  # noqa: F401  (registers torch.ops.glm_awq)

    t = p.tensors
    return torch.ops.glm_awq.moe_per_token(x, t["w13"], t["w13_scale.bfloat16"], t["w2"], t["w2_scale.bfloat16"],
                                           ids, w, None, t["per_token_tickets"], 128, bn1, s1, bn2, s2)  # fmt: skip


def _triton_sorted(x, ids, w, p):
    from glm_awq.kernels import moe

    t, (e, i) = p.tensors, (p.num_experts, p.intermediate_size)
    s = ids.numel()
    cfgs = (moe.pick_config("w13", s, i, H, e, x.device), moe.pick_config("w2", s, H, i, e, x.device))
    return moe.fused_moe(x, ids, w, t["w13"], t["w13_scale"], t["w2"], t["w2_scale"], 128, None, cfgs)


def _triton_per_token(x, ids, w, p, bn1, s1, bn2, s2, warps=0):
    from glm_awq.kernels import moe

    t = p.tensors
    cfg = dict(BLOCK_N1=bn1, SPLIT_K1=s1, BLOCK_N2=bn2, SPLIT_K2=s2, num_warps=warps)
    cfg = {k: v for k, v in cfg.items() if v}
    return moe.fused_moe_per_token(x, ids, w, t["w13"], t["w13_scale"], t["w2"], t["w2_scale"], 128, None,
                                   config=cfg, tickets=t["token_tickets"])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ts", default="1,2,4")
    parser.add_argument("--backend", default="cuda", choices=["cuda", "triton"])
    parser.add_argument("--configs", default=None, metavar="BN1:S1:BN2:S2,...")
    args = parser.parse_args()
    triton_mode = args.backend == "triton"
    args.configs = args.configs or (TRITON_CONFIGS if triton_mode else CONFIGS)
    ceilings = common.measure_ceilings()
    print(f"{common.card()}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 {ceilings['bf16_TFLOPs']:.0f} TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [glm_awq.prepare_experts(*_layer_weights(gen), backend=args.backend) for _ in range(3)]
    configs = [tuple(map(int, c.split(":"))) for c in args.configs.split(",")]
    rows = []
    for t in (int(v) for v in args.ts.split(",")):
        x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
        ids, w = glm_awq.route(torch.randn(t, E, device="cuda"), torch.zeros(E, device="cuda"), backend="torch")
        ids, w = ids.to(torch.int32).contiguous(), w.float().contiguous()
        _, nbytes, flops = _layer_cost(ids, t)
        floor = common.floor_us(nbytes, flops, ceilings)
        if triton_mode:
            cands = [("sorted (pick_config)", lambda p: _triton_sorted(x, ids, w, p), 1)]
            cands += [(f"per token {':'.join(map(str, c))}", lambda p, c=c: _triton_per_token(x, ids, w, p, *c), 1)
                      for c in configs]  # fmt: skip
        else:
            cands = [("sorted, blocks of 8", lambda p: _cuda_layer(x, ids, w, p, 8, 0), 1)]
            cands += [(f"per token {c[0]}:{c[1]}:{c[2]}:{c[3]}", lambda p, c=c: _per_token(x, ids, w, p, *c), 1)
                      for c in configs]  # fmt: skip
            cands.append(("per token auto, PDL off", lambda p: _per_token(x, ids, w, p, 0, 0, 0, 0), 0))
        first = None
        for name, call, pdl in cands:
            if not triton_mode:
                from glm_awq import _C

                _C.set_skinny_pdl(pdl)
            try:
                out = call(layers[0])
                calls = [lambda p=p, call=call: call(p) for p in layers]
                us = common.graph_time_us(_rotating(calls), calls=len(layers))
            except Exception as exc:  # a config this shape does not take
                print(f"T={t} {name}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            finally:
                if not triton_mode:
                    _C.set_skinny_pdl(1)  # imported above
            first = out if first is None else first
            err = ((out.float() - first.float()).norm() / first.float().norm()).item()
            ok = bool(torch.isfinite(out).all())
            rows.append(dict(T=t, config=name, us=us, floor_us=floor, err=err, ok=ok))
            print(f"T={t} {name:32} {us:7.1f} us {100 * floor / us:5.1f}% of floor  err {err:.1e}"
                  f"{'' if ok else '  NaN/inf!'}", flush=True)  # fmt: skip
    name = "sweep_moe_per_token" + ("_triton" if triton_mode else "")
    common.write_results(name, {"card": common.card(), "ceilings": ceilings, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
