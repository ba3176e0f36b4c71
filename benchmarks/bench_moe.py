"""The full GLM-4.6 MoE layer (E=160, top-8, H=5120, I=1536, routing included) over a token sweep.

Per (T, backend): eager and CUDA-graph time, the floor max(unique expert bytes / copy bandwidth, FLOPs / bf16
rate) measured in this run, % of floor; baseline: bf16 torch._grouped_mm (sort + two grouped GEMMs + SiLU*up +
weighted sum, routing included) over the same routing. Several layers' weights are cycled so that no layer
hits in L2. Writes moe.json + moe.png.

    python benchmarks/bench_moe.py [--backends triton,cuda] [--ts 1,16,4096] [--layers 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

import glm_awq
from glm_awq import quant
from glm_awq.reference import fused_moe_ref

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402

E, A, H, I = 160, 8, 5120, 1536
EXPERT_BYTES = (2 * I * H + H * I) // 2 + (2 * I * H // 128 + H * I // 128) * 2  # int4 + bf16 scales
TS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]


def _stacked(n, k, gen):
    """E random experts [n, k], quantized one at a time (quantizing all at once needs tens of GB)."""
    pairs = [quant.quantize(torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02)
             for _ in range(E)]  # fmt: skip
    return torch.stack([p for p, _ in pairs]), torch.stack([s for _, s in pairs])


def _layer_weights(gen):
    return (*_stacked(2 * I, H, gen), *_stacked(H, I, gen))


def _dense_bf16(packed, scale):
    """[E, N, K/8] int4 -> bf16 [E, K, N] (the layout torch._grouped_mm wants), one expert at a time."""
    return torch.stack([quant.dequantize(p, s, 128, torch.bfloat16).T for p, s in zip(packed, scale)]).contiguous()


def _grouped_mm_baseline(w13_bf16, w2_bf16, bias):
    """bf16 experts through torch._grouped_mm: route, sort slots by expert, two grouped GEMMs, weighted sum."""

    def layer(x, logits):
        ids, w = glm_awq.route(logits, bias, backend="torch")
        t = x.shape[0]
        flat = ids.reshape(-1).long()
        order = flat.argsort(stable=True)
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32)
        )
        offs = counts.cumsum(0, dtype=torch.int32)
        xs = x[order // A]
        gate_up = torch._grouped_mm(xs, w13_bf16, offs=offs)
        g, u = gate_up.chunk(2, dim=-1)
        y = torch._grouped_mm((F.silu(g) * u).to(x.dtype), w2_bf16, offs=offs)
        y = y * w.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros(t, H, dtype=torch.float32, device=x.device).index_add_(0, order // A, y.float()).to(x.dtype)

    return layer


def _layer_cost(ids, t):
    """(experts touched, bytes, FLOPs) of one layer call at T tokens: the touched experts' int4 weights plus x in
    and out, and the two grouped GEMMs."""
    unique = int(ids.unique().numel())
    return unique, unique * EXPERT_BYTES + 2 * t * H * 2, t * A * 2 * (2 * I * H + H * I)


def _inputs(t):
    """x [T, H] and router logits [T, E] for T tokens, the same in every run (and process) for the same T, so that
    two runs route alike and touch the same experts."""
    gen = torch.Generator(device="cuda").manual_seed(1000 + t)
    x = torch.randn(t, H, device="cuda", generator=gen, dtype=torch.bfloat16)
    return x, torch.randn(t, E, device="cuda", generator=gen)


def _prefill_case(t, baseline, ceilings):
    """The sweeps' inputs at T tokens: x, routing (ids, weights) of random logits, the floor, and the bf16
    grouped_mm layer's time (routing included)."""
    x, logits = _inputs(t)
    ids, w = glm_awq.route(logits, torch.zeros(E, device="cuda"))
    _, nbytes, flops = _layer_cost(ids, t)
    return x, ids, w, common.floor_us(nbytes, flops, ceilings), common.graph_time_us(lambda: baseline(x, logits))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--ts", default=",".join(map(str, TS)))
    parser.add_argument("--layers", type=int, default=3, help="layers of weights cycled (1.95 GB each)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--repeat", type=int, default=1,
                        help="graph times per column, alternating with the other columns; the median is kept (the "
                             "card's power cap moves its clock between consecutive measurements)")
    parser.add_argument("--cuda-variants", default="", metavar="N,...",
                        help="also time the cuda backend with CudaBackend.VARIANT = N (1 tile kernel, 3 skinny)")
    args = parser.parse_args()
    ts = [int(t) for t in args.ts.split(",")]
    reasons = glm_awq.available_backends("cuda")
    backends = [b for b in args.backends.split(",") if reasons.get(b) is None]
    variants = {f"cuda:v{v}": int(v) for v in args.cuda_variants.split(",") if v and "cuda" in backends}

    ceilings = common.measure_ceilings()
    print(f"{common.card()}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 {ceilings['bf16_TFLOPs']:.0f} TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [_layer_weights(gen) for _ in range(args.layers)]
    bias = torch.randn(E, device="cuda", generator=gen) * 0.01
    prepared = {b: [glm_awq.prepare_experts(*w, backend=b) for w in layers] for b in backends}
    baseline = None
    if not args.no_baseline and hasattr(torch, "_grouped_mm"):
        w13_bf16, w2_bf16 = _dense_bf16(*layers[0][:2]), _dense_bf16(*layers[0][2:])
        baseline = _grouped_mm_baseline(w13_bf16, w2_bf16, bias)

    rows = []
    for t in ts:
        x, logits = _inputs(t)
        ids, _ = glm_awq.route(logits, bias, backend="torch")
        unique, nbytes, flops = _layer_cost(ids, t)
        floor = common.floor_us(nbytes, flops, ceilings)
        row = {"T": t, "unique_experts": unique, "bytes": nbytes, "flops": flops, "floor_us": floor}
        ref, timers = None, {}
        if t <= 256:
            ids_ref, w_ref = glm_awq.route(logits, bias, backend="torch")
            ref = fused_moe_ref(x, ids_ref, w_ref, *layers[0]).float()
        for column in [*backends, *variants]:
            b = column.partition(":")[0]
            cuda_cls = glm_awq.backends.CudaBackend
            default_variant = cuda_cls.VARIANT
            cuda_cls.VARIANT = variants.get(column, default_variant)  # read while the graph is captured

            def run_layer(p, b=b):
                ids, w = glm_awq.route(logits, bias, backend=b)
                return glm_awq.fused_moe(x, ids, w, p)

            fns = [lambda p=p: run_layer(p) for p in prepared[b]]
            err = None if ref is None else ((run_layer(prepared[b][0]).float() - ref).norm() / ref.norm()).item()

            def cycle(fns=fns):
                for fn in fns:
                    fn()

            def timer(cycle=cycle, n=len(fns), variant=cuda_cls.VARIANT, cls=cuda_cls):  # this and later rounds
                saved, cls.VARIANT = cls.VARIANT, variant
                try:
                    return common.graph_time_us(cycle, calls=n)
                finally:
                    cls.VARIANT = saved

            timers[column] = timer
            graph_us = timer()
            row[column] = {"graph_us": graph_us, "eager_us": common.time_us(cycle) / len(fns),
                           "pct_floor": 100 * floor / graph_us, "GBps": nbytes / graph_us / 1e3, "rel_err": err}  # fmt: skip
            cuda_cls.VARIANT = default_variant
        if baseline is not None:
            timers["torch_grouped_mm"] = lambda x=x, lg=logits: common.graph_time_us(lambda: baseline(x, lg))
            row["torch_grouped_mm_us"] = timers["torch_grouped_mm"]()
        if args.repeat > 1:  # more rounds, column after column, then the median of each column's rounds
            samples = {c: [row[c]["graph_us"] if c in row else row["torch_grouped_mm_us"]] for c in timers}
            for _ in range(args.repeat - 1):
                for c, timer in timers.items():
                    samples[c].append(timer())
            for c, vals in samples.items():
                med = statistics.median(vals)
                if c in row:
                    row[c].update(graph_us=med, graph_us_rounds=vals, pct_floor=100 * floor / med,
                                  GBps=nbytes / med / 1e3)  # fmt: skip
                else:
                    row.update(torch_grouped_mm_us=med, torch_grouped_mm_us_rounds=vals)
        rows.append(row)
        print(_line(row, [*backends, *variants]), flush=True)

    payload = {"card": common.card(), "ceilings": ceilings, "backends": backends, "expert_bytes": EXPERT_BYTES,
               "rows": rows}  # fmt: skip
    common.write_results("moe", payload)
    series = {f"{b} (graph)": ([r["T"] for r in rows], [r[b]["pct_floor"] for r in rows]) for b in backends}
    common.plot("moe", f"GLM-4.6 MoE layer, % of floor, {common.card()}", series, "tokens", "% of floor")
    print(f"\nGLM-4.6 MoE layer on {common.card()} (routing included; us)")
    columns = [*backends, *variants]
    print(f"{'T':>5} {'experts':>7} {'floor':>7}" + "".join(f" {b + ' graph':>12} {'%fl':>4} {'eager':>7}" for b in columns)
          + f" {'bf16 grouped_mm':>15}")  # fmt: skip
    for row in rows:
        print(_line(row, columns))
    return 0


def _line(row, backends):
    cols = "".join(f" {row[b]['graph_us']:12.1f} {row[b]['pct_floor']:4.0f} {row[b]['eager_us']:7.1f}" for b in backends)
    base = row.get("torch_grouped_mm_us")
    return f"{row['T']:5d} {row['unique_experts']:7d} {row['floor_us']:7.1f}{cols} {base if base is None else round(base, 1)!s:>15}"


if __name__ == "__main__":
    raise SystemExit(main())
