"""Same-run A/B of a cuda kernel knob (a glm_awq._C setter read at each launch, e.g. set_skinny_pdl, or with --attr
a CudaBackend class attribute read when the layer runs, e.g. SPLIT_FROM_PER_EXPERT).

Times the GLM-4.6 MoE layer (routing included; `bench_moe.py`'s x and logits, and its routing too when --layers
matches its own) and dense GEMMs at GLM-4.6's shapes on the cuda backend, each from a CUDA graph captured under
setting A and under setting B, in rounds ordered A B, B A, A B, ... (the card's power cap moves its clock between
consecutive measurements); prints the medians, % of the floor (measured in this run) and B / A, checks that both
settings give the same output bits, and writes ab_knob.json. The setter is left at A.

    python benchmarks/ab_knob.py --setter set_skinny_pdl --a 1 --b 0 [--ts 1,16,64] [--ms 1,8] [--rounds 3]
    python benchmarks/ab_knob.py --attr SPLIT_FROM_PER_EXPERT --a 100 --b 5.5 --ts 112,128 --ms '' --shapes ''
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

import glm_awq
from glm_awq import quant

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402
from bench_moe import E, _inputs, _layer_cost, _layer_weights  # noqa: E402
from bench_w4a16_gemm import ROTATE_BYTES, SHAPES, _rotating  # noqa: E402


def _ab(name, calls, setter, a, b, rounds, floor):
    """Graph-time `calls` (one callable per weight copy) under settings a and b, alternating; a result row."""
    out = {}
    try:
        for setting in (a, b):
            setter(setting)
            out[setting] = calls[0]()
            torch.cuda.synchronize()
    finally:
        setter(a)
    same = torch.equal(out[a], out[b])
    times = {a: [], b: []}
    try:
        for r in range(rounds):
            for setting in (a, b) if r % 2 == 0 else (b, a):  # neither setting always goes first
                setter(setting)  # read at launch: the graph captured now keeps it
                times[setting].append(common.graph_time_us(_rotating(calls), calls=len(calls)))
    finally:
        setter(a)
    us_a, us_b = statistics.median(times[a]), statistics.median(times[b])
    print(f"{name:24} A {us_a:9.1f} us ({100 * floor / us_a:5.1f}%)  B {us_b:9.1f} us ({100 * floor / us_b:5.1f}%)  "
          f"B/A {us_b / us_a:.3f}  same bits: {same}", flush=True)  # fmt: skip
    return {"case": name, "floor_us": floor, "a_us": us_a, "b_us": us_b, "a_rounds": times[a], "b_rounds": times[b],
            "same_bits": same}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    knob = parser.add_mutually_exclusive_group(required=True)
    knob.add_argument("--setter", help="a glm_awq._C function taking one int")
    knob.add_argument("--attr", help="a glm_awq.backends.CudaBackend class attribute (a number)")
    parser.add_argument("--a", type=float, default=0)
    parser.add_argument("--b", type=float, default=1)
    parser.add_argument("--ts", default="1,2,4,8,16,32,64,128", help="MoE layer token counts ('' for none)")
    parser.add_argument("--ms", default="1,8", help="dense GEMM rows ('' for none)")
    parser.add_argument("--shapes", default="q_proj,o_proj,expert_gate_up", help="dense shapes ('' for none)")
    parser.add_argument("--layers", type=int, default=2, help="MoE layers of weights cycled (1.95 GB each)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    glm_awq.available_backends("cuda")  # loads the extension
    from glm_awq import _C

    if args.attr:
        cls = glm_awq.backends.CudaBackend
        old = getattr(cls, args.attr, None)
        if not isinstance(old, (int, float)) or isinstance(old, bool):
            parser.error(f"--attr {args.attr!r}: not a numeric CudaBackend class attribute (got {old!r})")
        if isinstance(old, int) and any(v != int(v) for v in (args.a, args.b)):
            parser.error(f"--attr {args.attr} is an int: --a {args.a} / --b {args.b} must be whole numbers")
        knob_name = f"CudaBackend.{args.attr}"
        args.a, args.b = type(old)(args.a), type(old)(args.b)

        def setter(value):  # read when the layer runs, so also while a graph is captured
            setattr(cls, args.attr, value)
    else:
        knob_name, c_setter = args.setter, getattr(_C, args.setter, None)
        if c_setter is None or any(v != int(v) for v in (args.a, args.b)):
            parser.error(f"--setter {args.setter!r} must name a glm_awq._C function and --a/--b be integers")
        args.a, args.b = int(args.a), int(args.b)

        def setter(value):
            c_setter(value)

    ceilings = common.measure_ceilings()
    print(f"{common.card()}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 {ceilings['bf16_TFLOPs']:.0f} TFLOP/s; "
          f"A = {knob_name}({args.a}), B = {knob_name}({args.b})")  # fmt: skip
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    ts = [int(t) for t in args.ts.split(",") if t]
    if ts:
        layers = [glm_awq.prepare_experts(*_layer_weights(gen), backend="cuda") for _ in range(args.layers)]
        bias = torch.randn(E, device="cuda", generator=gen) * 0.01
        for t in ts:
            x, logits = _inputs(t)
            ids, _ = glm_awq.route(logits, bias, backend="torch")
            _, nbytes, flops = _layer_cost(ids, t)

            def layer(p, x=x, logits=logits):
                ids, w = glm_awq.route(logits, bias, backend="cuda")
                return glm_awq.fused_moe(x, ids, w, p)

            calls = [lambda p=p, layer=layer: layer(p) for p in layers]
            rows.append(_ab(f"MoE T={t}", calls, setter, args.a, args.b, args.rounds,
                            common.floor_us(nbytes, flops, ceilings)))  # fmt: skip
        layers = calls = None  # the MoE weights (~2 GB a layer) go before the dense ones are made
        torch.cuda.empty_cache()
    for name in (s for s in args.shapes.split(",") if s):
        n, k = SHAPES[name]
        wbytes = n * k // 2 + n * (k // 128) * 2
        copies = max(2, math.ceil(ROTATE_BYTES / wbytes))  # as bench_w4a16_gemm.py
        preps = []
        for _ in range(copies):
            w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
            preps.append(glm_awq.prepare_linear(*quant.quantize(w), backend="cuda"))
        for m in (int(v) for v in args.ms.split(",") if v):
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            calls = [lambda p=p, x=x: glm_awq.w4a16_linear(x, p) for p in preps]
            floor = common.floor_us(wbytes + 2 * m * (n + k), 2 * m * n * k, ceilings)
            rows.append(_ab(f"{name} M={m}", calls, setter, args.a, args.b, args.rounds, floor))
    common.write_results("ab_knob", {"card": common.card(), "ceilings": ceilings, "setter": knob_name, "a": args.a,
                                     "b": args.b, "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
