"""W4A16 GEMM at GLM-4.6's shapes over a batch sweep, against the HBM floor and two baselines in the same run.

Per (shape, M, backend): the CUDA-graph time per call (weights rotated over several copies so L2 holds none
of them), achieved GB/s, % of the floor (max(bytes / copy bandwidth, FLOPs / bf16 rate), both measured now),
TFLOP/s; baselines bf16 torch.matmul and torch's int4 _weight_int4pack_mm. Writes w4a16_gemm.json + .png.

    python benchmarks/bench_w4a16_gemm.py [--backends triton,cuda] [--ms 1,16,4096] [--shapes q_proj,o_proj]
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import glm_awq
from glm_awq import quant
from glm_awq.kernels import w4a16_gemm
from glm_awq.reference import w4a16_linear_ref

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402

SHAPES = {  # name: (N, K)
    "q_proj": (12288, 5120),
    "kv_proj": (1024, 5120),
    "o_proj": (5120, 12288),
    "expert_gate_up": (3072, 5120),
    "expert_down": (5120, 1536),
}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
ROTATE_BYTES = 256 << 20  # weights cycled per timing: several times the L2


def _rotating(fns):
    """One callable running each of fns once: a graph of it times len(fns) calls over distinct weights."""

    def run():
        for fn in fns:
            fn()

    return run


def _int4pack_baseline(n, k, copies):
    """torch's own int4 weight-only GEMM (tinygemm) on random weights of the same size, or None if missing."""
    try:
        ws = []
        for _ in range(copies):
            packed_u8 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            w = torch._convert_weight_to_int4pack(packed_u8, 8)
            sz = torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
            ws.append((w, sz))
        return lambda x, i: torch._weight_int4pack_mm(x, ws[i][0], 128, ws[i][1])
    except (RuntimeError, AttributeError) as exc:
        print(f"  _weight_int4pack_mm unavailable: {exc}".splitlines()[0])
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VAL,...",
                        help="also time the Triton kernel with these config overrides, e.g. swap:SWAP_AB=1")
    parser.add_argument("--cuda-variants", default="", metavar="N,...",
                        help="also time the raw CUDA op with these variants (1 classic, 2 fold, 3 skinny: M <= 16)")
    parser.add_argument("--no-pdl-column", action="store_true",
                        help="also time the cuda backend with the skinny kernel's programmatic dependent launch off "
                             "(nopdl); --cuda-variants 3 times the same kernel without the settled-weight promise")
    args = parser.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    reasons = glm_awq.available_backends("cuda")
    backends = [b for b in args.backends.split(",") if reasons.get(b) is None]
    cuda_variants = [int(v) for v in args.cuda_variants.split(",") if v] if "cuda" in backends else []
    columns = backends + [f"triton:{v.partition(':')[0]}" for v in args.variant] + [f"cuda:v{v}" for v in cuda_variants]
    no_pdl = args.no_pdl_column and "cuda" in backends
    columns += ["cuda:nopdl"] if no_pdl else []
    for b in args.backends.split(","):
        if reasons.get(b):
            print(f"skipping backend {b}: {reasons[b]}")

    ceilings = common.measure_ceilings()
    print(f"{common.card()}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 {ceilings['bf16_TFLOPs']:.0f} TFLOP/s")
    rows = []
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        w_bytes = n * k // 2 + n * (k // 128) * 2
        copies = max(2, math.ceil(ROTATE_BYTES / w_bytes))
        gen = torch.Generator(device="cuda").manual_seed(0)
        weights = [quant.quantize(torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02)
                   for _ in range(copies)]  # fmt: skip
        prepared = {b: [glm_awq.prepare_linear(p, s, backend=b) for p, s in weights] for b in backends}
        dense = [quant.dequantize(p, s, 128, torch.bfloat16) for p, s in weights[: max(2, copies // 4)]]
        int4mm = _int4pack_baseline(n, k, len(dense))
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nbytes = w_bytes + m * k * 2 + m * n * 2
            flops = 2 * m * n * k
            floor = common.floor_us(nbytes, flops, ceilings)
            row = {"shape": shape, "N": n, "K": k, "M": m, "bytes": nbytes, "flops": flops, "floor_us": floor}
            for b in backends:
                ref = w4a16_linear_ref(x, *weights[0])
                err = (glm_awq.w4a16_linear(x, prepared[b][0]).float() - ref.float()).norm() / ref.float().norm()
                fns = [lambda p=p: glm_awq.w4a16_linear(x, p) for p in prepared[b]]
                t = common.graph_time_us(_rotating(fns), calls=len(fns))
                row[b] = {"us": t, "GBps": nbytes / t / 1e3, "pct_floor": 100 * floor / t,
                          "TFLOPs": flops / t / 1e6, "rel_err": err.item(),
                          "eager_us": common.time_us(fns[0])}  # fmt: skip
            for variant in args.variant:
                name, _, overrides = variant.partition(":")
                cfg = w4a16_gemm.pick_config(m, n, k, 128, x.device)
                if cfg.get("DENSE"):
                    continue
                cfg.update({kk: int(v) for kk, v in (o.split("=") for o in overrides.split(","))})
                fns = [lambda t=p.tensors: w4a16_gemm.w4a16_gemm(x, t["weight"], t["scale"], None, 128, cfg,
                                                                  tickets=t["tickets"])
                       for p in prepared["triton"]]  # fmt: skip
                t = common.graph_time_us(_rotating(fns), calls=len(fns))
                row[f"triton:{name}"] = {"us": t, "GBps": nbytes / t / 1e3, "pct_floor": 100 * floor / t,
                                         "TFLOPs": flops / t / 1e6, "config": cfg}  # fmt: skip
            for v in cuda_variants:
                if v == 3 and m > 16:
                    continue
                fns = [lambda t=p.tensors, v=v: torch.ops.glm_awq.w4a16_gemm(
                           x, t["weight"], t["scale.bfloat16"], None, t["tickets"], 128, 0, 0, v)
                       for p in prepared["cuda"]]  # fmt: skip
                t = common.graph_time_us(_rotating(fns), calls=len(fns))
                row[f"cuda:v{v}"] = {"us": t, "GBps": nbytes / t / 1e3, "pct_floor": 100 * floor / t,
                                     "TFLOPs": flops / t / 1e6}  # fmt: skip
            for mode, name in ((0, "cuda:nopdl"),) if no_pdl and m <= 16 else ():  # skinny M
                glm_awq._C.set_skinny_pdl(mode)  # read at launch, so while the graph is captured
                try:
                    fns = [lambda p=p: glm_awq.w4a16_linear(x, p) for p in prepared["cuda"]]
                    t = common.graph_time_us(_rotating(fns), calls=len(fns))
                finally:
                    glm_awq._C.set_skinny_pdl(1)
                row[name] = {"us": t, "GBps": nbytes / t / 1e3, "pct_floor": 100 * floor / t,
                             "TFLOPs": flops / t / 1e6}  # fmt: skip
            fns = [lambda w=w: x @ w.T for w in dense]
            row["torch_bf16_us"] = common.graph_time_us(_rotating(fns), calls=len(fns))
            if int4mm is not None:
                fns = [lambda i=i: int4mm(x, i) for i in range(len(dense))]
                row["torch_int4pack_us"] = common.graph_time_us(_rotating(fns), calls=len(fns))
            rows.append(row)
            print(_line(row, columns), flush=True)
        del weights, prepared, dense
        torch.cuda.empty_cache()

    payload = {"card": common.card(), "ceilings": ceilings, "backends": backends, "rows": rows}
    common.write_results("w4a16_gemm", payload)
    series = {}
    for shape in args.shapes.split(","):
        sel = [r for r in rows if r["shape"] == shape]
        for b in backends:
            series[f"{shape} {b}"] = ([r["M"] for r in sel], [r[b]["pct_floor"] for r in sel])
    common.plot("w4a16_gemm", f"W4A16 GEMM, % of floor, {common.card()}", series, "M", "% of floor")
    print(f"\nW4A16 GEMM on {common.card()} (CUDA graph, us; % of floor)")
    print(_header(columns))
    for row in rows:
        print(_line(row, columns))
    return 0


def _header(backends):
    cols = "".join(f" {b + ' us':>10} {'%fl':>5} {'GB/s':>6}" for b in backends)
    return f"{'shape':15} {'M':>5} {'floor':>7}{cols} {'bf16 mm':>8} {'int4mm':>8}"


def _line(row, backends):
    cols = "".join(f" {row[b]['us']:10.1f} {row[b]['pct_floor']:5.0f} {row[b]['GBps']:6.0f}" if b in row
                   else f" {'-':>10} {'-':>5} {'-':>6}" for b in backends)  # fmt: skip
    i4 = row.get("torch_int4pack_us")
    return (f"{row['shape']:15} {row['M']:5d} {row['floor_us']:7.1f}{cols} {row['torch_bf16_us']:8.1f} "
            f"{i4 if i4 is None else round(i4, 1)!s:>8}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
