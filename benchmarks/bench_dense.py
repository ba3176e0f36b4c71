"""GLM-4.6's float linears at decode sizes: the Triton skinny kernel (glm_awq.kernels.dense) against torch.

Shapes: the shared expert's gate+up (merged, SiLU * up fused) and down, layers 0-2's MLP and attention projections,
lm_head (the router is fp32, which the kernel does not take: it stays on torch).
Per (shape, M): the CUDA-graph time per call (weights rotated over several copies so L2 holds none), GB/s and %
of the floor (weight bytes / copy bandwidth measured in this run), and in the same run torch: the model's eager
path before this kernel (gate and up as two F.linear, then silu and the product; the others one F.linear) and
F.linear on the merged weight. Writes dense.json.

    python benchmarks/bench_dense.py [--ms 1,2,4,8,16] [--shapes shared_gate_up,attn_q] [--variant NAME:K=V,...]
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from glm_awq.kernels import dense

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402
from bench_w4a16_gemm import ROTATE_BYTES, _rotating  # noqa: E402

SHAPES = {  # name: (N of the weight, K, dtype); *_gate_up weights are [gate; up], N = 2 I
    "shared_gate_up": (3072, 5120, torch.bfloat16),
    "shared_down": (5120, 1536, torch.bfloat16),
    "dense_gate_up": (24576, 5120, torch.bfloat16),
    "dense_down": (5120, 12288, torch.bfloat16),
    "attn_q": (12288, 5120, torch.bfloat16),  # layers 0-2's attention is bf16 too
    "attn_kv": (1024, 5120, torch.bfloat16),
    "attn_o": (5120, 12288, torch.bfloat16),
    "lm_head": (151552, 5120, torch.bfloat16),
}
MS = [1, 2, 4, 8, 16]


def _torch_eager(shape, x, w):
    if shape.endswith("gate_up"):
        gate, up = w.chunk(2)
        return F.silu(F.linear(x, gate)) * F.linear(x, up)
    return F.linear(x, w)


def _ours(shape, x, w, tickets, cfg):
    if shape.endswith("gate_up"):
        return dense.swiglu(x, w, tickets, cfg)
    return dense.linear(x, w, None, tickets, cfg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VAL,...",
                        help="also time the kernel with these config overrides, e.g. bn32:BLOCK_N=32")
    args = parser.parse_args()
    ceilings = common.measure_ceilings()
    print(f"{common.card()}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 {ceilings['bf16_TFLOPs']:.0f} TFLOP/s")
    columns = ["triton"] + [v.partition(":")[0] for v in args.variant] + ["torch", "torch_merged"]
    rows = []
    for shape in args.shapes.split(","):
        n, k, dtype = SHAPES[shape]  # bf16 throughout
        w_bytes = n * k * dtype.itemsize
        copies = max(2, math.ceil(ROTATE_BYTES / w_bytes))
        gen = torch.Generator(device="cuda").manual_seed(0)
        weights = [torch.randn(n, k, device="cuda", generator=gen).to(dtype) * 0.02 for _ in range(copies)]
        gate_up = shape.endswith("gate_up")
        tickets = [dense.tickets_for(n // 2 if gate_up else n, "cuda") for _ in weights]
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device="cuda").to(dtype)
            out_n = n // 2 if gate_up else n
            nbytes = w_bytes + m * k * dtype.itemsize + m * out_n * dtype.itemsize
            floor = common.floor_us(nbytes, 2 * m * n * k, ceilings)
            row = {"shape": shape, "N": n, "K": k, "M": m, "dtype": str(dtype), "bytes": nbytes, "floor_us": floor}
            ref = _torch_eager(shape, x.double(), weights[0].double())
            err = (_ours(shape, x, weights[0], tickets[0], None).double() - ref).norm() / ref.norm()
            configs = {"triton": None}
            for variant in args.variant:
                name, _, overrides = variant.partition(":")
                cfg = dense.default_config(m, out_n, k, gate_up, x.device)
                cfg.update({kk: int(v) for kk, v in (o.split("=") for o in overrides.split(","))})
                configs[name] = cfg
            for name, cfg in configs.items():
                fns = [lambda w=w, t=t, cfg=cfg: _ours(shape, x, w, t, cfg) for w, t in zip(weights, tickets)]
                t_us = common.graph_time_us(_rotating(fns), calls=len(fns))
                row[name] = {"us": t_us, "GBps": nbytes / t_us / 1e3, "pct_floor": 100 * floor / t_us}
            row["triton"]["rel_err"] = err.item()
            for name, fn in (("torch", _torch_eager), ("torch_merged", lambda s, x, w: F.linear(x, w))):
                fns = [lambda w=w, fn=fn: fn(shape, x, w) for w in weights]
                t_us = common.graph_time_us(_rotating(fns), calls=len(fns))
                row[name] = {"us": t_us, "GBps": nbytes / t_us / 1e3, "pct_floor": 100 * floor / t_us}
            rows.append(row)
            print(_line(row, columns), flush=True)
        del weights
        torch.cuda.empty_cache()
    common.write_results("dense", {"card": common.card(), "ceilings": ceilings, "rows": rows})
    print(f"\nFloat linears at decode on {common.card()} (CUDA graph, us; % of the floor = weight bytes / copy bw)")
    print(f"{'shape':15} {'M':>3} {'floor':>6}" + "".join(f" {c + ' us':>13} {'%fl':>4}" for c in columns))
    for row in rows:
        print(_line(row, columns))
    return 0


def _line(row, columns):
    cells = "".join(f" {row[c]['us']:13.1f} {row[c]['pct_floor']:4.0f}" for c in columns)
    return f"{row['shape']:15} {row['M']:3d} {row['floor_us']:6.1f}{cells}"


if __name__ == "__main__":
    sys.exit(main())
